"""``ProximalGradient(compile=True)``: the whole proximal-gradient solve as one compiled loop.

Each new objective, prox, batch size, dtype or setting compiles (seconds), so the tests share
a few problems and shapes, and the ones that compile are marked slow.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import implicit_layers as il
from implicit_layers._composite import CompositeProblem
from implicit_layers._problem import Problem
from implicit_layers.linear._power import seeded_start
from implicit_layers.solvers._pg_loop import LoopSettings, pg_loop
from tests.helpers import assert_falls_back_to_eager_once

D = torch.float64
B, M, N = 4, 60, 8
_GEN = torch.Generator().manual_seed(0)
X = torch.randn(B, M, N, dtype=D, generator=_GEN)
# Separable labels and a small l1 strength: the curvature falls by orders of magnitude on the
# way to the solution, so the step grows and its cap is estimated again (every branch of the
# step rule runs).
LABELS = (torch.einsum("bmn,n->bm", X, torch.ones(N, dtype=D)) > 0).to(D)


def _logistic(w: torch.Tensor, Xs: torch.Tensor, labels: torch.Tensor = LABELS) -> torch.Tensor:
    z = torch.einsum("...mn,...n->...m", Xs.to(w.dtype), w)
    return (torch.nn.functional.softplus(z) - labels.to(w.dtype) * z).mean(-1)


def _l1(strength: float | torch.Tensor) -> il.prox.Prox:
    return il.prox.bind(il.prox.l1, strength)


def _solve(compile: bool, Xs: torch.Tensor = X, strength: float | torch.Tensor = 1e-3,
           dtype: torch.dtype = D, **settings: object) -> tuple[torch.Tensor, il.SolveInfo]:
    solver = il.solvers.ProximalGradient(compile=compile, **settings)  # type: ignore[arg-type]
    return il.argmin(_logistic, torch.zeros(B, N, dtype=dtype), Xs, prox=_l1(strength),
                     batched=True, solver=solver, return_info=True)


def _problem(strength: float = 1e-3) -> CompositeProblem:
    problem = Problem("composite", _logistic, (X,), torch.zeros(B, N, dtype=D), batched=True,
                      name="fun", prox=_l1(strength))
    assert isinstance(problem, CompositeProblem)
    return problem


@pytest.mark.parametrize("settings", [
    {}, {"accelerated": False, "max_steps": 300}, {"restart": False}, {"step_size": 0.5},
    {"max_backtracks": 1}, {"shrink": 0.8, "power_steps": 3},
])
def test_loop_run_eagerly_takes_the_eager_solvers_steps(settings: dict[str, object]) -> None:
    # The loop's algorithm (backtracking, growth of the step and estimates of its cap,
    # restarts, per-sample stopping, best iterate), run as a Python loop, against the eager
    # solver: the same iterates bit for bit, the same steps and verdicts.
    problem = _problem()
    z0 = torch.zeros(B, N, dtype=D)
    solver = il.solvers.ProximalGradient(rtol=1e-10, on_failure="ignore", **settings)  # type: ignore[arg-type]
    z, info = solver.solve(problem, z0)
    s = LoopSettings(solver.resolved_rtol(D), float(solver.atol), solver.max_steps, solver.accelerated,
                     solver.restart, solver.shrink, solver.max_backtracks, solver.power_steps,
                     solver.step_size)
    zl, best, tol, steps, converged, finite, flags = pg_loop(
        problem.objective, problem.gradient_step, z0, seeded_start(z0).contiguous(), s)
    assert torch.equal(zl, z)
    assert torch.equal(steps, info.steps) and torch.equal(best, info.residual)
    assert torch.equal(tol, info.tolerance) and torch.equal(converged, info.converged)
    assert bool(finite.all()) and flags.tolist() == [True, bool(info.converged.all())]
    if not settings:
        assert len(set(info.steps.tolist())) > 1 and bool(info.converged.all())


def test_the_step_grows_and_its_cap_is_estimated_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the test above relies on to cover the step rule: on this problem the eager solver
    # grows the step and estimates its cap again (counted on the solver's own functions).
    from implicit_layers.solvers import proximal_gradient

    calls = {"grown": 0, "estimates": 0}
    grown, estimate = proximal_gradient.ProximalGradient._grown, proximal_gradient.lipschitz_estimate_from

    def counted_grown(*args: object) -> object:
        calls["grown"] += 1
        return grown(*args)  # type: ignore[arg-type]

    def counted_estimate(*args: object) -> object:
        calls["estimates"] += 1
        return estimate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(proximal_gradient.ProximalGradient, "_grown", counted_grown)
    monkeypatch.setattr(proximal_gradient, "lipschitz_estimate_from", counted_estimate)
    _, info = il.solvers.ProximalGradient(rtol=1e-10).solve(_problem(), torch.zeros(B, N, dtype=D))
    assert calls["grown"] > 5 and calls["estimates"] > 2 and bool(info.converged.all())


def _lasso_data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 12, dtype=D, generator=gen)
    w_true = torch.zeros(12, dtype=D)
    w_true[:4] = torch.tensor([2.0, -1.5, 1.0, 0.5], dtype=D)
    b = A @ w_true + 0.1 * torch.randn(40, dtype=D, generator=gen)
    Av, bv = torch.randn(20, 12, dtype=D, generator=gen), torch.randn(20, dtype=D, generator=gen)
    return A, b, Av, bv


def _lasso(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Not `A @ w`'s transpose of a closed-over tensor: torch 2.13 cannot trace `.T` of one
    # inside a loop (see _compile_failures).
    return lambda w: 0.5 * (A @ w - b).square().sum()  # type: ignore[return-value]


@pytest.mark.slow
def test_compiled_solve_matches_eager_with_exact_hypergradients() -> None:
    # Batched logistic regression: the same steps, verdicts and solutions as the eager loop.
    W, info = _solve(False, rtol=1e-10)
    Wc, infoc = _solve(True, rtol=1e-10)
    assert infoc.solver == "ProximalGradient" and bool(infoc.converged.all())
    assert torch.equal(infoc.steps, info.steps)
    torch.testing.assert_close(infoc.tolerance, info.tolerance, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(infoc.residual, info.residual, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(Wc, W, rtol=1e-10, atol=1e-12)

    # A lasso's hypergradient d val / d log λ through the compiled solve: the active-set
    # closed form, and the eager solve's.
    A, b, Av, bv = _lasso_data()

    def hypergradient(compile: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = torch.tensor(0.5, dtype=D, requires_grad=True)
        w = il.argmin(_lasso(A, b), torch.zeros(12, dtype=D), prox=_l1(torch.exp(theta)),
                      solver=il.solvers.ProximalGradient(compile=compile, rtol=1e-12))
        (g,) = torch.autograd.grad(0.5 * (Av @ w - bv).square().sum(), theta, create_graph=True)
        (g2,) = torch.autograd.grad(g, theta)  # the backward is the implicit one: differentiable
        return w.detach(), g.detach(), g2

    w, g, g2 = hypergradient(True)
    we, ge, ge2 = hypergradient(False)
    torch.testing.assert_close(w, we, rtol=1e-10, atol=1e-12)
    free = w.abs() > 0
    lam = float(np.exp(0.5))
    dw = torch.zeros(12, dtype=D)
    # On the free coordinates, AᵀA w - Aᵀb + λ sign(w) = 0, so dw/dλ = -(A_Sᵀ A_S)⁻¹ sign(w_S).
    dw[free] = -torch.linalg.solve(A[:, free].T @ A[:, free], torch.sign(w[free])) * lam
    exact = (Av @ w - bv) @ Av @ dw
    torch.testing.assert_close(g, exact, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(g, ge, rtol=1e-9, atol=0.0)
    # dw/dθ = λ c on a fixed support, so d²w/dθ² = dw/dθ and the second derivative is
    # ‖Av dw‖² + the first.
    torch.testing.assert_close(g2, (Av @ dw).square().sum() + exact, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(g2, ge2, rtol=1e-9, atol=0.0)

    # Unbatched = batched sample by sample; inference_mode, torch.func transforms and an
    # unrolled backward run the eager loop (nothing to compile there).
    compiled = il.solvers.ProximalGradient(compile=True, rtol=1e-10)
    one = [il.argmin(_logistic, torch.zeros(N, dtype=D), X[0], LABELS[0], prox=_l1(1e-3),
                     solver=compiled.replace(compile=compile)) for compile in (False, True)]
    torch.testing.assert_close(one[1], one[0], rtol=1e-10, atol=1e-12)
    # Alone, a sample takes other steps than in its batch (whether the step may grow is
    # decided for the batch): the same minimiser to the tolerance.
    torch.testing.assert_close(one[1], W[0], rtol=1e-6, atol=1e-8)
    with torch.inference_mode():
        Wi = _solve(True, rtol=1e-10)[0]
    torch.testing.assert_close(Wi, W, rtol=1e-9, atol=1e-11)
    Wv = torch.func.vmap(lambda Xi, Yi: il.argmin(_logistic, torch.zeros(N, dtype=D), Xi, Yi,
                                                  prox=_l1(1e-3), solver=compiled))(X, LABELS)
    torch.testing.assert_close(Wv, W, rtol=1e-8, atol=1e-10)
    Xg = X.clone().requires_grad_(True)
    unrolled = il.argmin(_logistic, torch.zeros(B, N, dtype=D), Xg, prox=_l1(1e-3), batched=True,
                         solver=il.solvers.ProximalGradient(compile=True, rtol=1e-10, max_steps=40,
                                                            on_failure="ignore"),
                         backward=il.backward.Unrolled())
    eager_unrolled = _solve(False, Xg, rtol=1e-10, max_steps=40, on_failure="ignore")[0]
    torch.testing.assert_close(unrolled, eager_unrolled, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_solve_is_one_graph_and_keeps_the_verdicts() -> None:
    problem = _problem()
    z0 = torch.zeros(B, N, dtype=D)
    s = LoopSettings(1e-10, 0.0, 5000, True, True, 0.5, 30, 20, None)
    explained = torch._dynamo.explain(pg_loop)(problem.objective, problem.gradient_step, z0,
                                               seeded_start(z0).contiguous(), s)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # Too few steps: the eager solver's info and warning.
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        W, info = _solve(False, max_steps=5)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        Wc, infoc = _solve(True, max_steps=5)
    assert not bool(infoc.converged.any())
    assert torch.equal(infoc.steps, info.steps)
    torch.testing.assert_close(Wc, W, rtol=1e-10, atol=1e-12)
    with pytest.raises(il.ConvergenceError):
        _solve(True, max_steps=5, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, quiet = _solve(True, max_steps=5, on_failure="ignore")
    assert not bool(quiet.converged.any())


@pytest.mark.slow
def test_compiled_solve_float32_constraint_and_errors() -> None:
    # float32 (its own tolerance): the eager solver's steps and solution.
    W32, info32 = _solve(False, dtype=torch.float32)
    Wc32, infoc32 = _solve(True, dtype=torch.float32)
    assert Wc32.dtype == torch.float32 and bool(infoc32.converged.all())
    assert int((infoc32.steps - info32.steps).abs().max()) <= 1
    torch.testing.assert_close(Wc32, W32, rtol=1e-4, atol=1e-5)

    # A constraint (the simplex, sorted inside the loop) and its gradient with respect to
    # the data, against the eager solve's.
    A, b, _, _ = _lasso_data()
    bg = b.clone().requires_grad_(True)
    c = torch.linspace(-1, 1, 12, dtype=D)
    fits = []
    for compile in (False, True):
        w = il.argmin(lambda w, b: 0.5 * (A @ w - b).square().sum(), torch.full((12,), 1 / 12, dtype=D),
                      bg, constraint=il.projection.simplex,
                      solver=il.solvers.ProximalGradient(compile=compile, rtol=1e-12))
        fits.append((w.detach(), torch.autograd.grad(c @ w, bg)[0]))
    torch.testing.assert_close(fits[1][0], fits[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fits[1][1], fits[0][1], rtol=1e-8, atol=1e-10)
    assert abs(float(fits[1][0].sum()) - 1) < 1e-12 and bool((fits[1][0] >= 0).all())

    # NaN data: the eager solver's NonFiniteError, naming the sample.
    bad = X.clone()
    bad[1, 0, 0] = float("nan")
    for compile in (False, True):
        with pytest.raises(il.NonFiniteError, match=r"batch sample\(s\) 1 of 4"):
            _solve(compile, bad)
    # An objective torch.compile cannot trace in one graph: a clear error naming it.
    with pytest.raises(ValueError, match=r"compile=True\) traces fun and prox .* compile=False"):
        il.argmin(lambda w: _logistic(w, X) * (2.0 if bool(w.sum() > 0) else 1.0),
                  torch.zeros(B, N, dtype=D), prox=_l1(1e-3), batched=True,
                  solver=il.solvers.ProximalGradient(compile=True))


def test_compile_setting_is_checked() -> None:
    with pytest.raises(TypeError, match="compile must be True or False, got int"):
        il.solvers.ProximalGradient(compile=1)  # type: ignore[arg-type]
    assert il.solvers.ProximalGradient(compile=True).replace(rtol=1e-6).compile is True


def test_an_internal_compile_failure_solves_with_the_eager_steps() -> None:
    """``.T`` of a closed-over tensor makes torch 2.13's tracer fail on the loop with an
    internal error (not the function's fault): the solve warns once and takes the eager
    steps, the same solution as ``compile=False``."""
    A, b, _, _ = _lasso_data()
    At = A.t().contiguous()
    bg = b.clone().requires_grad_(True)

    def fun(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (w @ At.T.T - b).square().sum()  # `.T` of a closed-over tensor, twice

    def solve(compile: bool) -> torch.Tensor:
        return il.argmin(fun, torch.zeros(12, dtype=D), bg, prox=_l1(0.3),
                         solver=il.solvers.ProximalGradient(compile=compile, rtol=1e-12))

    assert_falls_back_to_eager_once(
        solve, r"ProximalGradient\(compile=True\) on fun: torch.compile failed internally.*eager steps",
        bg)


@pytest.mark.slow
def test_compiled_solve_under_autocast() -> None:
    # bfloat16 autocast: the objective computes in bfloat16 (about 3 digits), the state stays
    # float32 (the loop keeps its dtypes); eager and compiled both land near the float32
    # minimiser (0.018 and 0.004 from it here, its largest entry 0.42; the compiled loop
    # keeps its step in float32, the eager one takes it from a bfloat16 power iteration).
    gen = torch.Generator().manual_seed(7)
    A, b = torch.randn(30, 6, generator=gen), torch.randn(30, generator=gen)

    def fun(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (A @ w - b).square().sum()

    exact = il.argmin(fun, torch.zeros(6), prox=_l1(0.5))
    fits = []
    for compile in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w, info = il.argmin(fun, torch.zeros(6), prox=_l1(0.5), return_info=True,
                                solver=il.solvers.ProximalGradient(compile=compile))
        assert w.dtype == torch.float32 and bool(info.converged)
        fits.append(w)
    for w in fits:
        torch.testing.assert_close(w, exact, rtol=0, atol=0.05)
