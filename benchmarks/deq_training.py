"""DEQ training: test accuracy of the same model trained through torchdeq and through il.nn.DEQ.

    python -m benchmarks.deq_training [--tiny] [--seeds 5] [--first-seed 0] [--configs ...] [--out FILE.md]

The model is one equilibrium cell ``z = tanh(W z + U x + b)`` (hidden 64, every weight an
``nn.Linear`` with PyTorch's default initialisation) followed by a linear classifier on ``z*``,
trained in float32 with Adam (learning rate 1e-2, batch 64) on two datasets shipped with
scikit-learn: digits (8x8 images, 10 classes, 4 epochs) and breast_cancer (30 features, 2
classes, 8 epochs), standardised, 25 % held out (the split and the initialisation follow the
seed). Each seed trains every configuration from the same initial weights on the same batches:

* ``torchdeq defaults``: ``get_deq()`` (fixed-point iteration, 40 steps, tolerance 1e-3,
  one-step phantom gradient);
* ``torchdeq matched``: Anderson, tolerance 1e-4, at most 40 steps, implicit backward
  (``ift=True``) at tolerance 1e-4 and at most 40 steps;
* ``ours defaults``: ``il.nn.DEQ(cell)`` (the spectral norm of ``W``, the layer the state
  passes through, bounded by 0.9: ``lipschitz="auto"``);
* ``ours unbounded``: ``il.nn.DEQ(cell, lipschitz=None)``, the map as given;
* ``ours exact``: ``il.nn.DEQ(cell, solver=Anderson(rtol=1e-4, max_steps=40),
  backward=Implicit(GMRES()), lipschitz=None)``, the implicit gradient of the map as given,
  without any fallback (torchdeq matched's settings);
* ``ours recipe``: the defaults with ``backward=il.backward.JacobianFree()``, which the bound
  makes a descent direction (the map is a contraction).

``--configs`` also runs the candidates measured when choosing the defaults (``SETUPS``), and
``--first-seed`` other seeds than the table's, so that settings can be chosen without looking
at the test sets the table reports.

The table gives the mean test accuracy over the seeds with the standard deviation and the
range, the mean time of a training step, and for our configurations the number of
ConvergenceWarnings raised during training (torchdeq raises none; its unconverged solves
are silent).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import implicit_layers as il

from ._common import import_peer

HIDDEN = 64
BATCH = 64
LR = 1e-2
#: dataset -> epochs of training
DATASETS = {"digits": 4, "breast_cancer": 8}
CONFIGS = ("torchdeq defaults", "torchdeq matched", "ours defaults", "ours unbounded", "ours exact",
           "ours recipe")


class Cell(torch.nn.Module):
    """``z ↦ tanh(W z + U x + b)``."""

    def __init__(self, features: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.W = torch.nn.Linear(hidden, hidden, bias=False)
        self.U = torch.nn.Linear(features, hidden)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


class Model(torch.nn.Module):
    """Equilibrium cell, then a linear classifier; ``solve(cell, x)`` returns ``z*``."""

    def __init__(self, cell: Cell, classes: int, solve: Callable[[Cell, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.cell = cell
        self.head = torch.nn.Linear(HIDDEN, classes)
        self.solve = solve

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.solve(self.cell, x))


def torchdeq_solve(**settings: object) -> Callable[[Cell, torch.Tensor], torch.Tensor]:
    torchdeq = import_peer("torchdeq")
    deq = torchdeq.get_deq(**settings)

    def solve(cell: Cell, x: torch.Tensor) -> torch.Tensor:
        # torchdeq's layer is not a submodule of the model: follow the cell's train/eval mode,
        # so that evaluation runs torchdeq's inference path, as ours runs its eval path.
        deq.train(cell.training)
        z0 = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype)
        z_out, _ = deq(lambda z: cell(z, x), z0)
        return z_out[-1]

    return solve


def ours_solve(**settings: object) -> Callable[[Cell, torch.Tensor], torch.Tensor]:
    layers: dict[int, il.nn.DEQ] = {}

    def solve(cell: Cell, x: torch.Tensor) -> torch.Tensor:
        # One layer per cell, so that train/eval mode follows the cell's.
        deq = layers.setdefault(id(cell), il.nn.DEQ(cell, state_shape=HIDDEN, **settings))  # type: ignore[arg-type]
        deq.train(cell.training)
        return deq(x)

    return solve


def _normed(kind: str, backward: object = None,
            **settings: object) -> Callable[[Cell], Callable[[Cell, torch.Tensor], torch.Tensor]]:
    """``il.nn.apply_norm(cell, kind, **settings)`` on every layer of the cell (which the
    layer's own bound then leaves alone), with the default solve or ``backward``."""
    def configure(cell: Cell) -> Callable[[Cell, torch.Tensor], torch.Tensor]:
        il.nn.apply_norm(cell, kind, **settings)  # type: ignore[arg-type]
        return ours_solve() if backward is None else ours_solve(backward=backward)

    return configure


def _unbounded(**settings: object) -> Callable[[Cell], Callable[[Cell, torch.Tensor], torch.Tensor]]:
    """Our layer without its Lipschitz bound (``lipschitz=None``, the defaults before it)."""
    return lambda cell: ours_solve(lipschitz=None, **settings)


#: configuration name -> function that prepares the cell (in place) and returns its solve.
SETUPS: dict[str, Callable[[Cell], Callable[[Cell, torch.Tensor], torch.Tensor]]] = {
    "torchdeq defaults": lambda cell: torchdeq_solve(),
    "torchdeq matched": lambda cell: torchdeq_solve(
        f_solver="anderson", f_tol=1e-4, f_max_iter=40, ift=True, b_tol=1e-4, b_max_iter=40),
    "ours defaults": lambda cell: ours_solve(),
    "ours unbounded": _unbounded(),
    "ours exact": _unbounded(solver=il.solvers.Anderson(rtol=1e-4, max_steps=40),
                             backward=il.backward.Implicit(il.linear.GMRES())),
    "ours recipe": lambda cell: ours_solve(backward=il.backward.JacobianFree()),
    # Candidates measured when choosing the defaults. With the bound (the default):
    "ours phantom 5": lambda cell: ours_solve(backward=il.backward.Phantom(5)),
    "ours anderson": lambda cell: ours_solve(solver=il.solvers.Anderson(max_steps=50)),
    "ours bound 0.8": lambda cell: ours_solve(lipschitz=0.8),
    "ours bound 0.95": lambda cell: ours_solve(lipschitz=0.95),
    # apply_norm on every layer of the cell, the state's and the input's:
    "ours apply_norm spectral 0.9": _normed("spectral", bound=0.9),
    "ours apply_norm spectral 1.0": _normed("spectral", bound=1.0),
    "ours apply_norm spectral 0.9 jacobian-free": _normed("spectral", il.backward.JacobianFree(), bound=0.9),
    "ours apply_norm weight": _normed("weight"),
    # Without a bound:
    "ours unbounded phantom fallback": _unbounded(
        backward=il.backward.Implicit(fallback=il.backward.Phantom())),
    "ours unbounded jacobian-free": _unbounded(backward=il.backward.JacobianFree()),
    "ours unbounded phantom 5": _unbounded(backward=il.backward.Phantom(5)),
    "ours unbounded anderson": _unbounded(solver=il.solvers.Anderson(max_steps=50)),
    "ours unbounded rtol 1e-4": _unbounded(solver=il.solvers.Adaptive(rtol=1e-4, max_steps=50)),
    "ours unbounded rtol 1e-3": _unbounded(solver=il.solvers.Adaptive(rtol=1e-3, max_steps=50)),
    "ours unbounded neumann backward": _unbounded(backward=il.backward.Implicit(il.linear.Neumann(40))),
    # torchdeq matched's settings in our library: Anderson forward, a fixed-point-iteration
    # (Neumann) adjoint solve of at most 40 steps, both at 1e-4
    "ours unbounded torchdeq-like": _unbounded(
        solver=il.solvers.Anderson(rtol=1e-4, max_steps=40),
        backward=il.backward.Implicit(il.linear.Neumann(40, rtol=1e-4))),
}
CANDIDATES = tuple(name for name in SETUPS if name not in CONFIGS)


def make_config(name: str, cell: Cell) -> tuple[Cell, Callable[[Cell, torch.Tensor], torch.Tensor]]:
    """The cell to train (a copy of ``cell``) and how to solve it, for configuration ``name``."""
    if name not in SETUPS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(SETUPS)}")
    cell = copy.deepcopy(cell)
    return cell, SETUPS[name](cell)


def load(name: str, seed: int, tiny: bool) -> tuple[torch.Tensor, ...]:
    import sklearn.datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    if tiny:
        X, y = X[:200], y[:200]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    return (torch.tensor(scaler.transform(Xtr), dtype=torch.float32), torch.tensor(ytr),
            torch.tensor(scaler.transform(Xte), dtype=torch.float32), torch.tensor(yte))


@dataclass
class Run:
    accuracy: float
    step_time: float
    warnings: int


def train(name: str, dataset: str, seed: int, epochs: int, tiny: bool) -> Run:
    Xtr, ytr, Xte, yte = load(dataset, seed, tiny)
    classes = int(ytr.max()) + 1
    torch.manual_seed(seed)
    cell, solve = make_config(name, Cell(Xtr.shape[1]))
    torch.manual_seed(seed)
    model = Model(cell, classes, solve)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = torch.Generator().manual_seed(seed)
    times: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", il.ConvergenceWarning)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(Xtr.shape[0], generator=order)
            for i in range(0, Xtr.shape[0], BATCH):
                idx = perm[i:i + BATCH]
                start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(Xte).argmax(1) == yte).float().mean()) * 100
    count = sum(issubclass(w.category, il.ConvergenceWarning) for w in caught)
    return Run(accuracy, statistics.fmean(times), count)


def run(seeds: int, tiny: bool, configs: tuple[str, ...] = CONFIGS, first_seed: int = 0,
        datasets: tuple[str, ...] = tuple(DATASETS)) -> dict[str, dict[str, list[Run]]]:
    """``results[dataset][config]``: one :class:`Run` per seed (seeds ``first_seed``, ...)."""
    results: dict[str, dict[str, list[Run]]] = {}
    for dataset in datasets:
        epochs = DATASETS[dataset]
        results[dataset] = {name: [] for name in configs}
        for seed in range(first_seed, first_seed + seeds):
            for name in configs:
                results[dataset][name].append(train(name, dataset, seed, 1 if tiny else epochs, tiny))
    return results


def table(results: dict[str, dict[str, list[Run]]]) -> str:
    lines = ["| dataset | configuration | test accuracy % (mean ± std) | min – max | ms / step | "
             "ConvergenceWarnings |", "|---|---|---|---|---|---|"]
    for dataset, by_config in results.items():
        for name, runs in by_config.items():
            acc = [r.accuracy for r in runs]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            warned = "–" if name.startswith("torchdeq") else str(sum(r.warnings for r in runs))
            lines.append(
                f"| {dataset} | {name} | {statistics.fmean(acc):.2f} ± {std:.1f} | "
                f"{min(acc):.1f} – {max(acc):.1f} | "
                f"{1e3 * statistics.fmean(r.step_time for r in runs):.1f} | {warned} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="200 samples, one epoch, one seed (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 5)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first_seed, ..., first_seed + seeds - 1 (default 0); other seeds than "
                        "the table's 0-4 serve to choose settings without looking at its test sets")
    p.add_argument("--datasets", nargs="*", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--configs", nargs="*", choices=list(SETUPS), default=list(CONFIGS))
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds if args.seeds is not None else (1 if args.tiny else 5)
    text = table(run(seeds, args.tiny, tuple(args.configs), args.first_seed, tuple(args.datasets)))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
