"""Gradient-based tuning of one weight decay per weight (Lorraine, Vicol & Duvenaud, 2020).

Softmax regression on scikit-learn's bundled digits (8x8 images, 10 classes). The inner problem
trains the weights ``w`` (65 x 10 = 650, bias row included) with one L2 penalty per weight,

    w*(ρ) = argmin_w  CE_train(w) + ½ Σ_i exp(ρ_i) w_i²,

and the outer problem tunes the 650 log weight decays ``ρ`` on the validation loss
``CE_val(w*(ρ))``. The library does the bilevel part: ``il.argmin`` solves the inner problem and
its backward pass returns ``∂CE_val/∂ρ`` by the implicit function theorem (or by unrolling or
truncating, for comparison).

Two parts:

1. Hypergradient accuracy and cost. At one ``ρ`` the hypergradient from ``Implicit(CG)``,
   ``Implicit(Neumann(k))``, ``Truncated(k)`` and ``Unrolled`` (``k`` steps of gradient descent
   from ``w = 0``) is compared with the exact one, computed here without the library: the
   Hessian by ``torch.autograd.functional.hessian``, a dense ``torch.linalg.solve``, and the
   mixed derivative in closed form (``∂²L/∂ρ_i∂w_i = exp(ρ_i) w_i``).
2. The outer optimisation: Adam on ``ρ`` started from the best shared weight decay of a grid,
   each inner solve warm-started from the previous weights with a loose tolerance. The plot shows
   the validation loss per outer step against the grid's best.

Run ``python examples/hyperparameter_optimization.py`` (full) or with ``--tiny``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _outputs import output_dir
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicit_layers as il  # noqa: E402

__all__ = ["main", "load_data", "inner_loss", "exact_hypergradient"]

DTYPE = torch.float64
N_CLASSES = 10


# --- data and model -------------------------------------------------------------------------
def load_data(n_train: int, n_val: int, n_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits split into train / validation / test; features standardised on the train split.

    Args:
        n_train: number of training images.
        n_val: number of validation images; the rest (up to 1797) is the test set.
        n_features: keep the ``n_features`` pixels of largest training variance (pixels that
            are constant on the training split are always dropped; the tiny mode keeps fewer to
            keep the dense reference cheap).
        seed: permutation seed.

    Returns:
        ``X_train (n_train, d+1)``, ``y_train (n_train,)`` and the same for ``val`` and
        ``test``; the last feature column is a constant 1 (bias).
    """
    X, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    X = torch.as_tensor(X, dtype=DTYPE)[perm]
    y = torch.as_tensor(y, dtype=torch.int64)[perm]
    train = slice(0, n_train)
    var = X[train].var(0)
    keep = var.argsort(descending=True)[: min(n_features, int((var > 0).sum()))]
    X = X[:, keep]
    mean, std = X[train].mean(0), X[train].std(0)
    X = torch.cat([(X - mean) / std, torch.ones(len(y), 1, dtype=DTYPE)], dim=1)
    val = slice(n_train, n_train + n_val)
    test = slice(n_train + n_val, None)
    return {
        "X_train": X[train], "y_train": y[train],
        "X_val": X[val], "y_val": y[val],
        "X_test": X[test], "y_test": y[test],
    }


def cross_entropy(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the softmax model with flat weights ``w`` of shape ``(d*10,)``."""
    logits = X @ w.reshape(X.shape[1], N_CLASSES)
    return torch.nn.functional.cross_entropy(logits, y)


def accuracy(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    logits = X @ w.reshape(X.shape[1], N_CLASSES)
    return float((logits.argmax(1) == y).double().mean())


def inner_loss(w: torch.Tensor, rho: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Training loss with one weight decay ``exp(ρ_i)`` per weight; ``w`` and ``ρ`` are ``(n,)``."""
    return cross_entropy(w, X, y) + 0.5 * (rho.exp() * w.square()).sum()


def solve_tight(rho: torch.Tensor, data: dict, w0: torch.Tensor | None = None) -> torch.Tensor:
    """The inner minimiser to float64 precision (no gradient attached)."""
    n = data["X_train"].shape[1] * N_CLASSES
    w0 = torch.zeros(n, dtype=DTYPE) if w0 is None else w0
    with torch.no_grad():
        return il.argmin(inner_loss, w0, rho, data["X_train"], data["y_train"],
                         solver=il.solvers.LBFGS(rtol=0.0, atol=1e-11, max_steps=20000))


# --- part 1: hypergradients -------------------------------------------------------------------
def exact_hypergradient(rho: torch.Tensor, w: torch.Tensor, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``d CE_val / dρ`` at the minimiser ``w``, without the library.

    ``dw*/dρ = -H⁻¹ ∂²L/∂w∂ρ`` and ``∂²L/∂w_i∂ρ_j = δ_ij exp(ρ_i) w_i``, so the hypergradient is
    ``-exp(ρ) ⊙ w ⊙ H⁻¹ ∇_w CE_val``.

    Returns:
        The hypergradient ``(n,)`` and the Hessian ``(n, n)``.
    """
    H = torch.autograd.functional.hessian(
        lambda v: inner_loss(v, rho, data["X_train"], data["y_train"]), w, vectorize=True)
    g_val = torch.func.grad(cross_entropy)(w, data["X_val"], data["y_val"])
    v = torch.linalg.solve(H, g_val)
    return -rho.exp() * w * v, H


def library_hypergradient(
    rho: torch.Tensor,
    data: dict,
    w0: torch.Tensor,
    solver: il.solvers.ForwardSolver,
    backward: object,
    repeats: int,
) -> tuple[torch.Tensor, float, float]:
    """Hypergradient through ``il.argmin`` with the given forward solver and backward mode.

    Returns:
        ``(hypergradient (n,), forward seconds, backward seconds)``; times are the best of
        ``repeats`` runs (the machine is shared, the minimum is the least disturbed).
    """
    best_f, best_b = math.inf, math.inf
    for _ in range(repeats):
        r = rho.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        w = il.argmin(inner_loss, w0, r, data["X_train"], data["y_train"],
                      solver=solver, backward=backward)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(cross_entropy(w, data["X_val"], data["y_val"]), r)
        t2 = time.perf_counter()
        best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
    return g, best_f, best_b


def compare_hypergradients(rho: torch.Tensor, data: dict, ks: list[int], unroll_ks: list[int],
                           repeats: int) -> tuple[list[dict], dict]:
    """Relative error and wall time of each hypergradient against the exact one."""
    n = rho.numel()
    w_star = solve_tight(rho, data)
    g_exact, H = exact_hypergradient(rho, w_star, data)
    eig = torch.linalg.eigvalsh(H)
    # One step size for gradient descent, Neumann and Truncated: 1/λ_max, so that Neumann(k) and
    # Truncated(k) are the same series (Lorraine et al.'s observation) and both converge.
    alpha = float(1.0 / eig[-1])
    # Started at w*, this forward solver stops at once: every method differentiates the same w*.
    tight = il.solvers.LBFGS(rtol=0.0, atol=1e-11, max_steps=20000)
    zero = torch.zeros(n, dtype=DTYPE)

    methods: list[tuple[str, il.solvers.ForwardSolver, object]] = [
        ("Implicit(Dense)", tight, il.backward.Implicit(il.linear.Dense())),
        ("Implicit(CG)", tight, il.backward.Implicit(il.linear.CG(rtol=1e-12, max_steps=5000))),
    ]
    for k in ks:
        neumann = il.linear.Neumann(max_steps=k, alpha=alpha, rtol=0.0, on_failure="ignore")
        methods.append((f"Implicit(Neumann({k}))", tight, il.backward.Implicit(neumann)))
    for k in ks:
        methods.append((f"Truncated({k})", tight, il.backward.Truncated(k, step_size=alpha)))
    for k in unroll_ks:
        # A fixed budget of k gradient-descent steps from w = 0, differentiated step by step.
        gd = il.solvers.GradientDescent(alpha, rtol=0.0, max_steps=k, on_failure="ignore")
        methods.append((f"Unrolled(GD, {k} steps)", gd, il.backward.Unrolled()))

    rows = [{"method": "exact (autograd Hessian + linalg.solve)", "rel_error": 0.0,
             "forward_s": float("nan"), "backward_s": float("nan")}]
    for name, solver, backward in tqdm(methods, desc="hypergradients", leave=False):
        w0 = zero if isinstance(backward, il.backward.Unrolled) else w_star
        g, tf, tb = library_hypergradient(rho, data, w0, solver, backward, repeats)
        rel = float(torch.linalg.vector_norm(g - g_exact) / torch.linalg.vector_norm(g_exact))
        rows.append({"method": name, "rel_error": rel, "forward_s": tf, "backward_s": tb})
    cond = float(eig[-1] / eig[0])
    return rows, {"alpha": alpha, "hessian_condition": cond, "n_hyper": n}


def format_table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Hypergradient of the validation loss w.r.t. {meta['n_hyper']} log weight decays "
        f"(Hessian condition number {meta['hessian_condition']:.3g}, step 1/λ_max = "
        f"{meta['alpha']:.3g}). Implicit/Truncated rows differentiate the converged solution; "
        "Unrolled rows differentiate k gradient steps from w = 0 (their forward time is the "
        "training).",
        "",
        "| method | relative error | forward (s) | hypergradient (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        fwd, bwd = ("–" if math.isnan(r[k]) else f"{r[k]:.4f}" for k in ("forward_s", "backward_s"))
        lines.append(f"| {r['method']} | {r['rel_error']:.2e} | {fwd} | {bwd} |")
    return "\n".join(lines)


# --- part 2: the outer optimisation -------------------------------------------------------------
def evaluate(w: torch.Tensor, data: dict) -> dict[str, float]:
    return {
        "val_loss": float(cross_entropy(w, data["X_val"], data["y_val"])),
        "test_loss": float(cross_entropy(w, data["X_test"], data["y_test"])),
        "val_acc": accuracy(w, data["X_val"], data["y_val"]),
        "test_acc": accuracy(w, data["X_test"], data["y_test"]),
    }


def grid_search(data: dict, n: int, log10_grid: torch.Tensor) -> tuple[float, list[float], torch.Tensor]:
    """Validation loss for one weight decay shared by every weight, over a log grid.

    Returns:
        The best ``log(λ)``, the validation losses along the grid and the best weights.
    """
    losses, best = [], (math.inf, 0.0, None)
    w = torch.zeros(n, dtype=DTYPE)
    for e in tqdm(log10_grid.flip(0).tolist(), desc="grid", leave=False):  # strong to weak decay
        rho = torch.full((n,), e * math.log(10), dtype=DTYPE)
        w = solve_tight(rho, data, w0=w)  # warm start along the path
        val = float(cross_entropy(w, data["X_val"], data["y_val"]))
        losses.append(val)
        if val < best[0]:
            best = (val, e * math.log(10), w)
    return best[1], losses[::-1], best[2]


def optimise(
    data: dict, rho0: torch.Tensor, w0: torch.Tensor, steps: int, lr: float
) -> tuple[torch.Tensor, list[float], dict]:
    """Adam on the log weight decays; the inner training is warm-started and approximate."""
    rho = rho0.clone().requires_grad_(True)
    opt = torch.optim.Adam([rho], lr=lr)
    # Warm start: each inner solve starts from the previous weights, so a few L-BFGS steps to a
    # loose tolerance suffice; the CG backward inherits that tolerance.
    solver = il.solvers.LBFGS(rtol=1e-5, atol=1e-6, max_steps=500)
    backward = il.backward.Implicit(il.linear.CG(max_steps=2000))
    w_prev, history, test_history = w0, [], []
    stats = {"inner_steps": 0, "cg_steps": 0}
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="outer (Adam on log weight decays)"):
        w, info = il.argmin(inner_loss, w_prev, rho, data["X_train"], data["y_train"],
                            solver=solver, backward=backward, return_info=True)
        val = cross_entropy(w, data["X_val"], data["y_val"])
        opt.zero_grad()
        val.backward()
        opt.step()
        history.append(float(val.detach()))
        test_history.append(float(cross_entropy(w.detach(), data["X_test"], data["y_test"])))
        stats["inner_steps"] += int(info.steps)
        stats["cg_steps"] += int(info.backward.steps)
        w_prev = w.detach()
    stats["seconds"] = time.perf_counter() - t0
    stats["test_history"] = test_history
    return rho.detach(), history, stats


def plot(history: list[float], test_history: list[float], grid_best: dict,
         grid: tuple[list[float], list[float]], out: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(history) + 1)
    ax1.plot(steps, history, label="validation, per-weight decays")
    ax1.axhline(grid_best["val_loss"], color="C0", ls="--", label="validation, best shared decay")
    ax1.plot(steps, test_history, color="C1", label="test, per-weight decays")
    ax1.axhline(grid_best["test_loss"], color="C1", ls="--", label="test, best shared decay")
    ax1.set_xlabel("outer step (Adam)")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(loc="center right", fontsize=8)
    ax2.semilogx(grid[0], grid[1], "o-", ms=3)
    ax2.set_xlabel("shared weight decay λ")
    ax2.set_ylabel("validation cross-entropy")
    ax2.set_title("grid over one shared decay")
    fig.tight_layout()
    path = out / "hpo_validation_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the measured results (also printed and saved under ``--out``).

    Returns:
        ``table`` (list of rows with ``method``, ``rel_error``, ``forward_s``, ``backward_s``),
        ``table_meta``, ``grid_best`` / ``tuned`` (validation and test loss and accuracy),
        ``history`` (validation loss per outer step), ``grid_best_lambda``, ``plot`` path.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/hyperparameter_optimization, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: these small problems are faster serial)")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "hyperparameter_optimization")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    """The body of :func:`main` for parsed arguments."""
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        cfg = dict(n_train=120, n_val=200, n_features=16, ks=[5, 20, 80], unroll_ks=[20, 200],
                   repeats=1, grid=torch.linspace(-4, 0, 9), steps=12, lr=0.1)
    else:
        cfg = dict(n_train=300, n_val=700, n_features=64, ks=[10, 100, 1000],
                   unroll_ks=[100, 1000], repeats=3, grid=torch.linspace(-5, 1, 49), steps=100,
                   lr=0.05)
    data = load_data(cfg["n_train"], cfg["n_val"], cfg["n_features"], args.seed)
    n = data["X_train"].shape[1] * N_CLASSES
    print(f"digits: {len(data['y_train'])} train / {len(data['y_val'])} val / "
          f"{len(data['y_test'])} test, {n} weights = {n} weight decays")

    # Part 2 first needs the grid; part 1 compares hypergradients at the grid's best decay.
    rho_best, grid_losses, w_best = grid_search(data, n, cfg["grid"])
    rho0 = torch.full((n,), rho_best, dtype=DTYPE)
    grid_best = evaluate(w_best, data)
    print(f"grid: best shared weight decay λ = {math.exp(rho_best):.3g}, validation loss "
          f"{grid_best['val_loss']:.4f}")

    # Compare at a generic point of the outer path, not at a symmetric one: perturb ρ.
    gen = torch.Generator().manual_seed(args.seed + 1)
    rho_cmp = rho0 + 0.5 * torch.randn(n, generator=gen, dtype=DTYPE)
    rows, meta = compare_hypergradients(rho_cmp, data, cfg["ks"], cfg["unroll_ks"], cfg["repeats"])
    table = format_table(rows, meta)
    print(table)
    (args.out / "hpo_hypergradients.md").write_text(table + "\n")

    rho, history, stats = optimise(data, rho0, w_best, cfg["steps"], cfg["lr"])
    tuned = evaluate(solve_tight(rho, data, w0=w_best), data)
    best_test = min(stats["test_history"])
    print(f"outer: {cfg['steps']} Adam steps in {stats['seconds']:.1f} s, {stats['inner_steps']} "
          f"L-BFGS steps and {stats['cg_steps']} CG steps in total; lowest test loss on the path "
          f"{best_test:.4f} at step {1 + stats['test_history'].index(best_test)}")
    for name, res in (("best shared decay (grid)", grid_best), ("per-weight decays (tuned)", tuned)):
        print(f"{name:>26}: val loss {res['val_loss']:.4f}  test loss {res['test_loss']:.4f}  "
              f"val acc {res['val_acc']:.3f}  test acc {res['test_acc']:.3f}")
    lam = rho.exp()
    print(f"tuned decays: min {float(lam.min()):.3g}, median {float(lam.median()):.3g}, "
          f"max {float(lam.max()):.3g}")
    grid_x = (10.0 ** cfg["grid"]).tolist()
    path = plot(history, stats["test_history"], grid_best, (grid_x, grid_losses), args.out)
    print(f"plot: {path}")
    return {
        "table": rows, "table_meta": meta, "grid_best": grid_best, "tuned": tuned,
        "history": history, "grid_best_lambda": math.exp(rho_best), "plot": str(path),
        "outer_stats": stats,
    }


if __name__ == "__main__":
    main()
