"""``GuardedCall``: a compiled function called through its own guards, without dynamo's frame.

A call must take the direct route only where dynamo itself would run the same compiled
variant, and the ordinary route (which recompiles, or runs eagerly under an eager stance)
everywhere else.
"""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from implicit_layers._guarded_call import GuardedCall
from implicit_layers.solvers import _lm_loop

SCALE = 2.0


def scaled_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (SCALE * x + y).sum(-1)


def _guarded() -> GuardedCall:
    torch._dynamo.reset()
    return GuardedCall(scaled_sum, torch.compile(scaled_sum, fullgraph=True, dynamic=False,
                                                 backend="eager"))


def test_direct_after_the_first_call_with_equal_results() -> None:
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    first = call(x, y)
    assert call.direct_calls == 0
    second = call(x, y)
    assert call.direct_calls == 1
    assert torch.equal(first, second)
    assert torch.equal(second, scaled_sum(x, y))


def test_new_shape_dtype_or_grad_mode_takes_the_ordinary_route() -> None:
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    call(x, y)
    # Each of these fails the variant's guards: dynamo compiles a new variant, then the next
    # identical call is direct.
    for args in [(torch.randn(5, 2), torch.randn(5, 2)),
                 (x.double(), y.double())]:
        before = call.direct_calls
        assert torch.equal(call(*args), scaled_sum(*args))
        assert call.direct_calls == before
        call(*args)
        assert call.direct_calls == before + 1
    xg = x.clone().requires_grad_()
    before = call.direct_calls
    out = call(xg, y)
    assert out.requires_grad and call.direct_calls == before
    out.sum().backward()
    assert torch.equal(xg.grad, torch.full_like(x, SCALE))


def test_a_changed_global_recompiles() -> None:
    global SCALE
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    call(x, y)
    call(x, y)
    saved = SCALE
    try:
        SCALE = 3.0
        before = call.direct_calls
        out = call(x, y)
        assert call.direct_calls == before  # the guard on SCALE failed
        assert torch.allclose(out, (3.0 * x + y).sum(-1))
    finally:
        SCALE = saved


def test_an_eager_stance_is_respected() -> None:
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    call(x, y)
    before = call.direct_calls
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(call(x, y), scaled_sum(x, y))
    assert call.direct_calls == before


def test_functions_it_cannot_call_directly_are_refused() -> None:
    def varargs(*args: torch.Tensor) -> torch.Tensor:
        return args[0]

    with pytest.raises(TypeError, match="module-level function of named positional"):
        GuardedCall(varargs, torch.compile(varargs))
    k = 2.0

    def closure(x: torch.Tensor) -> torch.Tensor:
        return k * x

    with pytest.raises(TypeError, match="module-level function"):
        GuardedCall(closure, torch.compile(closure))


T = torch.linspace(0, 1, 15, dtype=torch.float64)


def exp_residual(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return w[:, :1] * torch.exp(-w[:, 1:2] * T) - y


def sin_residual(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return w[:, :1] * torch.sin(w[:, 1:2] * T) - y


def test_compiled_least_squares_takes_the_direct_route_and_tells_functions_apart() -> None:
    """Two residual functions of the same shapes: each call runs its own compiled variant
    (the guards on the traced function), direct from the second call of each on."""
    solver = il.solvers.LevenbergMarquardt(compile=True)
    loop = _lm_loop.compiled_loop()
    w_true = torch.tensor([[2.0, 1.5]], dtype=torch.float64)
    y_exp = w_true[:, :1] * torch.exp(-w_true[:, 1:2] * T)
    y_sin = w_true[:, :1] * torch.sin(w_true[:, 1:2] * T)
    start = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    before = loop.direct_calls
    runs = []
    for _ in range(2):
        w_e = il.least_squares(exp_residual, start, y_exp, batched=True, solver=solver)
        w_s = il.least_squares(sin_residual, start, y_sin, batched=True, solver=solver)
        runs.append((w_e, w_s))
    assert loop.direct_calls >= before + 2  # the second round went direct
    for w_e, w_s in runs:
        torch.testing.assert_close(w_e, w_true, rtol=0, atol=1e-8)
        torch.testing.assert_close(w_s, w_true, rtol=0, atol=1e-8)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_dynamo_switched_off_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    call(x, y)
    before = call.direct_calls
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    assert torch.equal(call(x, y), scaled_sum(x, y))
    assert call.direct_calls == before


def test_direct_calls_still_report_the_tensors_read() -> None:
    """The compiled loop reports the tensors carrying derivatives that it read (so that the
    layer binds them): on the direct route too, the fit's gradient with respect to a closed-over
    parameter is the implicit derivative (against central differences in float64)."""
    solver = il.solvers.LevenbergMarquardt(compile=True)
    loop = _lm_loop.compiled_loop()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    y = 2.0 * torch.exp(-1.5 * T).unsqueeze(0)

    def residual(w: torch.Tensor) -> torch.Tensor:
        return w[:, :1] * torch.exp(-w[:, 1:2] * T) - scale * y

    def fit(s: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale.copy_(s)
        return il.least_squares(residual, torch.ones(1, 2, dtype=torch.float64), batched=True,
                                solver=solver)

    start = torch.ones(1, 2, dtype=torch.float64)
    grads = []
    for _ in range(2):
        w = il.least_squares(residual, start, batched=True, solver=solver)
        grads.append(torch.autograd.grad(w.sum(), scale)[0])
    before = loop.direct_calls
    w = il.least_squares(residual, start, batched=True, solver=solver)
    assert loop.direct_calls == before + 1
    (grad,) = torch.autograd.grad(w.sum(), scale)
    h = 1e-6
    with torch.no_grad():
        fd = (fit(torch.tensor(1.3 + h, dtype=torch.float64)).sum()
              - fit(torch.tensor(1.3 - h, dtype=torch.float64)).sum()) / (2 * h)
        scale.fill_(1.3)
    torch.testing.assert_close(grad, fd.to(grad.dtype), rtol=1e-6, atol=0)
    assert torch.equal(grad, grads[1])


def _ridge_layer(d: int, seed: int) -> tuple:
    """A ridge solution ``w(λ)`` by its closed form, with ``CompiledImplicit(CG)``'s backward:
    ``(layer, closed_form, optimality)``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(5 * d, d, dtype=torch.float64, generator=gen)
    G, b = X.T @ X, X.T @ torch.randn(5 * d, dtype=torch.float64, generator=gen)

    def optimality(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return G @ w - b + lam * w

    def closed(lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(G + lam * torch.eye(d, dtype=torch.float64), b)

    layer = il.custom_root(optimality, symmetric=True, rtol=1e-12,
                           backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))(
        lambda w0, lam: closed(lam))
    return layer, closed, optimality


def test_compiled_adjoint_loop_takes_the_direct_route() -> None:
    """The compiled CG loop of CompiledImplicit: direct from the second call, and the
    hypergradient of a ridge solution equal to the closed form's on every call."""
    from implicit_layers._compiled_adjoint import _compiled_cg

    layer, closed, optimality = _ridge_layer(6, seed=0)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(closed(lam).square().sum(), lam)
    loop = _compiled_cg(optimality)
    grads = []
    for _ in range(3):
        (grad,) = torch.autograd.grad(layer(torch.zeros(6, dtype=torch.float64), lam).square().sum(), lam)
        grads.append(grad)
    assert loop.direct_calls >= 2
    for grad in grads:
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=0)


def test_variants_are_dynamos_live_entries() -> None:
    """After torch._dynamo.reset() (or an entry's invalidation, when an object its guards
    match by identity is freed and a new one may take its address) the dropped variant is not
    run: the next call compiles again through the ordinary route."""
    call = _guarded()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    call(x, y)
    call(x, y)
    before = call.direct_calls
    torch._dynamo.reset()
    assert torch.equal(call(x, y), scaled_sum(x, y))
    assert call.direct_calls == before
    call(x, y)
    assert call.direct_calls == before + 1


class _DoubleExp(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes the math (every exp doubled)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        return out * 2 if func is torch.ops.aten.exp.default else out


class _Counting(torch.overrides.TorchFunctionMode):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        _Counting.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["dispatch", "function", "dual_level"])
def test_compiled_fit_under_a_mode_runs_the_eager_steps(mode: str) -> None:
    """Under a dispatch mode, a torch-function mode or a forward-mode dual level the compiled
    loop failed in torch.compile (or, for a mode, would not see it); the eager steps run, with
    the eager solver's answer (a dispatch mode that doubles exp changes the fit)."""
    from torch.autograd import forward_ad

    y = (2.0 * torch.exp(-1.5 * T)).unsqueeze(0)
    start = torch.ones(1, 2, dtype=torch.float64)
    contexts = {"dispatch": _DoubleExp, "function": _Counting, "dual_level": forward_ad.dual_level}

    def fit(compile: bool) -> torch.Tensor:
        with contexts[mode]():
            return il.least_squares(exp_residual, start, y, batched=True,
                                    solver=il.solvers.LevenbergMarquardt(compile=compile))

    fit(True)  # a compiled variant may exist from other tests: it must not be used here
    torch.testing.assert_close(fit(True), fit(False), rtol=1e-12, atol=1e-12)
    if mode == "dispatch":  # the mode's math: w0 exp(-w1 t) * 2 fits y with w0 = 1
        torch.testing.assert_close(fit(True), torch.tensor([[1.0, 1.5]], dtype=torch.float64),
                                   rtol=0, atol=1e-8)


def test_compiled_adjoint_under_a_torch_function_mode_solves_eagerly() -> None:
    layer, closed, _ = _ridge_layer(4, seed=1)
    lam = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(closed(lam).square().sum(), lam)
    for _ in range(2):
        with _Counting():
            (grad,) = torch.autograd.grad(layer(torch.zeros(4, dtype=torch.float64), lam).square().sum(), lam)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=0)
