"""Composite argmin and least squares side by side with jaxopt, optimistix and scipy.

* the lasso hypergradient of jaxopt's example (diabetes, λ = exp(θ), θ = 1): error against the
  active-set closed form and time per hypergradient, ours (ProximalGradient; eager, and with
  ``compile=True``, the whole forward solve one compiled loop, outside ``--tiny``) against
  jaxopt's ProximalGradient with implicit differentiation under jit;
* a simplex-constrained least-squares fit, d(cᵀw*)/db: ours (eager and ``compile=True``, as
  above) against jaxopt's ProjectedGradient;
* batched curve fits (nonzero residual), B = 1 / 64 / 1024: solution error against a tight scipy
  solve polished by Newton steps (closed-form Hessian) and time of the forward solve alone (no
  gradient, for every method), ours (LevenbergMarquardt, batched; eager, and with
  ``compile=True``, the whole solve one compiled loop, outside ``--tiny``) against optimistix's
  LevenbergMarquardt under jit(vmap) and, for B <= 64, a loop of scipy's ``least_squares``.

Times are the suite's (:func:`benchmarks._common.time_alternating`: every method of a case in
the same process, alternating, median process CPU time on one pinned core); a peer that is not
installed is skipped with a note. Part of ``python -m benchmarks.run`` (section ``composite``);
alone, ``python -m benchmarks.composite`` (``--tiny`` for a smoke run) prints the rows and the
targets and writes nothing; ``--cases curves`` runs the curve fits alone.

``--side-by-side CALLS`` measures the single fit (B = 1) alone: ours with ``compile=True`` and
optimistix alternated call by call, ``CALLS`` pairs in one process (the order within a pair
swapped every pair), and reports the median process CPU time of each and the median of the
per-pair ratios, with the spread of that ratio over ten consecutive blocks of pairs. Load that
comes and goes on a shared machine then weighs on both methods alike, which the suite's rounds
of many calls per method do not ensure (their B = 1 ratio moved between 1.0x and 2.4x from
run to run).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import datasets, model_selection, preprocessing

if __package__ in (None, ""):  # run as a script: python benchmarks/composite.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import implicit_layers as il  # noqa: E402
from benchmarks._common import (  # noqa: E402
    Config,
    Section,
    _block,
    add_failures,
    peer_or_note,
    restore_threads,
    set_threads,
    time_alternating,
)

__all__ = ["run_composite"]

D = torch.float64
#: The issue's accuracy targets in float64: hypergradients (relative) and solutions (absolute).
HYPERGRAD_TOL, SOLUTION_TOL = 1e-6, 1e-8


def _record(
    section: Section, case: str, methods: dict[str, Callable[[], Any]], error: Callable[[Any], float],
    column: str, tol: float, goal_ratio: float, cfg: Config,
) -> None:
    """Time ``methods`` alternately, add one row each with ``column`` = ``error(result)``, and
    the targets: our accuracy, and our time against each peer's (a ratio from the same run)."""
    times, outs = time_alternating(methods, cfg)
    for name, seconds in times.items():
        section.add(case=case, method=name, time_ms=1e3 * seconds, **{column: error(outs[name])})
    add_failures(section, case)
    for own in (k for k in times if k.startswith("ours")):
        err = error(outs[own])
        section.target(f"{case}: {own} {column}", f"<= {tol:.0e}", err, err <= tol)
        for peer in (k for k in times if not k.startswith(("ours", "scipy"))):
            ratio = times[own] / times[peer]
            section.target(f"{case}: {own}/{peer}", f"<= {goal_ratio}", ratio, ratio <= goal_ratio,
                           f"{1e3 * times[own]:.2f} vs {1e3 * times[peer]:.2f} ms")


def _ours_and_compiled(
    cfg: Config, section: Section, case: str, ours: Callable[[Any], Any], compiled: il.solvers.ForwardSolver,
) -> dict[str, Callable[[], Any]]:
    """The methods ``ours`` (``ours(None)``: the default solver) and, outside ``--tiny``,
    ``ours (compile=True)`` (``ours(compiled)``), whose first call compiles (seconds): made
    here, timed apart and noted, not counted."""
    methods: dict[str, Callable[[], Any]] = {"ours": lambda: ours(None)}
    if not cfg.tiny:
        methods["ours (compile=True)"] = lambda: ours(compiled)
        start = time.perf_counter()
        ours(compiled)
        section.notes.append(f"{case}: the first call of ours (compile=True) took "
                             f"{time.perf_counter() - start:.1f} s (compilation), not counted.")
    return methods


def _lasso(cfg: Config, section: Section) -> None:
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

    def ours(solver: il.solvers.ProximalGradient | None) -> torch.Tensor:
        theta = torch.tensor(1.0, dtype=D, requires_grad=True)
        wt = il.argmin(lambda w: 0.5 * (Xt @ w - yt).square().mean(), torch.zeros(10, dtype=D),
                       prox=il.prox.bind(il.prox.l1, torch.exp(theta)), solver=solver)
        (g,) = torch.autograd.grad((Xv @ wt - yv).square().mean(), theta)
        return g

    methods = _ours_and_compiled(cfg, section, "lasso hypergradient", ours,
                                 il.solvers.ProximalGradient(compile=True))
    peers = peer_or_note(section, "jax", "jaxopt")
    if peers is not None:
        jax, _ = peers
        import jax.numpy as jnp
        from jaxopt import ProximalGradient, objective, prox

        data = (jnp.asarray(Xtr), jnp.asarray(ytr))

        @jax.jit
        def peer(theta: Any) -> Any:
            def outer(theta: Any) -> Any:
                solver = ProximalGradient(fun=objective.least_squares, prox=prox.prox_lasso,
                                          implicit_diff=True, maxiter=5000, tol=1e-10)
                wj = solver.run(jnp.zeros(10), jnp.exp(theta), data).params
                return jnp.mean((jnp.asarray(Xval) @ wj - jnp.asarray(yval)) ** 2)

            return jax.grad(outer)(theta)

        theta = jnp.asarray(1.0)
        methods["jaxopt ProximalGradient (jit)"] = lambda: peer(theta)
    _record(section, "lasso hypergradient (diabetes)", methods,
            lambda g: abs(float(g) - exact) / abs(exact), "hypergrad_rel_err", HYPERGRAD_TOL, 1.5, cfg)


def _simplex(cfg: Config, section: Section) -> None:
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

    def ours(solver: il.solvers.ProximalGradient | None) -> torch.Tensor:
        bb = bt.clone().requires_grad_(True)
        wt = il.argmin(lambda w, b: 0.5 * (At @ w - b).square().sum(), torch.zeros(20, dtype=D),
                       bb, constraint=il.projection.simplex, solver=solver)
        return torch.autograd.grad(ct @ wt, bb)[0]

    methods = _ours_and_compiled(cfg, section, "simplex fit", ours,
                                 il.solvers.ProximalGradient(compile=True))
    peers = peer_or_note(section, "jax", "jaxopt")
    if peers is not None:
        jax, _ = peers
        import jax.numpy as jnp
        from jaxopt import ProjectedGradient
        from jaxopt.projection import projection_simplex

        Aj, cj = jnp.asarray(A), jnp.asarray(c)

        @jax.jit
        def peer(b: Any) -> Any:
            def out(b: Any) -> Any:
                pg = ProjectedGradient(fun=lambda w, b: 0.5 * jnp.sum((Aj @ w - b) ** 2),
                                       projection=projection_simplex, implicit_diff=True,
                                       maxiter=5000, tol=1e-10)
                return cj @ pg.run(jnp.zeros(20), hyperparams_proj=None, b=b).params

            return jax.grad(out)(b)

        bj = jnp.asarray(b)
        methods["jaxopt ProjectedGradient (jit)"] = lambda: peer(bj)

    def error(g: Any) -> float:
        return float(np.abs(np.asarray(g) - exact).max() / np.abs(exact).max())

    _record(section, f"simplex fit d(cᵀw)/db (support {k}/20)", methods, error, "hypergrad_rel_err",
            HYPERGRAD_TOL, 1.5, cfg)


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


def _residual_jacobian_hessian(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """``r``, ``J`` and the full Hessian ``JᵀJ + Σ rᵢ ∇²rᵢ`` of ``½‖r‖²`` for one curve at ``w``
    (closed form)."""
    e, s = np.exp(-w[1] * T), np.sin(3 * T)
    r = w[0] * e + w[2] * s - y
    J = np.stack([e, -w[0] * T * e, s], 1)
    # Σ rᵢ ∇²rᵢ: only ∂²r/∂a∂b = -t e and ∂²r/∂b² = a t² e are nonzero.
    second = np.zeros((3, 3))
    second[0, 1] = second[1, 0] = -(r * T * e).sum()
    second[1, 1] = (r * w[0] * T**2 * e).sum()
    return r, J, J.T @ J + second


def _reference_fit(y: np.ndarray) -> np.ndarray:
    """The exact fit of one curve: scipy's ``least_squares`` at 1e-15, then Newton steps on the
    gradient with the closed-form Hessian of ``½‖r‖²``. scipy stops on its cost test, which
    rounding stalls with gradients up to ~1e-8 on some curves (solution errors ~1e-8); the
    Newton steps bring the gradient to rounding level."""
    w = _scipy_fit(y, tight=True)
    for _ in range(3):
        r, J, H = _residual_jacobian_hessian(y, w)
        w = w - np.linalg.solve(H, J.T @ r)
    return w


def _reference_gradient(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``d(Σ w*)/dy`` of one curve at its exact fit ``w``: ``∂(Jᵀr)/∂y = -Jᵀ``, so ``dw*/dy =
    H⁻¹Jᵀ`` with ``H`` the full Hessian of ``½‖r‖²``, and the gradient is ``J H⁻¹ 1``."""
    _, J, H = _residual_jacobian_hessian(y, w)
    return J @ np.linalg.solve(H, np.ones(3))


def _optimistix_fit(section: Section) -> tuple[Any, Callable[[Any], Any]] | None:
    """``(jax, fit)``: ``fit(y)`` one curve's fit by optimistix's LevenbergMarquardt, or None
    (noted) when the peer is not installed."""
    peers = peer_or_note(section, "jax", "optimistix")
    if peers is None:
        return None
    jax, optx = peers
    import jax.numpy as jnp

    tj = jnp.asarray(T)
    lm = optx.LevenbergMarquardt(rtol=1e-10, atol=1e-12)

    def one(y: Any) -> Any:
        def fn(w: Any, y: Any) -> Any:
            return w[0] * jnp.exp(-w[1] * tj) + w[2] * jnp.sin(3 * tj) - y

        return optx.least_squares(fn, lm, jnp.ones(3), args=y, max_steps=200, throw=False).value

    return jax, one


def _optimistix_fits(section: Section) -> Callable[[Any], Any] | None:
    """optimistix's LevenbergMarquardt on a batch of curves under jit(vmap), or None (noted)."""
    peer = _optimistix_fit(section)
    if peer is None:
        return None
    jax, one = peer
    return jax.jit(jax.vmap(one))


def _optimistix_gradients(section: Section) -> Callable[[Any], Any] | None:
    """``d(Σ w*)/dY`` through optimistix's LevenbergMarquardt (its implicit adjoint, the
    default) under jit(grad(vmap)), or None (noted)."""
    peer = _optimistix_fit(section)
    if peer is None:
        return None
    jax, one = peer
    return jax.jit(jax.grad(lambda Y: jax.vmap(one)(Y).sum()))


def _least_squares(cfg: Config, section: Section) -> None:
    peer = _optimistix_fits(section)
    for B in [1, 8] if cfg.tiny else [1, 64, 1024]:
        _fit_case(cfg, section, B, peer)
    if not cfg.tiny:
        peer_grad = _optimistix_gradients(section)
        for B in [1, 64]:
            _gradient_case(cfg, section, B, peer_grad)


def _gradient_case(cfg: Config, section: Section, B: int, peer: Callable[[Any], Any] | None) -> None:
    """Forward and backward: ``d(Σ w*)/dY`` for a batch of curve fits (no target in the issue;
    shown for what a training step through the fitting layer costs)."""
    t = torch.tensor(T)
    Y = _curves(B)
    ref = np.stack([_reference_gradient(y, _reference_fit(y)) for y in Y])

    def residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return w[:, :1] * torch.exp(-w[:, 1:2] * t) + w[:, 2:3] * torch.sin(3 * t) - Y

    compiled = il.solvers.LevenbergMarquardt(compile=True)

    def ours(solver: il.solvers.LevenbergMarquardt) -> torch.Tensor:
        Yt = torch.tensor(Y, requires_grad=True)
        W = il.least_squares(residual, torch.ones(B, 3, dtype=D), Yt, batched=True, solver=solver)
        return torch.autograd.grad(W.sum(), Yt)[0]

    methods: dict[str, Callable[[], Any]] = {
        "ours": lambda: ours(il.solvers.LevenbergMarquardt()),
        "ours (compile=True)": lambda: ours(compiled),
    }
    if peer is not None:
        import jax.numpy as jnp

        Yj = jnp.asarray(Y)
        methods["optimistix LevenbergMarquardt (jit, grad, vmap)"] = lambda: peer(Yj)
    times, outs = time_alternating(methods, cfg)
    case = f"curve fit gradients B={B} (forward + backward)"
    for name, seconds in times.items():
        err = float(np.abs(np.asarray(outs[name]) - ref).max() / np.abs(ref).max())
        section.add(case=case, method=name, time_ms=1e3 * seconds, grad_rel_err=err)
    add_failures(section, case)


def _fit_case(cfg: Config, section: Section, B: int, peer: Callable[[Any], Any] | None) -> None:
    t = torch.tensor(T)
    Y = _curves(B)
    ref = np.stack([_reference_fit(y) for y in Y])
    Yt = torch.tensor(Y)

    def residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return w[:, :1] * torch.exp(-w[:, 1:2] * t) + w[:, 2:3] * torch.sin(3 * t) - Y

    def ours(solver: il.solvers.LevenbergMarquardt | None) -> torch.Tensor:
        return il.least_squares(residual, torch.ones(B, 3, dtype=D), Yt, batched=True, solver=solver)

    methods = _ours_and_compiled(cfg, section, f"curve fits B={B}", ours,
                                 il.solvers.LevenbergMarquardt(compile=True))
    if peer is not None:
        import jax.numpy as jnp

        Yj = jnp.asarray(Y)
        methods["optimistix LevenbergMarquardt (jit, vmap)"] = lambda: peer(Yj)
    if B <= 64:
        methods["scipy least_squares (loop)"] = lambda: np.stack([_scipy_fit(y) for y in Y])
    # One call is the B = 1 case (<= 1.5x the peer); batches should be <= 0.5x.
    _record(section, f"curve fits B={B}", methods, lambda w: float(np.abs(np.asarray(w) - ref).max()),
            "sol_abs_err", SOLUTION_TOL, 1.5 if B == 1 else 0.5, cfg)


def alternate_pairs(
    a: Callable[[], Any], b: Callable[[], Any], calls: int, blocks: int = 10,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, float]:
    """Time ``a`` and ``b`` in ``calls`` pairs of consecutive calls (``a`` first in even pairs,
    ``b`` first in odd ones), each call on ``clock`` (process CPU time by default).

    Returns:
        ``a_ms`` and ``b_ms``, the median time of a call of each; ``ratio``, the median of the
        per-pair ratios ``a / b``; ``ratio_low`` and ``ratio_high``, the smallest and largest
        median per-pair ratio among ``blocks`` consecutive blocks of pairs (how much it moves
        within the run).
    """
    if calls < blocks:
        raise ValueError(f"calls must be at least blocks = {blocks}, got {calls}.")

    def timed(fn: Callable[[], Any]) -> float:
        start = clock()
        _block(fn())
        return clock() - start

    ta, tb = [], []
    for i in range(calls):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    size = calls // blocks
    per_block = [statistics.median(ratios[k * size:(k + 1) * size]) for k in range(blocks)]
    return {"a_ms": 1e3 * statistics.median(ta), "b_ms": 1e3 * statistics.median(tb),
            "ratio": statistics.median(ratios), "ratio_low": min(per_block),
            "ratio_high": max(per_block)}


def side_by_side(calls: int) -> dict[str, float] | None:
    """The single curve fit (B = 1, forward solve): ours (``LevenbergMarquardt(compile=True)``)
    against optimistix's LevenbergMarquardt under jit(vmap), alternated call by call
    (:func:`alternate_pairs`), with both solutions' max abs errors (``ours_err``, ``peer_err``)
    against the polished reference fit. None when optimistix is not installed (printed)."""
    section = Section("side-by-side", "")
    peer = _optimistix_fits(section)
    if peer is None:
        print("\n".join(section.skipped))
        return None
    import jax.numpy as jnp

    t = torch.tensor(T)
    Y = _curves(1)
    ref = _reference_fit(Y[0])
    Yt, Yj = torch.tensor(Y), jnp.asarray(Y)

    def residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return w[:, :1] * torch.exp(-w[:, 1:2] * t) + w[:, 2:3] * torch.sin(3 * t) - Y

    compiled = il.solvers.LevenbergMarquardt(compile=True)

    def ours() -> torch.Tensor:
        return il.least_squares(residual, torch.ones(1, 3, dtype=D), Yt, batched=True, solver=compiled)

    w_ours, w_peer = ours(), peer(Yj)  # compiles both (not timed)
    for _ in range(20):  # warm
        ours(), peer(Yj).block_until_ready()
    out = alternate_pairs(ours, lambda: peer(Yj), calls)
    out["ours_err"] = float(np.abs(w_ours.numpy()[0] - ref).max())
    out["peer_err"] = float(np.abs(np.asarray(w_peer)[0] - ref).max())
    return out


#: The cases of this benchmark, by name.
CASES = {"lasso": _lasso, "simplex": _simplex, "curves": _least_squares}


def run_composite(cfg: Config, cases: tuple[str, ...] = tuple(CASES)) -> Section:
    """The lasso and simplex hypergradients and the curve fits (or the ``cases`` named), with
    their targets."""
    section = Section("composite", "Composite argmin and least squares against jaxopt, optimistix "
                      "and scipy (float64)")
    section.notes.append(
        "Hypergradient errors are relative to the active-set closed form (lasso) and the KKT system "
        "on the simplex face; curve-fit errors are max abs errors against scipy least_squares at "
        "1e-15 polished by Newton steps with the closed-form Hessian. Peers run under jax.jit. "
        "Curve fits time the forward solve alone (no gradient) for every method."
    )
    for name in cases:
        CASES[name](cfg, section)
    return section


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                        help="the cases to run (default: all)")
    parser.add_argument("--side-by-side", type=int, metavar="CALLS", default=0,
                        help="only the single curve fit (B = 1): ours (compile=True) and optimistix "
                        "alternated call by call, CALLS pairs (e.g. 2000)")
    args = parser.parse_args(argv)
    cfg = Config(tiny=args.tiny, repeats=args.repeats)
    prev = set_threads(cfg.threads)
    if args.side_by_side:
        try:
            pairs = side_by_side(args.side_by_side)
        finally:
            restore_threads(prev)
        if pairs is not None:
            print(f"curve fit B=1, {args.side_by_side} alternated pairs (median process CPU time): "
                  f"ours (compile=True) {pairs['a_ms']:.3f} ms, err {pairs['ours_err']:.1e}; "
                  f"optimistix LevenbergMarquardt (jit, vmap) {pairs['b_ms']:.3f} ms, err "
                  f"{pairs['peer_err']:.1e}; median ratio {pairs['ratio']:.2f}x (per block of "
                  f"{args.side_by_side // 10} pairs {pairs['ratio_low']:.2f}-{pairs['ratio_high']:.2f}x; "
                  "target <= 1.5x)")
        return Section("side-by-side", "")
    try:
        section = run_composite(cfg, tuple(args.cases))
    finally:
        restore_threads(prev)
    for row in section.rows:
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    for tgt in section.targets:
        verdict = "met" if tgt["met"] else "NOT met"
        print(f"target {tgt['name']}: {tgt['measured']:.3g} ({tgt['goal']}) {verdict}"
              + (f"; {tgt['detail']}" if tgt["detail"] else ""))
    for note in section.notes + section.skipped:
        print(note)
    return section


if __name__ == "__main__":
    main()
