"""Composite argmin and least squares side by side with jaxopt, optimistix and scipy.

* the lasso hypergradient of jaxopt's example (diabetes, λ = exp(θ), θ = 1): error against the
  active-set closed form and time per hypergradient, ours against jaxopt's ProximalGradient
  with implicit differentiation under jit;
* a nonlinear curve fit (nonzero residual): solution error against a tight scipy solve and
  time, ours (LevenbergMarquardt) against optimistix's LevenbergMarquardt under jit and scipy's
  ``least_squares``;
* batched curve fits, B = 1 / 64 / 1024: ours batched against optimistix under jit(vmap).

Run ``python -m benchmarks.composite`` (``--tiny`` for a smoke run). Prints one line per case
with the ratio ours / peer measured in the same run; writes nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn import datasets, model_selection, preprocessing

import implicit_layers as il

D = torch.float64


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (and jit compilation for the peers)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _lasso(repeats: int) -> None:
    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    Xtr, Xval, ytr, yval = model_selection.train_test_split(X, y, test_size=0.33, random_state=0)
    # The exact value from the active set of a tight solve.
    lam = math.e
    w = il.argmin(lambda w: 0.5 * (torch.tensor(Xtr) @ w - torch.tensor(ytr)).square().mean(),
                  torch.zeros(10, dtype=D), prox=il.prox.bind(il.prox.l1, lam),
                  solver=il.solvers.ProximalGradient(rtol=1e-14, on_failure="ignore")).numpy()
    S = np.abs(w) > 0
    n = len(ytr)
    dw = np.zeros(10)
    dw[S] = -n * lam * np.linalg.solve(Xtr[:, S].T @ Xtr[:, S], np.sign(w[S]))
    exact = 2 / len(yval) * (Xval @ w - yval) @ Xval @ dw

    Xt, Xv, yt, yv = (torch.tensor(a) for a in (Xtr, Xval, ytr, yval))

    def ours() -> float:
        theta = torch.tensor(1.0, dtype=D, requires_grad=True)
        wt = il.argmin(lambda w: 0.5 * (Xt @ w - yt).square().mean(), torch.zeros(10, dtype=D),
                       prox=il.prox.bind(il.prox.l1, torch.exp(theta)))
        (g,) = torch.autograd.grad((Xv @ wt - yv).square().mean(), theta)
        return float(g)

    line = f"lasso hypergradient  exact {exact:.6f}  ours err {abs(ours() - exact) / abs(exact):.1e}"
    t_ours = _time(ours, repeats)
    line += f"  {t_ours * 1e3:.2f} ms"
    try:
        import jax
        import jax.numpy as jnp
        from jaxopt import ProximalGradient, objective, prox

        jax.config.update("jax_enable_x64", True)
        data = (jnp.asarray(Xtr), jnp.asarray(ytr))

        @jax.jit
        def peer(theta: jax.Array) -> jax.Array:
            def outer(theta: jax.Array) -> jax.Array:
                solver = ProximalGradient(fun=objective.least_squares, prox=prox.prox_lasso,
                                          implicit_diff=True, maxiter=5000, tol=1e-10)
                wj = solver.run(jnp.zeros(10), jnp.exp(theta), data).params
                return jnp.mean((jnp.asarray(Xval) @ wj - jnp.asarray(yval)) ** 2)

            return jax.grad(outer)(theta)

        theta = jnp.asarray(1.0)
        g_peer = float(peer(theta))
        t_peer = _time(lambda: peer(theta).block_until_ready(), repeats)
        line += (f" | jaxopt err {abs(g_peer - exact) / abs(exact):.1e}  {t_peer * 1e3:.2f} ms"
                 f" | ratio ours/jaxopt {t_ours / t_peer:.2f}")
    except ImportError as err:
        line += f" | jaxopt unavailable ({err})"
    print(line)


def _simplex(repeats: int) -> None:
    """A simplex-constrained least-squares fit, d(cᵀw*)/db: ours against jaxopt's
    ProjectedGradient with implicit differentiation; the reference is the KKT system on the
    support of a tight solve."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((60, 20))
    b = rng.standard_normal(60)
    c = np.arange(20.0)
    At, bt, ct = torch.tensor(A), torch.tensor(b), torch.tensor(c)
    tight = il.solvers.ProximalGradient(rtol=1e-14, on_failure="ignore")
    w = il.argmin(lambda w: 0.5 * (At @ w - bt).square().sum(), torch.zeros(20, dtype=D),
                  constraint=il.projection.simplex, solver=tight).numpy()
    S = w > 0
    k = int(S.sum())
    K = np.zeros((k + 1, k + 1))
    K[:k, :k] = A[:, S].T @ A[:, S]
    K[:k, k] = K[k, :k] = 1.0
    exact = A[:, S] @ np.linalg.solve(K, np.concatenate([c[S], [0.0]]))[:k]

    def ours() -> np.ndarray:
        bb = bt.clone().requires_grad_(True)
        wt = il.argmin(lambda w, b: 0.5 * (At @ w - b).square().sum(), torch.zeros(20, dtype=D),
                       bb, constraint=il.projection.simplex)
        return torch.autograd.grad(ct @ wt, bb)[0].numpy()

    err = float(np.abs(ours() - exact).max() / np.abs(exact).max())
    t_ours = _time(ours, repeats)
    line = f"simplex fit d/db (support {k}/20)  ours err {err:.1e}  {t_ours * 1e3:.2f} ms"
    try:
        import jax
        import jax.numpy as jnp
        from jaxopt import ProjectedGradient
        from jaxopt.projection import projection_simplex

        jax.config.update("jax_enable_x64", True)
        Aj, cj = jnp.asarray(A), jnp.asarray(c)

        @jax.jit
        def peer(b: jax.Array) -> jax.Array:
            def out(b: jax.Array) -> jax.Array:
                pg = ProjectedGradient(fun=lambda w, b: 0.5 * jnp.sum((Aj @ w - b) ** 2),
                                       projection=projection_simplex, implicit_diff=True,
                                       maxiter=5000, tol=1e-10)
                return cj @ pg.run(jnp.zeros(20), hyperparams_proj=None, b=b).params

            return jax.grad(out)(b)

        bj = jnp.asarray(b)
        err_p = float(np.abs(np.asarray(peer(bj)) - exact).max() / np.abs(exact).max())
        t_peer = _time(lambda: peer(bj).block_until_ready(), repeats)
        line += (f" | jaxopt err {err_p:.1e}  {t_peer * 1e3:.2f} ms"
                 f" | ratio ours/jaxopt {t_ours / t_peer:.2f}")
    except ImportError as err_import:
        line += f" | jaxopt unavailable ({err_import})"
    print(line)


T = np.linspace(0, 2, 25)


def _curves(B: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    amp = 1 + rng.random((B, 1))
    rate = 0.5 + rng.random((B, 1))
    return amp * np.exp(-rate * T) + 0.5 * np.sin(3 * T) + 0.05 * rng.standard_normal((B, T.size))


def _scipy_fit(y: np.ndarray, tight: bool = False) -> np.ndarray:
    from scipy.optimize import least_squares

    def fun(w: np.ndarray) -> np.ndarray:
        return w[0] * np.exp(-w[1] * T) + w[2] * np.sin(3 * T) - y

    tol = 1e-15 if tight else 1e-10
    return least_squares(fun, np.ones(3), xtol=tol, ftol=tol, gtol=tol, method="lm").x


def _least_squares(sizes: list[int], repeats: int) -> None:
    peer: Callable | None
    try:
        import jax
        import jax.numpy as jnp
        import optimistix as optx

        jax.config.update("jax_enable_x64", True)
        tj = jnp.asarray(T)
        lm = optx.LevenbergMarquardt(rtol=1e-10, atol=1e-12)

        def one(y: jax.Array) -> jax.Array:
            def fn(w: jax.Array, y: jax.Array) -> jax.Array:
                return w[0] * jnp.exp(-w[1] * tj) + w[2] * jnp.sin(3 * tj) - y

            return optx.least_squares(fn, lm, jnp.ones(3), args=y, max_steps=200, throw=False).value

        peer = jax.jit(jax.vmap(one))
    except ImportError:
        peer = None
    for B in sizes:
        print(_fit_case(B, peer, repeats))


def _fit_case(B: int, peer: Callable | None, repeats: int) -> str:
    t = torch.tensor(T)
    Y = _curves(B)
    ref = np.stack([_scipy_fit(y, tight=True) for y in Y])
    Yt = torch.tensor(Y)

    def ours() -> torch.Tensor:
        return il.least_squares(
            lambda w, Y: w[:, :1] * torch.exp(-w[:, 1:2] * t) + w[:, 2:3] * torch.sin(3 * t) - Y,
            torch.ones(B, 3, dtype=D), Yt, batched=True)

    err = float(np.abs(ours().numpy() - ref).max())
    t_ours = _time(ours, repeats)
    line = f"curve fits B={B:5d}  ours err {err:.1e}  {t_ours * 1e3:.2f} ms"
    if peer is not None:
        import jax.numpy as jnp

        Yj = jnp.asarray(Y)
        err_p = float(np.abs(np.asarray(peer(Yj)) - ref).max())
        t_peer = _time(lambda: peer(Yj).block_until_ready(), repeats)
        line += (f" | optimistix err {err_p:.1e}  {t_peer * 1e3:.2f} ms"
                 f" | ratio ours/optimistix {t_ours / t_peer:.2f}")
    if B <= 64:
        t_scipy = _time(lambda: [_scipy_fit(y) for y in Y], max(1, repeats // 2))
        line += f" | scipy loop {t_scipy * 1e3:.2f} ms, ratio ours/scipy {t_ours / t_scipy:.2f}"
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 2 if args.tiny else 20
    _lasso(repeats)
    _simplex(repeats)
    _least_squares([1, 8] if args.tiny else [1, 64, 1024], repeats)


if __name__ == "__main__":
    main()
