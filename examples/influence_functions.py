"""Influence functions (Koh & Liang, 2017) as one hypergradient with respect to example weights.

Give every training example a weight ``eps_i`` in the training objective,

    J(w, eps) = sum_i eps_i * loss_i(w) / n + lam/2 * ||w||^2,     w*(eps) = argmin_w J(w, eps),

and the influence of *every* training point on a test loss is one hypergradient,
``d test_loss(w*(eps)) / d eps`` at ``eps = 1``. ``il.argmin`` supplies it: the backward pass
solves ``H u = grad test_loss`` (``H`` the Hessian at ``w*``, by Hessian-vector products) and
returns ``-(d^2 J / d eps d w) u`` for all ``n`` weights at once. Removing point ``i`` moves
``eps_i`` from 1 to 0, so its predicted effect on the test loss is ``-d test_loss / d eps_i``.

Several test points share the Hessian: ``K`` copies of the problem run as one batched argmin
(warm-started at the minimiser, so the forward solve stops at once), and their ``K`` adjoint
systems are solved by one batched CG. LiSSA (Agarwal et al., 2017) is the stochastic
alternative: Neumann recursions over Hessian-vector products on random minibatches,
``il.linear.LiSSA`` on an ``il.linear.FunctionOperator`` whose product samples a new minibatch
on every call.

Part 1 (breast_cancer, L2-regularised logistic regression): influence vs actual leave-one-out
retraining (an independent dense Newton solver) for the most influential points plus random
ones; Pearson and Spearman correlation; time for all-point influence vs time per retraining.

Part 2 (digits, softmax regression, 20 test points x 1000 training points): CG influence vs the
exact dense influence (explicit Hessian, ``torch.linalg.solve``): correlation, relative error and
time.

Usage::

    python examples/influence_functions.py       # writes out/influence_functions/influence_*.png
    python examples/influence_functions.py --write-docs   # the same, into docs/img (tracked)
    python examples/influence_functions.py --tiny     # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _outputs import output_dir
from scipy import stats  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicit_layers as il  # noqa: E402

__all__ = ["main"]

DTYPE = torch.float64
Tensor = torch.Tensor
Losses = Callable[[Tensor, Tensor, Tensor], Tensor]
Objective = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Models. Every function takes weights with optional leading batch dimensions, so the same code
# serves one model and K copies of it (one per test point).
# --------------------------------------------------------------------------------------------
def logistic_losses(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example logistic losses: ``w`` (..., d), ``X`` (m, d), ``y`` (m,) -> (..., m)."""
    z = (X @ w.unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.softplus(z) - y * z


def softmax_losses(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy: ``W`` (..., d, C), ``X`` (m, d), ``y`` (m,) int -> (..., m)."""
    logits = X @ W
    picked = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, -1) - picked


def weighted_objective(losses: Losses, X: Tensor, y: Tensor, lam: float) -> Objective:
    """``J(w, eps) = sum_i eps_i loss_i(w) / n + lam/2 ||w||^2``; ``eps`` (..., n) -> (...)."""
    n = X.shape[0]

    def J(w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sq = w.pow(2).flatten(start_dim=eps.dim() - 1).sum(-1)
        return (eps * losses(w, X, y)).sum(-1) / n + 0.5 * lam * sq

    return J


def influence(J: Objective, w_star: Tensor, n: int, test_loss: Callable[[Tensor], Tensor], K: int,
              backward: il.linear.LinearSolver) -> tuple[Tensor, il.SolveInfo]:
    """Predicted change of ``K`` test losses when each of ``n`` training points is removed.

    Args:
        J: objective ``J(w, eps)`` accepting a batch of ``K`` models ``w`` (K, ...) and weights
            ``eps`` (K, n), returning (K,).
        w_star: the trained model, shape (...) (no batch dimension).
        n: number of training points.
        test_loss: ``test_loss(W)`` for the batch of models W (K, ...), returning the K test
            losses, one per model (model k is scored on test point k).
        K: number of test points.
        backward: the linear solver of the implicit backward pass.

    Returns:
        ``(delta, info)``: ``delta`` (K, n), ``delta[k, i] = -d test_loss_k / d eps_i`` at
        ``eps = 1``, and the argmin's SolveInfo (``info.backward`` describes the adjoint solve).
    """
    eps = torch.ones(K, n, dtype=w_star.dtype, requires_grad=True)
    W0 = w_star.detach().expand(K, *w_star.shape).clone()
    # Started at the minimiser, the forward solve stops at once (atol: the gradient there is
    # already ~1e-11); only the backward solve does work.
    W, info = il.argmin(J, W0, eps, solver=il.solvers.Newton(atol=1e-9), backward=backward,
                        batched=True, return_info=True)
    test_loss(W).sum().backward()
    return -eps.grad, info


def lissa_influence(J: Objective, losses: Losses, Xtr: Tensor, ytr: Tensor, lam: float,
                    w_star: Tensor, grad_test: Tensor, lissa: il.linear.LiSSA, batch_size: int,
                    seed: int) -> tuple[Tensor, il.SolveInfo]:
    """The same quantity with LiSSA over minibatch Hessian-vector products.

    Solves ``H u_k = grad test_loss_k`` with a stochastic operator (each product draws a fresh
    minibatch of ``batch_size`` examples), then applies the mixed derivative
    ``d^2 J / d eps d w`` by autograd: the second half of what the implicit backward does.

    Args:
        J: objective as in :func:`influence`.
        losses: per-example loss ``losses(w, X, y)``.
        Xtr, ytr: training data (n, d), (n,).
        lam: L2 weight.
        w_star: trained model (d,).
        grad_test: test-loss gradients (K, d).
        lissa: an ``il.linear.LiSSA``.
        batch_size: examples per Hessian-vector product.
        seed: seed of the minibatch sampler.

    Returns:
        ``(delta, info)`` as in :func:`influence`, ``info`` from ``il.linear.solve``.
    """
    (K, d), n = grad_test.shape, Xtr.shape[0]
    gen = torch.Generator().manual_seed(seed)
    w = w_star.detach().requires_grad_(True)

    def minibatch_hvp(V: torch.Tensor) -> torch.Tensor:  # V (K, d) -> H_batch V (K, d)
        idx = torch.randperm(n, generator=gen)[:batch_size]
        J_batch = losses(w, Xtr[idx], ytr[idx]).mean() + 0.5 * lam * (w @ w)
        (g,) = torch.autograd.grad(J_batch, w, create_graph=True)
        return torch.autograd.grad(g, w, V, is_grads_batched=True)[0]

    H = il.linear.FunctionOperator(minibatch_hvp, K, d, w.dtype, w.device, symmetric=True,
                                   positive_definite=True)
    U, info = il.linear.solve(H, grad_test, solver=lissa)
    eps = torch.ones(K, n, dtype=w.dtype, requires_grad=True)
    Wr = w.detach().expand(K, d).clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(J(Wr, eps).sum(), Wr, create_graph=True)
    (d_eps,) = torch.autograd.grad((gw * U).sum(), eps)
    # IFT: d test / d eps = -(d^2 J / d eps d w) u, and removing a point is eps_i: 1 -> 0.
    return d_eps, info


# --------------------------------------------------------------------------------------------
# The independent reference: plain Newton with a dense Hessian, no implicit_layers.
# --------------------------------------------------------------------------------------------
def newton_logistic(X: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lam: float,
                    w0: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise ``sum_i weights_i loss_i(w) / n + lam/2 ||w||^2`` to machine precision."""
    n, d = X.shape
    w = torch.zeros(d, dtype=X.dtype) if w0 is None else w0.clone()
    eye = torch.eye(d, dtype=X.dtype)
    for _ in range(50):
        p = torch.sigmoid(X @ w)
        g = X.T @ (weights * (p - y)) / n + lam * w
        H = (X.T * (weights * p * (1 - p))) @ X / n + lam * eye
        step = torch.linalg.solve(H, g)
        w = w - step
        if float(step.norm()) < 1e-12 * (1 + float(w.norm())):  # quadratic convergence: 1e-24 next
            break
    return w


def dense_softmax_influence(W: torch.Tensor, Xtr, ytr, Xte, yte, lam: float) -> torch.Tensor:
    """Exact influence by an explicit Hessian (closed form) and ``torch.linalg.solve``: (K, n)."""
    n, d = Xtr.shape
    C = W.shape[1]
    P = torch.softmax(Xtr @ W, -1)
    # Hessian of the mean cross-entropy: sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T / n.
    H = (torch.einsum("ia,ib,ic,ce->acbe", Xtr, Xtr, P, torch.eye(C, dtype=W.dtype))
         - torch.einsum("ia,ib,ic,ie->acbe", Xtr, Xtr, P, P)).reshape(d * C, d * C) / n
    H = H + lam * torch.eye(d * C, dtype=W.dtype)
    G_train = torch.einsum("ia,ic->iac", Xtr, P - torch.nn.functional.one_hot(ytr, C)).reshape(n, -1)
    Pt = torch.softmax(Xte @ W, -1)
    G_test = torch.einsum("ia,ic->iac", Xte, Pt - torch.nn.functional.one_hot(yte, C)).reshape(len(yte), -1)
    U = torch.linalg.solve(H, G_test.T)  # (dC, K)
    return (G_train @ U).T / n  # removing i changes test loss k by +g_k^T H^-1 g_i / n


# --------------------------------------------------------------------------------------------
# Part 1: breast_cancer, influence vs leave-one-out retraining.
# --------------------------------------------------------------------------------------------
def breast_cancer_part(args: argparse.Namespace) -> dict:
    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(y))
    n = args.n_train
    tr, te = perm[:n], perm[n:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    X = np.hstack([(X - mu) / sd, np.ones((len(X), 1))])  # standardized + bias column
    Xtr, ytr = torch.tensor(X[tr], dtype=DTYPE), torch.tensor(y[tr], dtype=DTYPE)
    Xte, yte = torch.tensor(X[te], dtype=DTYPE), torch.tensor(y[te], dtype=DTYPE)
    lam = args.lam
    J = weighted_objective(logistic_losses, Xtr, ytr, lam)
    d = Xtr.shape[1]

    w_star = il.argmin(lambda w: J(w, torch.ones(n, dtype=DTYPE)), torch.zeros(d, dtype=DTYPE),
                       solver=il.solvers.Newton())
    # The K test points the model gets most wrong: their losses are the interesting ones.
    K = args.test_points
    test_idx = torch.argsort(logistic_losses(w_star, Xte, yte), descending=True)[:K]
    Xq, yq = Xte[test_idx], yte[test_idx]

    def test_loss(W: torch.Tensor) -> torch.Tensor:  # W (K, d): model k on test point k
        z = (W * Xq).sum(-1)
        return torch.nn.functional.softplus(z) - yq * z

    t0 = time.perf_counter()
    pred, info = influence(J, w_star, n, test_loss, K, il.linear.CG())
    t_cg = time.perf_counter() - t0

    # Leave-one-out retraining for the most influential points of each test point + random ones.
    top = torch.argsort(pred.abs(), dim=1, descending=True)[:, : args.loo_top].flatten()
    rand = torch.as_tensor(rng.choice(n, args.loo_random, replace=False))
    chosen = torch.unique(torch.cat([top, rand]))
    ones = torch.ones(n, dtype=DTYPE)
    w_ref = newton_logistic(Xtr, ytr, ones, lam)
    base = logistic_losses(w_ref, Xq, yq)
    actual = torch.empty(K, len(chosen), dtype=DTYPE)
    t0 = time.perf_counter()
    for j, i in enumerate(tqdm(chosen.tolist(), desc="leave-one-out retraining", leave=False)):
        # Point i gets weight 0 in the same objective (eps_i = 0, the rest unchanged): the
        # model whose test loss the influence linearises. Cold start, as retraining would.
        mask = ones.clone()
        mask[i] = 0.0
        actual[:, j] = logistic_losses(newton_logistic(Xtr, ytr, mask, lam), Xq, yq) - base
    t_retrain = (time.perf_counter() - t0) / len(chosen)
    p_sel = pred[:, chosen].detach()

    pearson = [float(stats.pearsonr(p_sel[k], actual[k]).statistic) for k in range(K)]
    spearman = [float(stats.spearmanr(p_sel[k], actual[k]).statistic) for k in range(K)]

    # LiSSA, stochastic: minibatch Hessian-vector products, same test points.
    W = w_star.detach().expand(K, d).clone().requires_grad_(True)
    (g_test,) = torch.autograd.grad(test_loss(W).sum(), W)
    # LiSSA's scale must bound the Hessian's spectrum: twice the largest eigenvalue of the full
    # Hessian leaves room for minibatch Hessians, whose spectra are wider.
    lam_max = float(torch.linalg.eigvalsh(
        torch.autograd.functional.hessian(lambda w: J(w, ones), w_star.detach()))[-1])
    lissa = il.linear.LiSSA(scale=args.lissa_scale_factor * lam_max, damping=0.0,
                            depth=args.lissa_depth, repeats=args.lissa_repeats, rtol=0.0,
                            on_failure="ignore")
    t0 = time.perf_counter()
    pred_lissa, lissa_info = lissa_influence(J, logistic_losses, Xtr, ytr, lam, w_star, g_test,
                                             lissa, args.lissa_batch, args.seed)
    t_lissa = time.perf_counter() - t0
    lissa_vs_cg = float(stats.pearsonr(pred_lissa.flatten(), pred.flatten().detach()).statistic)
    lissa_vs_loo = [float(stats.pearsonr(pred_lissa[k, chosen], actual[k]).statistic)
                    for k in range(K)]

    return {
        "n_train": n, "n_features": d - 1, "lam": lam, "test_points": K,
        "loo_points": len(chosen),
        "pearson": pearson, "spearman": spearman,
        "pearson_min": min(pearson), "spearman_min": min(spearman),
        "cg_steps": info.backward.steps.tolist(),
        "time_influence_all_points_s": t_cg,
        "time_influence_per_test_point_s": t_cg / K,
        "time_retrain_per_point_s": t_retrain,
        "time_retrain_all_points_s": t_retrain * n,
        "lissa": {"scale": lissa.scale, "depth": args.lissa_depth, "repeats": args.lissa_repeats,
                  "batch": args.lissa_batch, "time_s": t_lissa,
                  "pearson_vs_cg": lissa_vs_cg, "pearson_vs_loo": lissa_vs_loo,
                  "minibatch_hvps": int(lissa_info.steps.max()),
                  "rel_err_vs_cg": float((pred_lissa - pred.detach()).norm() / pred.detach().norm())},
        "_plot": (p_sel, actual, pred_lissa.detach(), pred.detach()),
    }


# --------------------------------------------------------------------------------------------
# Part 2: digits softmax regression, CG influence vs exact dense influence.
# --------------------------------------------------------------------------------------------
def digits_part(args: argparse.Namespace) -> dict:
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(y))
    n, K = args.digits_train, args.digits_test
    X = np.hstack([X / 16.0, np.ones((len(X), 1))])
    Xtr, ytr = torch.tensor(X[perm[:n]], dtype=DTYPE), torch.tensor(y[perm[:n]])
    Xte, yte = torch.tensor(X[perm[n:n + K]], dtype=DTYPE), torch.tensor(y[perm[n:n + K]])
    d, C, lam = Xtr.shape[1], 10, args.digits_lam
    J = weighted_objective(softmax_losses, Xtr, ytr, lam)

    t0 = time.perf_counter()
    W_star = il.argmin(lambda W: J(W, torch.ones(n, dtype=DTYPE)), torch.zeros(d, C, dtype=DTYPE),
                       solver=il.solvers.Newton())
    t_train = time.perf_counter() - t0

    def test_loss(W: torch.Tensor) -> torch.Tensor:  # W (K, d, C); model k on test point k
        logits = (Xte.unsqueeze(1) @ W).squeeze(1)
        return torch.logsumexp(logits, -1) - logits.gather(-1, yte.unsqueeze(-1)).squeeze(-1)

    t0 = time.perf_counter()
    pred, info = influence(J, W_star, n, test_loss, K, il.linear.CG())
    t_cg = time.perf_counter() - t0
    # A looser backward tolerance: fewer Hessian-vector products, still a faithful ranking.
    t0 = time.perf_counter()
    pred_loose, info_loose = influence(J, W_star, n, test_loss, K, il.linear.CG(rtol=1e-4))
    t_loose = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = dense_softmax_influence(W_star.detach(), Xtr, ytr, Xte, yte, lam)
    t_dense = time.perf_counter() - t0
    pred, pred_loose = pred.detach(), pred_loose.detach()
    return {
        "n_train": n, "test_points": K, "parameters": d * C, "lam": lam,
        "pearson_vs_dense": float(stats.pearsonr(pred.flatten(), exact.flatten()).statistic),
        "rel_err_vs_dense": float((pred - exact).norm() / exact.norm()),
        "cg_steps_max": int(info.backward.steps.max()),
        "time_train_s": t_train, "time_cg_influence_s": t_cg, "time_dense_influence_s": t_dense,
        "cg_rtol_1e-4": {
            "pearson_vs_dense": float(stats.pearsonr(pred_loose.flatten(), exact.flatten()).statistic),
            "rel_err_vs_dense": float((pred_loose - exact).norm() / exact.norm()),
            "cg_steps_max": int(info_loose.backward.steps.max()), "time_s": t_loose},
        "_plot": (pred, exact),
    }


def plot(bc: dict, dg: dict, out: Path) -> Path:
    p_sel, actual, pred_lissa, pred_cg = (t.numpy() for t in bc.pop("_plot"))
    pred, exact = (t.numpy() for t in dg.pop("_plot"))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    for k in range(actual.shape[0]):
        ax[0].scatter(actual[k], p_sel[k], s=12, label=f"test point {k}")
    lim = float(max(abs(actual).max(), abs(p_sel).max())) * 1.05
    for a in ax[:2]:
        a.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax[0].set(xlabel="actual change in test loss (leave-one-out retraining)",
              ylabel="predicted (influence, CG)",
              title=f"breast_cancer: Pearson >= {bc['pearson_min']:.3f}")
    ax[0].legend(fontsize=7)
    ax[1].scatter(pred_cg.flatten(), pred_lissa.flatten(), s=4, alpha=0.5)
    ax[1].set(xlabel="influence, CG", ylabel="influence, LiSSA (minibatch)",
              title=f"LiSSA vs CG: Pearson {bc['lissa']['pearson_vs_cg']:.3f}")
    ax[2].scatter(exact.flatten(), pred.flatten(), s=2, alpha=0.4)
    ax[2].set(xlabel="exact dense influence", ylabel="influence, CG",
              title=f"digits {dg['test_points']}x{dg['n_train']}: Pearson "
                    f"{dg['pearson_vs_dense']:.6f}")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "influence_scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run both parts; return the measured figures (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/influence_functions, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these problems are small, and thread "
                             "synchronisation dominates small products on a busy machine)")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "influence_functions")
    full = not args.tiny
    args.n_train = 400 if full else 150
    args.lam = 1e-2
    args.test_points = 5 if full else 2
    args.loo_top = 30 if full else 10
    args.loo_random = 20 if full else 5
    args.lissa_scale_factor = 2.0
    args.lissa_depth = 1000 if full else 500
    args.lissa_repeats = 4 if full else 2
    args.lissa_batch = 100 if full else 50
    args.digits_train = 1000 if full else 200
    args.digits_test = 20 if full else 5
    args.digits_lam = 1e-3

    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        bc = breast_cancer_part(args)
        dg = digits_part(args)
    finally:
        torch.set_num_threads(threads)
    path = plot(bc, dg, args.out)
    result = {"breast_cancer": bc, "digits": dg, "plot": str(path)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
