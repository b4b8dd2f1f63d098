"""``LevenbergMarquardt(compile=True)``: the whole solve as one compiled ``while_loop``.

Each new residual function, batch size, dtype or setting compiles (seconds), so the tests share
a few residual functions and shapes, and the ones that compile are marked slow.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares as scipy_least_squares

import implicit_layers as il
from implicit_layers._least_squares import LeastSquaresProblem
from implicit_layers._problem import Problem
from implicit_layers.solvers._lm_loop import LoopSettings, lm_loop
from tests.helpers import assert_falls_back_to_eager_once

D = torch.float64
T = torch.linspace(0, 2, 25, dtype=D)


def _model(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return w[..., 0:1] * torch.exp(-w[..., 1:2] * t) + w[..., 2:3] * torch.sin(3 * t)


def _residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return _model(w, T) - Y


def _data(seed: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    clean = 2.0 * torch.exp(-1.5 * T) + 0.5 * torch.sin(3 * T)
    amp = 1 + torch.rand(batch, 1, dtype=D, generator=gen)
    return amp * clean + 0.1 * torch.randn(batch, T.numel(), dtype=D, generator=gen)


def _scipy_fit(y: np.ndarray) -> np.ndarray:
    t = T.numpy()

    def fun(w: np.ndarray) -> np.ndarray:
        return w[0] * np.exp(-w[1] * t) + w[2] * np.sin(3 * t) - y

    return scipy_least_squares(fun, np.ones(3), xtol=1e-15, ftol=1e-15, gtol=1e-15).x


def _fit(Y: torch.Tensor, compile: bool, **settings: object) -> tuple[torch.Tensor, il.SolveInfo]:
    solver = il.solvers.LevenbergMarquardt(compile=compile, **settings)  # type: ignore[arg-type]
    return il.least_squares(_residual, torch.ones(Y.shape[0], 3, dtype=D), Y, batched=True,
                            solver=solver, return_info=True)


def _problem(Y: torch.Tensor) -> LeastSquaresProblem:
    problem = Problem("least_squares", _residual, (Y,), torch.ones(Y.shape[0], 3, dtype=D),
                      batched=True, name="residual")
    assert isinstance(problem, LeastSquaresProblem)
    return problem


def test_loop_run_eagerly_takes_the_eager_solvers_steps() -> None:
    # The loop's bookkeeping (per-sample stopping, best iterate, step counts), run as a Python
    # loop, against the eager solver's Monitor: same steps, same verdicts, same solutions.
    Y = _data(0, 6)
    W, info = _fit(Y, compile=False)
    z, best, tol, steps, converged, finite, flags = lm_loop(_problem(Y).residuals, torch.ones(6, 3, dtype=D),
                                                 LoopSettings(rtol=1e-10, atol=0.0, max_steps=200,
                                                              damping=1e-3))
    assert len(set(info.steps.tolist())) > 1  # samples stop at different steps
    torch.testing.assert_close(steps, info.steps)
    torch.testing.assert_close(tol, info.tolerance)
    torch.testing.assert_close(best, info.residual, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(z, W, rtol=1e-10, atol=1e-12)
    assert bool(finite.all()) and bool(converged.all()) and flags.tolist() == [True, True]
    for i in range(6):
        np.testing.assert_allclose(z[i].numpy(), _scipy_fit(Y[i].numpy()), rtol=1e-8)


def test_traced_calls_equal_the_problems_methods() -> None:
    # What the compiled loop traces for a plain problem: closures that give the residuals and
    # the probe of the bound methods, bit for bit (float32 state too, computed in float32).
    for dtype in (D, torch.float32):
        Y = _data(2, 3).to(dtype)
        problem = Problem("least_squares", _residual_any, (Y,), torch.ones(3, 3, dtype=dtype),
                          batched=True, name="residual")
        residuals, probe = problem.traced_calls()
        z = torch.randn(3, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
        assert torch.equal(residuals(z), problem.residuals(z))
        assert torch.equal(probe(z), problem.probe(z))
    # Keyword arguments, a structured state, or a subclass that redefines the residuals: the
    # bound methods themselves.
    kw = Problem("least_squares", lambda w, Y=None: _residual(w, Y), (), torch.ones(3, 3, dtype=D),
                 batched=True, name="residual", kwargs={"Y": _data(2, 3)})
    assert kw.traced_calls() == (kw.residuals, kw.probe)
    tree = Problem("least_squares", lambda w: torch.cat([w["a"], w["b"]], -1), (),
                   {"a": torch.ones(2, 1, dtype=D), "b": torch.ones(2, 2, dtype=D)},
                   batched=True, name="residual")
    assert tree.traced_calls() == (tree.residuals, tree.probe)

    class Scaled(LeastSquaresProblem):
        def residuals(self, z: torch.Tensor) -> torch.Tensor:
            return 2 * super().residuals(z)

    scaled = Scaled("least_squares", _residual, (_data(2, 3),), torch.ones(3, 3, dtype=D),
                    batched=True, name="residual")
    assert type(scaled) is Scaled
    assert scaled.traced_calls() == (scaled.residuals, scaled.probe)


def _residual_any(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return _model(w, T.to(w.dtype)) - Y


@pytest.mark.slow
def test_compiled_solve_matches_eager_and_scipy_with_exact_gradients() -> None:
    Y = _data(1, 4).requires_grad_(True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    fits = {}
    for compile in (False, True):
        W, info = _fit(Y, compile)
        (grad,) = torch.autograd.grad((W @ c).sum(), Y)
        fits[compile] = W.detach(), info, grad
    (W, info, grad), (Wc, infoc, gradc) = fits[False], fits[True]
    assert infoc.solver == "LevenbergMarquardt"
    assert bool(infoc.converged.all())
    torch.testing.assert_close(infoc.steps, info.steps)
    torch.testing.assert_close(infoc.tolerance, info.tolerance)
    torch.testing.assert_close(infoc.residual, info.residual, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(Wc, W, rtol=1e-10, atol=1e-12)
    for i in range(4):
        np.testing.assert_allclose(Wc[i].numpy(), _scipy_fit(Y[i].detach().numpy()), rtol=1e-8)
    torch.testing.assert_close(gradc, grad, rtol=1e-7, atol=1e-9)
    # The gradient (exact: full Hessian of ½‖r‖²) against central differences of the compiled
    # solve itself, entry by entry for a few data points.
    h = 1e-6
    for i, j in [(0, 0), (1, 7), (3, 24)]:
        E = torch.zeros_like(Y)
        E[i, j] = h
        plus = (_fit(Y.detach() + E, True)[0] @ c).sum()
        minus = (_fit(Y.detach() - E, True)[0] @ c).sum()
        assert abs(float((plus - minus) / (2 * h)) - float(gradc[i, j])) < 1e-6
    # Batched = looped: each sample solved alone (its own compiled batch of one).
    compiled = il.solvers.LevenbergMarquardt(compile=True)
    for i in range(2):
        w = il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), Y[i].detach(),
                             solver=compiled)
        torch.testing.assert_close(w, Wc[i], rtol=1e-9, atol=1e-11)
    # inference_mode and torch.func transforms run the eager steps (nothing to compile).
    with torch.inference_mode():
        Wi = _fit(Y.detach(), True)[0]
    torch.testing.assert_close(Wi, W, rtol=1e-9, atol=1e-10)
    Wv = torch.func.vmap(lambda y: il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D),
                                                    y, solver=compiled))(Y.detach())
    torch.testing.assert_close(Wv, W, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_compiled_solve_is_one_graph_and_keeps_the_verdicts() -> None:
    Y = _data(2, 4)
    settings = LoopSettings(rtol=1e-10, atol=0.0, max_steps=200, damping=1e-3)
    explained = torch._dynamo.explain(lm_loop)(_problem(Y).residuals, torch.ones(4, 3, dtype=D),
                                               settings)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # Too few steps: the eager solver's info and warning.
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        W, info = _fit(Y, False, max_steps=3)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        Wc, infoc = _fit(Y, True, max_steps=3)
    assert not bool(infoc.converged.any())
    torch.testing.assert_close(infoc.steps, info.steps)
    torch.testing.assert_close(Wc, W, rtol=1e-10, atol=1e-12)
    with pytest.raises(il.ConvergenceError):
        _fit(Y, True, max_steps=3, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, quiet = _fit(Y, True, max_steps=3, on_failure="ignore")
    assert not bool(quiet.converged.any())


@pytest.mark.slow
def test_compiled_solve_float32_and_many_unknowns() -> None:
    # float32 (its own tolerance) and n = 10 > 8 unknowns (the vmapped products and the
    # library Cholesky inside the loop), each against the eager solver.
    Y = _data(3, 3)
    for compile in (False, True):
        solver = il.solvers.LevenbergMarquardt(compile=compile)
        W32, info32 = il.least_squares(_residual, torch.ones(3, 3), Y.float(), batched=True,
                                       solver=solver, return_info=True)
        if not compile:
            eager32 = W32, info32
    assert W32.dtype == torch.float32 and bool(info32.converged.all())
    torch.testing.assert_close(info32.steps, eager32[1].steps)
    torch.testing.assert_close(W32, eager32[0], rtol=1e-4, atol=1e-5)

    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 30, 10, dtype=D, generator=gen)
    b = torch.randn(2, 30, dtype=D, generator=gen)
    fits = [il.least_squares(lambda w: torch.tanh(torch.einsum("bmn,bn->bm", A, w)) - 0.5 * b,
                             torch.zeros(2, 10, dtype=D), batched=True, return_info=True,
                             solver=il.solvers.LevenbergMarquardt(compile=compile))
            for compile in (False, True)]
    # Slow convergence here (20+ steps): rounding may shift the last step by one.
    assert bool(fits[1][1].converged.all())
    assert int((fits[1][1].steps - fits[0][1].steps).abs().max()) <= 1
    torch.testing.assert_close(fits[1][0], fits[0][0], rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_compiled_solve_errors() -> None:
    Y = _data(5, 4)  # the shapes of the tests above: no new compilation
    # NaN data: the eager solver's NonFiniteError, naming the sample.
    bad = Y.clone()
    bad[1] = float("nan")
    for compile in (False, True):
        with pytest.raises(il.NonFiniteError, match=r"batch sample\(s\) 1 of 4"):
            _fit(bad, compile)
    # A residual torch.compile cannot trace in one graph: a clear error naming it.
    with pytest.raises(ValueError, match=r"compile=True\) traces residual .* compile=False"):
        il.least_squares(lambda w: _model(w, T) * (2.0 if bool(w.sum() > 0) else 1.0) - Y,
                         torch.ones(4, 3, dtype=D), batched=True,
                         solver=il.solvers.LevenbergMarquardt(compile=True))


@pytest.mark.slow
def test_compiled_solve_past_the_recompile_limit() -> None:
    # Each setting is one more compiled variant of the one loop; fullgraph=True refuses a
    # variant past torch's recompile limit, which the solve raises for that call instead.
    Y = _data(6, 4)
    W, _ = _fit(Y, False)
    with torch._dynamo.config.patch(recompile_limit=1):
        for max_steps in (200, 199):  # 200: the graph of the tests above
            Wc, info = _fit(Y, True, max_steps=max_steps)
            assert bool(info.converged.all())
            torch.testing.assert_close(Wc, W, rtol=1e-10, atol=1e-12)


def test_an_internal_compile_failure_solves_with_the_eager_steps() -> None:
    """``.T`` of a closed-over tensor makes torch 2.13's tracer fail on the loop with an
    internal AssertionError (not the function's fault): the solve warns once and takes the
    eager steps, the same solution as ``compile=False``."""
    g = torch.Generator().manual_seed(9)
    X = torch.randn(3, 20, generator=g, dtype=torch.float64)
    Y = torch.randn(2, 20, generator=g, dtype=torch.float64, requires_grad=True)

    def residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ X.T.T) - Y

    def fit(compile: bool) -> torch.Tensor:
        return il.least_squares(residual, torch.zeros(2, 3, dtype=torch.float64), Y, batched=True,
                                solver=il.solvers.LevenbergMarquardt(compile=compile))

    assert_falls_back_to_eager_once(fit, r"torch.compile failed internally.*eager steps.*\.T", Y)
