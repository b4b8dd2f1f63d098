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
