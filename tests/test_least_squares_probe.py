"""The least-squares layer's probe without the capture: where nothing the residual function uses
carries derivatives, one plain evaluation replaces the capture, with the same solution, info and
errors; wherever something might carry derivatives the capture still runs."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import implicit_layers as il
from implicit_layers._least_squares import LeastSquaresProblem

D = torch.float64
T = torch.linspace(0, 2, 25, dtype=D)
Y = 2.0 * torch.exp(-1.5 * T) + 0.5 * torch.sin(3 * T) + 0.1 * torch.cos(7 * T)


def _residual(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return w[..., 0:1] * torch.exp(-w[..., 1:2] * T) + w[..., 2:3] * torch.sin(3 * T) - y


def _forced_capture(monkeypatch) -> None:
    monkeypatch.setattr(LeastSquaresProblem, "probe_output_covers_inputs", False)


SOLVERS = [il.solvers.LevenbergMarquardt(), il.solvers.GaussNewton(),
           il.solvers.LevenbergMarquardt(dense_max_size=0)]


@pytest.mark.parametrize("solver", SOLVERS, ids=["lm", "gauss-newton", "lm-cg"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_solution_and_info_as_with_the_capture(solver, batched, dtype, captures, monkeypatch) -> None:
    y = (Y.expand(3, -1) * torch.tensor([[1.0], [1.2], [0.8]], dtype=D) if batched else Y).to(dtype)
    w0 = torch.ones(*y.shape[:-1], 3, dtype=dtype)
    w, info = il.least_squares(_residual, w0, y, solver=solver, batched=batched, return_info=True)
    assert captures[0] == 0 and not w.requires_grad
    _forced_capture(monkeypatch)
    w_ref, info_ref = il.least_squares(_residual, w0, y, solver=solver, batched=batched, return_info=True)
    assert captures[0] == 1 and not w_ref.requires_grad
    assert torch.equal(w, w_ref)
    for field in ("converged", "steps", "residual", "tolerance"):
        assert torch.equal(getattr(info, field), getattr(info_ref, field)), field
    assert info.solver == info_ref.solver


@pytest.mark.parametrize("bad, error, match", [
    (lambda w, y: (w, y), TypeError, "must return a floating-point torch.Tensor of residuals, got tuple"),
    (lambda w, y: (w[..., :1] - y).sum(-1)[:1], ValueError, "must return residuals shaped"),
    (lambda w, y: torch.zeros(2, 0, dtype=D), ValueError, "returned no residuals"),
])
def test_same_errors_as_with_the_capture(bad, error, match, monkeypatch) -> None:
    w0 = torch.ones(2, 3, dtype=D)
    y = Y.expand(2, -1)
    with pytest.raises(error, match=match) as plain:
        il.least_squares(bad, w0, y, batched=True)
    _forced_capture(monkeypatch)
    with pytest.raises(error, match=match) as captured:
        il.least_squares(bad, w0, y, batched=True)
    assert str(plain.value) == str(captured.value)


def test_closed_over_tensor_that_requires_grad_is_captured(captures, monkeypatch) -> None:
    # The function names a tensor that requires grad: the capture runs at once (no plain
    # probe before it) and finds it. The fit scales with the data in (a, c), so
    # d(a + b + c)/ds = (a + c) / s.
    scale = torch.tensor(1.5, dtype=D, requires_grad=True)
    calls = [0]

    def residual(w: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return _residual(w, scale * Y)

    w = il.least_squares(residual, torch.ones(3, dtype=D))
    assert captures[0] == 1
    first = calls[0]
    (grad,) = torch.autograd.grad(w.sum(), scale)
    torch.testing.assert_close(grad, (w[0] + w[2]).detach() / 1.5, rtol=1e-7, atol=0.0)
    calls[0] = first
    _forced_capture(monkeypatch)
    il.least_squares(residual, torch.ones(3, dtype=D))
    assert captures[0] == 2 and calls[0] == 2 * first


def test_explicit_argument_that_requires_grad_skips_the_plain_probe(captures, monkeypatch) -> None:
    # Evaluations of the residual function per call: as many as with the capture alone.
    y = Y.clone().requires_grad_()
    calls = [0]

    def residual(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return _residual(w, y)

    solver = il.solvers.LevenbergMarquardt(max_steps=2, on_failure="ignore")
    il.least_squares(residual, torch.ones(3, dtype=D), y, solver=solver)
    assert captures[0] == 1
    plain = calls[0]
    _forced_capture(monkeypatch)
    il.least_squares(residual, torch.ones(3, dtype=D), y, solver=solver)
    assert captures[0] == 2 and calls[0] == 2 * plain


def test_forward_mode_tangent_of_a_closed_over_tensor(captures) -> None:
    # A dual tensor does not make the residual require grad: the capture must run (forward mode
    # is active), and the tangent of the fit is (a + c)/s per unit tangent of s, as above.
    with forward_ad.dual_level():
        scale = forward_ad.make_dual(torch.tensor(1.5, dtype=D), torch.tensor(1.0, dtype=D))
        w = il.least_squares(lambda w: _residual(w, scale * Y), torch.ones(3, dtype=D))
        primal, tangent = forward_ad.unpack_dual(w)
    assert captures[0] == 1
    assert tangent is not None
    torch.testing.assert_close(tangent.sum(), (primal[0] + primal[2]) / 1.5, rtol=1e-7, atol=0.0)


def test_torch_func_grad_of_a_closed_over_tensor(captures) -> None:
    def fit_sum(s: torch.Tensor) -> torch.Tensor:
        return il.least_squares(lambda w: _residual(w, s * Y), torch.ones(3, dtype=D)).sum()

    s = torch.tensor(1.5, dtype=D)
    grad = torch.func.grad(fit_sum)(s)
    assert captures[0] >= 1
    w = il.least_squares(lambda w: _residual(w, 1.5 * Y), torch.ones(3, dtype=D))
    torch.testing.assert_close(grad, (w[0] + w[2]) / 1.5, rtol=1e-7, atol=0.0)


def test_tensor_that_requires_grad_only_in_a_comparison_is_captured(captures, monkeypatch) -> None:
    # The residual does not require grad, but a tensor that does enters an operation: as with
    # the capture, the solution carries a (zero) derivative to it.
    p = torch.tensor(1.0, dtype=D, requires_grad=True)
    results = []
    for forced in (False, True):
        if forced:
            _forced_capture(monkeypatch)
        w = il.least_squares(lambda w: _residual(w, Y * (p > 0)), torch.ones(3, dtype=D))
        assert w.requires_grad
        results.append((w.detach(), torch.autograd.grad(w.sum(), p)[0]))
    assert captures[0] == 2
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], torch.zeros((), dtype=D)) and torch.equal(results[1][1], results[0][1])


def test_residual_that_is_not_a_plain_function_is_captured(captures) -> None:
    # A module (or a bound method, a partial) may hold tensors the check cannot see: captured.
    model = torch.nn.Linear(3, 25, dtype=D).requires_grad_(False)
    w = il.least_squares(lambda w: model(w) - Y, torch.ones(3, dtype=D))
    assert captures[0] == 1 and not w.requires_grad
    w2 = il.least_squares(model, torch.ones(3, dtype=D))
    assert captures[0] == 2 and not w2.requires_grad
    # Both are linear fits: the gradient of ½‖r‖², Aᵀr, vanishes at the solution.
    A = model.weight
    torch.testing.assert_close(A.T @ (model(w) - Y), torch.zeros(3, dtype=D), rtol=0.0, atol=1e-8)
    torch.testing.assert_close(A.T @ model(w2), torch.zeros(3, dtype=D), rtol=0.0, atol=1e-8)


#: Constants a residual may name: small containers of numbers are read through.
_GRID = (0.0, 1.0, 2.0)
_SETTINGS = {"weights": [1.0, 1.0, 1.0], "name": "curve"}
_HOLDER: list[torch.Tensor] = []


def _weighted(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scale = _HOLDER[0] if _HOLDER else 1.0
    return scale * _SETTINGS["weights"][0] * _residual(w, y) + 0 * _GRID[0]


def test_small_containers_of_constants_skip_the_capture(captures) -> None:
    from implicit_layers._capture import reaches_no_derivatives

    assert reaches_no_derivatives(_weighted)
    w = il.least_squares(_weighted, torch.ones(3, dtype=D), Y)
    assert captures[0] == 0 and not w.requires_grad
    torch.testing.assert_close(w, il.least_squares(_residual, torch.ones(3, dtype=D), Y), rtol=0, atol=0)
    # A tensor that requires grad in a container the function names: the capture runs and finds
    # it (scaling the whole residual leaves the fit where it is: a zero gradient).
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)
    _HOLDER.append(scale)
    try:
        assert not reaches_no_derivatives(_weighted)
        w = il.least_squares(_weighted, torch.ones(3, dtype=D), Y)
        assert captures[0] == 1 and w.requires_grad
        (grad,) = torch.autograd.grad(w.sum(), scale)
    finally:
        _HOLDER.clear()
    torch.testing.assert_close(grad, torch.zeros((), dtype=D), rtol=0, atol=1e-8)
    # A container too large to read through, or holding an object: the capture decides.
    big = [0.0] * 100
    assert not reaches_no_derivatives(lambda w: w * big[0])
    thing = [object()]
    assert not reaches_no_derivatives(lambda w: w * len(thing))
    nested = ((1, 2), {"a": (3.0, None)})
    assert reaches_no_derivatives(lambda w: w * nested[0][0])
