"""The OptNet Sudoku example in its tiny mode."""

import itertools

import pytest
import torch

from tests.helpers import load_example


def _valid(grid: torch.Tensor) -> bool:
    return all(
        sorted(line.tolist()) == [0, 1, 2, 3]
        for lines in (grid, grid.T, grid.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4))
        for line in lines
    )


@pytest.mark.slow
def test_optnet_sudoku_tiny(capsys):
    module = load_example("optnet_sudoku")
    # The generated boards are valid Sudoku solutions and the puzzles agree with them.
    puzzles, solutions = module.make_data(20, 8, 0)
    boards = solutions.view(-1, 4, 4, 4).argmax(-1)
    for grid in boards:
        for lines in (grid, grid.T, grid.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)):
            assert all(sorted(line.tolist()) == [0, 1, 2, 3] for line in lines)
    assert bool((puzzles <= solutions).all()) and bool((puzzles.sum(-1) >= 8).all())
    # Every puzzle has one solution: checked against all grids enumerated here by brute force
    # (there are 288 valid 4x4 Sudoku grids).
    rows = torch.tensor(list(itertools.permutations(range(4))))
    idx = torch.cartesian_prod(*[torch.arange(24)] * 4)
    candidates = rows[idx]  # (24**4, 4, 4): rows are permutations already
    ok = torch.ones(len(candidates), dtype=torch.bool)
    for lines in (candidates.mT, candidates.view(-1, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4, 4)):
        ok &= (torch.nn.functional.one_hot(lines, 4).sum(-2) == 1).all(-1).all(-1)
    grids = candidates[ok]
    assert len(grids) == 288 and all(_valid(g) for g in grids[:10])
    onehot = torch.nn.functional.one_hot(grids, 4).flatten(1).to(puzzles.dtype)
    fits = (onehot @ puzzles.T) == puzzles.sum(-1)
    assert bool((fits.sum(0) == 1).all())
    result = module.main(["--tiny", "--no-qpth"])
    qp = result["OptNet (il.qp)"]
    assert qp["train_loss_per_epoch"][-1] < qp["train_loss_per_epoch"][0]
    assert 0.0 <= qp["test_error"] <= 1.0 and "test board error" in capsys.readouterr().out
    layer = module.OptNetSudoku(8)
    z = layer(puzzles[:3]).detach()
    # The layer's output is feasible for its own constraints.
    assert float(z.min()) > -1e-9
    b = (layer.A @ layer.log_z0.exp()).detach()
    assert float((z @ layer.A.detach().T - b).abs().max()) < 1e-8
    assert torch.isfinite(z).all()
