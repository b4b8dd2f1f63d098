"""OptNet learns the rules of 4x4 Sudoku from puzzles and their solutions (Amos & Kolter, 2017).

A board is a one-hot tensor ``z ∈ {0, 1}^{4x4x4}`` (cell, digit). The OptNet layer is the QP

    z*(p) = argmin_z  ½ ε ‖z‖² - pᵀz   s.t.   z >= 0,   A z = b,

whose input ``p`` is the puzzle (its given cells one-hot, the others zero) and whose equality
constraints ``A`` (``n_eq x 64``) are *learned*: nothing tells the layer that every row,
column, box and cell holds each digit once. ``b = A z₀`` with a learnable ``z₀ >= 0`` keeps
the constraints feasible. Training minimises the squared error to the solution's one-hot
board; a board counts as solved when the per-cell argmax equals the solution everywhere.

A convolutional baseline with about as many parameters (three 3x3 convolutions, 4 -> C -> C
-> 4 channels) is trained on the same data with the same loss. The example also times one
epoch of the same QP layer with qpth's ``QPFunction`` (when installed) next to ``il.qp``.
Puzzles are generated here: a random valid 4x4 grid (digit, row, column, band and stack
permutations and transposition of a base grid), with ``--hints`` cells kept, and one more at
a time while another grid also fits them: every puzzle has exactly one solution, so a board
counts as wrong only when it is (with 8 random cells alone, about 30 % of the puzzles have
several solutions, and a right answer other than the stored one would count as an error).

Usage::

    python examples/optnet_sudoku.py            # about 30 s on two CPU cores
    python examples/optnet_sudoku.py --tiny     # seconds, for tests
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import implicit_layers as il

F64 = torch.float64
N = 4  # board size; boxes are 2x2
BASE = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]])


def random_solution(g: torch.Generator) -> torch.Tensor:
    """A uniformly transformed valid 4x4 grid of digits 0..3."""
    grid = torch.randperm(N, generator=g)[BASE]
    bands = torch.randperm(2, generator=g)
    rows = torch.cat([2 * bands[i] + torch.randperm(2, generator=g) for i in range(2)])
    stacks = torch.randperm(2, generator=g)
    cols = torch.cat([2 * stacks[i] + torch.randperm(2, generator=g) for i in range(2)])
    grid = grid[rows][:, cols]
    return grid.T.contiguous() if bool(torch.rand(1, generator=g) < 0.5) else grid


def all_grids() -> torch.Tensor:
    """Every valid 4x4 grid (288), one-hot and flattened: ``(288, 64)``."""
    rows = list(itertools.permutations(range(N)))
    grids: list[tuple[tuple[int, ...], ...]] = []

    def fits(done: tuple[tuple[int, ...], ...], row: tuple[int, ...]) -> bool:
        r = len(done)
        if any(row[c] == prev[c] for prev in done for c in range(N)):
            return False
        # the other row of the same 2x2 band must not share a box digit
        mate = done[r - 1] if r % 2 else None
        return mate is None or all({row[c], row[c + 1]}.isdisjoint({mate[c], mate[c + 1]}) for c in (0, 2))

    def extend(done: tuple[tuple[int, ...], ...]) -> None:
        if len(done) == N:
            grids.append(done)
            return
        for row in rows:
            if fits(done, row):
                extend(done + (row,))

    extend(())
    return torch.nn.functional.one_hot(torch.tensor(grids), N).to(F64).flatten(1)


def make_data(count: int, hints: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzles with one solution each, and the solutions, one-hot and flattened to ``(count, 64)``.

    ``hints`` random cells of a random grid are given; while another grid also fits them, one
    more random cell is given, so that the stored solution is the only right answer."""
    g = torch.Generator().manual_seed(seed)
    grids = all_grids()
    puzzles, solutions = [], []
    for _ in range(count):
        sol = torch.nn.functional.one_hot(random_solution(g), N).to(F64)  # (4, 4, 4)
        order = torch.randperm(N * N, generator=g)
        given = hints
        while True:
            keep = torch.zeros(N * N, dtype=torch.bool)
            keep[order[:given]] = True
            puzzle = (sol * keep.view(N, N, 1)).flatten()
            if int((grids @ puzzle == given).sum()) == 1:
                break
            given += 1
        puzzles.append(puzzle)
        solutions.append(sol.flatten())
    return torch.stack(puzzles), torch.stack(solutions)


class OptNetSudoku(torch.nn.Module):
    """The QP layer with learned equality constraints ``A z = A z₀``, ``z >= 0``."""

    def __init__(self, n_eq: int, eps: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = N**3
        self.A = torch.nn.Parameter(torch.rand(n_eq, n, generator=g, dtype=F64))
        self.log_z0 = torch.nn.Parameter(torch.full((n,), -1.0, dtype=F64))
        self.eps = eps

    def data(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = p.shape[-1]
        Q = self.eps * torch.eye(n, dtype=F64)
        G, h = -torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64)
        return Q, -p, G, h, self.A, self.A @ self.log_z0.exp()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return il.qp(*self.data(p))


class ConvSudoku(torch.nn.Module):
    """A convolutional baseline on the (digit, row, column) one-hot board."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(N, channels, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(channels, N, 3, padding=1),
        ).to(F64)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        x = p.view(-1, N, N, N).permute(0, 3, 1, 2)
        return self.net(x).permute(0, 2, 3, 1).flatten(1).sigmoid()


def board_error(pred: torch.Tensor, sol: torch.Tensor) -> float:
    """Fraction of boards whose per-cell argmax differs from the solution somewhere."""
    wrong = pred.view(-1, N * N, N).argmax(-1) != sol.view(-1, N * N, N).argmax(-1)
    return float(wrong.any(-1).double().mean())


def train(model: torch.nn.Module, data: dict, epochs: int, batch: int, lr: float) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history, times, losses = [], [], []
    for _ in range(epochs):
        start = time.perf_counter()
        total = 0.0
        for i in range(0, len(data["ptr"]), batch):
            loss = (model(data["ptr"][i:i + batch]) - data["str"][i:i + batch]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(data["ptr"][i:i + batch]) / len(data["ptr"])
        losses.append(total)
        times.append(time.perf_counter() - start)
        with torch.no_grad():
            history.append(board_error(model(data["pte"]), data["ste"]))
    solved = [e for e, err in enumerate(history, 1) if err == min(history)]
    return {"test_error": history[-1], "test_error_per_epoch": history, "best_epoch": solved[0],
            "train_loss_per_epoch": losses,
            "seconds_per_epoch": sum(times) / len(times),
            "parameters": sum(p.numel() for p in model.parameters())}


def qpth_epoch_seconds(model: OptNetSudoku, data: dict, batch: int) -> float | None:
    """One training epoch (forward + backward) of the same layer through qpth, if installed."""
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None
    start = time.perf_counter()
    for i in range(0, len(data["ptr"]), batch):
        p = data["ptr"][i:i + batch]
        z = QPFunction(verbose=-1)(*model.data(p))
        (z - data["str"][i:i + batch]).square().mean().backward()
    model.zero_grad()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--hints", type=int, default=8,
                    help="given cells per puzzle (of 16; more where needed for one solution)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--n-eq", type=int, default=40, help="learned equality rows")
    ap.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the OptNet layer")
    ap.add_argument("--channels", type=int, default=14, help="conv baseline width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small run: seconds")
    ap.add_argument("--no-qpth", action="store_true", help="skip the qpth timing")
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.epochs, args.batch = 40, 20, 3, 20
    torch.manual_seed(args.seed)
    ptr, s_tr = make_data(args.train, args.hints, args.seed)
    pte, s_te = make_data(args.test, args.hints, args.seed + 1)
    data = {"ptr": ptr, "str": s_tr, "pte": pte, "ste": s_te}
    optnet = OptNetSudoku(args.n_eq, seed=args.seed)
    results = {"OptNet (il.qp)": train(optnet, data, args.epochs, args.batch, lr=args.lr),
               "conv": train(ConvSudoku(args.channels), data, args.epochs, args.batch, lr=1e-2)}
    results["qpth_seconds_per_epoch"] = None if args.no_qpth else qpth_epoch_seconds(optnet, data, args.batch)
    for name in ("OptNet (il.qp)", "conv"):
        r = results[name]
        print(f"{name:>15}: test board error {r['test_error']:.3f} (best at epoch {r['best_epoch']} of "
              f"{args.epochs}), {r['parameters']} parameters, {r['seconds_per_epoch']:.2f} s/epoch")
    if results["qpth_seconds_per_epoch"] is not None:
        print(f"{'qpth':>15}: {results['qpth_seconds_per_epoch']:.2f} s/epoch on the same layer")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
