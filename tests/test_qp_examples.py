"""The OptNet Sudoku example in its tiny mode."""

import pytest
import torch

from tests.helpers import load_example


@pytest.mark.slow
def test_optnet_sudoku_tiny(capsys):
    module = load_example("optnet_sudoku")
    # The generated boards are valid Sudoku solutions and the puzzles agree with them.
    puzzles, solutions = module.make_data(20, 8, 0)
    boards = solutions.view(-1, 4, 4, 4).argmax(-1)
    for grid in boards:
        for lines in (grid, grid.T, grid.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)):
            assert all(sorted(line.tolist()) == [0, 1, 2, 3] for line in lines)
    assert bool((puzzles <= solutions).all()) and int(puzzles[0].sum()) == 8
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
