"""The solver figures of the documentation: ``python docs/_scripts/figures.py [--write-docs]``.

Writes, from runs made here (CPU, float64, about 20 s):

* ``deq_residuals.png``: the relative residual ``‖f(z) - z‖ / ‖f(z)‖`` at every evaluation of
  the map, for Picard, Anderson and Adaptive on the benchmarks' easy and hard DEQ
  (``z = tanh(W z + U x + b)``, 256 units, batch 64; ``benchmarks/deq.py`` draws the data).
* ``gradient_error_vs_steps.png``: the relative error of the gradient against a dense
  reference when the backward's linear solver is stopped after ``k`` steps: Neumann terms and
  GMRES iterations on the hard DEQ, CG iterations and Neumann terms on a ridge hypergradient.

The outputs go to ``--out`` if given, ``docs/img`` with ``--write-docs`` (tracked files), and
``out/figures`` otherwise. ``--tiny`` runs smaller problems in a few seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the repository's code
    sys.path.insert(0, str(ROOT))

import implicit_layers as il  # noqa: E402
from benchmarks.deq import f_inj, make_deq, reference  # noqa: E402

DT = torch.float64
TOL = 1e-10


def deq_tensors(kind: str, hidden: int, batch: int) -> dict[str, torch.Tensor]:
    """The benchmarks' DEQ data (``kind`` "easy" or "hard") as float64 tensors."""
    return {k: torch.as_tensor(v, dtype=DT) for k, v in make_deq(kind, hidden, batch).items()}


def residual_trace(T: dict[str, torch.Tensor], solver: il.solvers.ForwardSolver) -> list[float]:
    """Relative residual of the whole batch at each evaluation of the map during one solve."""
    inj = T["x"] @ T["U"].T + T["b"]
    trace: list[float] = []

    def f(z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        fz = f_inj(z, inj, T["W"])
        trace.append(float((fz - z).norm() / fz.norm().clamp_min(1e-300)))
        return fz

    with torch.no_grad():
        il.fixed_point(f, torch.zeros_like(T["t"]), inj, solver=solver)
    return trace


def deq_gradient_error(T: dict[str, torch.Tensor], ref: tuple[torch.Tensor, ...],
                       linear: il.linear.LinearSolver) -> float:
    """Relative error of ``(dW, dx)`` with ``linear`` as the backward, against ``ref``."""
    W, x = T["W"].clone().requires_grad_(), T["x"].clone().requires_grad_()
    z = il.fixed_point(f_inj, torch.zeros_like(T["t"]), x @ T["U"].T + T["b"], W,
                       solver=il.solvers.Picard(rtol=TOL, max_steps=5000), backward=linear)
    loss = ((z - T["t"]) ** 2).sum() / T["t"].shape[0]
    got = torch.cat([g.flatten() for g in torch.autograd.grad(loss, (W, x))])
    want = torch.cat([g.flatten() for g in ref[:2]])
    return float((got - want).norm() / want.norm())


def ridge_gradient_error(d: int, linear: il.linear.LinearSolver) -> float:
    """Relative error of a ridge hypergradient ``d val / d log λ`` against the closed form."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(2 * d, d, generator=gen, dtype=DT), torch.randn(2 * d, generator=gen, dtype=DT)
    Xv, yv = torch.randn(d, d, generator=gen, dtype=DT), torch.randn(d, generator=gen, dtype=DT)
    n = X.shape[0]

    def val(w: torch.Tensor) -> torch.Tensor:
        return (Xv @ w - yv).square().mean()

    log_lam = torch.tensor(-3.0, dtype=DT, requires_grad=True)
    A = X.T @ X / n + log_lam.exp() * torch.eye(d, dtype=DT)
    (want,) = torch.autograd.grad(val(torch.linalg.solve(A, X.T @ y / n)), log_lam)
    w_star = torch.linalg.solve(A.detach(), X.T @ y / n)  # the forward is exact: only the backward varies

    def train(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * (X @ w - y).square().mean() + 0.5 * log_lam.exp() * w.square().sum()

    lam = log_lam.detach().clone().requires_grad_()
    w = il.custom_root(lambda w, lam: torch.func.grad(train)(w, lam), symmetric=True, backward=linear)(
        lambda w0, lam: w_star
    )(torch.zeros(d, dtype=DT), lam)
    (got,) = torch.autograd.grad(val(w), lam)
    return float((got - want).abs() / want.abs())


def _steps_sweep(ks: list[int], error: Callable[[int], float]) -> list[float]:
    with warnings.catch_warnings():
        # A solver stopped after k steps is meant to be unconverged here.
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        return [error(k) for k in ks]


def make_figures(out: Path, tiny: bool = False) -> list[Path]:
    """Run the experiments, write the figures into ``out`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    hidden, batch = (32, 8) if tiny else (256, 64)
    solvers = {
        "Picard": lambda: il.solvers.Picard(rtol=TOL, max_steps=400),
        "Anderson": lambda: il.solvers.Anderson(rtol=TOL, max_steps=400),
        "Adaptive (default)": lambda: il.solvers.Adaptive(rtol=TOL, max_steps=400),
    }
    styles = {"Picard": "-", "Anderson": "--", "Adaptive (default)": ":"}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, kind in zip(axes, ("easy", "hard"), strict=True):
        T = deq_tensors(kind, hidden, batch)
        for name, make in solvers.items():
            trace = residual_trace(T, make())
            ax.semilogy(range(1, len(trace) + 1), trace, styles[name], lw=2, label=f"{name} ({len(trace)})")
        ax.axhline(TOL, color="gray", lw=0.8)
        ax.set_title(f"{kind} DEQ ({'‖W‖₂ = 0.9' if kind == 'easy' else 'W = 0.95 × orthogonal'})")
        ax.set_xlabel("evaluations of the map f")
        ax.legend(title="solver (evaluations)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative residual ‖f(z) − z‖ / ‖f(z)‖")
    fig.tight_layout()
    paths.append(out / "deq_residuals.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    T = deq_tensors("hard", hidden, batch)
    ref = reference(T)
    ks = [1, 2, 4, 8, 16, 32, 64] if tiny else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    quiet = {"rtol": 1e-15, "on_failure": "ignore"}
    deq_errors = {
        "Neumann terms": _steps_sweep(ks, lambda k: deq_gradient_error(
            T, ref, il.linear.Neumann(max_steps=k, **quiet))),
        "GMRES iterations": _steps_sweep(ks, lambda k: deq_gradient_error(
            T, ref, il.linear.GMRES(max_steps=k, restart=max(k, 20), **quiet))),
    }
    d = 20 if tiny else 200
    ridge_errors = {
        "CG iterations": _steps_sweep(ks, lambda k: ridge_gradient_error(
            d, il.linear.CG(max_steps=k, **quiet))),
        "Neumann terms (step 1/λmax)": _steps_sweep(ks, lambda k: ridge_gradient_error(
            d, il.linear.Neumann(max_steps=k, **quiet))),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, errors, title in (
        (axes[0], deq_errors, "hard DEQ: gradient of W and x"),
        (axes[1], ridge_errors, f"ridge, d = {d}: hypergradient of log λ"),
    ):
        for (name, errs), marker in zip(errors.items(), ("o-", "s--"), strict=True):
            ax.loglog(ks, [max(e, 1e-16) for e in errs], marker, lw=2, label=name)
        ax.set_title(title)
        ax.set_xlabel("steps k of the backward's linear solver")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("relative gradient error")
    fig.tight_layout()
    paths.append(out / "gradient_error_vs_steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def output_dir(out: str | None, write_docs: bool) -> Path:
    """``--out`` if given, ``docs/img`` with ``--write-docs``, else ``out/figures`` (ignored)."""
    if out is not None:
        return Path(out)
    return ROOT / ("docs/img" if write_docs else "out/figures")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder of the figures")
    p.add_argument("--write-docs", action="store_true",
                   help="write the documentation's figures in docs/img (tracked files)")
    p.add_argument("--tiny", action="store_true", help="small problems, a few seconds")
    a = p.parse_args(argv)
    for path in make_figures(output_dir(a.out, a.write_docs), tiny=a.tiny):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
