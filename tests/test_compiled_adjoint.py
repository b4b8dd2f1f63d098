"""``il.backward.CompiledImplicit``: the first-order adjoint CG solve as one compiled loop.

References: the implicit gradient from a dense ``torch.linalg.solve`` of each sample's Hessian
(float64), the eager ``Implicit(CG)`` with the same settings (values, gradients, steps and
verdicts), and torch's own graph counters for the compiled loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import implicit_layers as il
from implicit_layers import _compiled_adjoint as compiled_adjoint
from implicit_layers._compiled_adjoint import _cg_loop, _compiled_cg

B, N = 3, 6


def objective(w: torch.Tensor, A: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per sample ``½ wᵀ A w - bᵀ w + c Σ w⁴ / 4`` (strictly convex; ``(B,)`` values). Shared
    by the tests so that the compiled loop is compiled for as few functions as possible."""
    quadratic = 0.5 * torch.einsum("bi,bij,bj->b", w, A, w) - (b * w).sum(-1)
    return quadratic + 0.25 * c * w.pow(4).sum(-1)


def data(dtype: torch.dtype = torch.float64, scales: tuple[float, ...] = (1.0, 10.0, 100.0)):
    """Per-sample SPD matrices of growing condition number (so the samples need different
    numbers of CG steps), right-hand sides and the quartic weight, all requiring grad."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(B, N, N, generator=gen, dtype=torch.float64))[0]
    eig = torch.stack([torch.logspace(0, math.log10(s), N, dtype=torch.float64) for s in scales])
    A = Q @ torch.diag_embed(eig) @ Q.mT
    b = torch.randn(B, N, generator=gen, dtype=torch.float64)
    c = torch.tensor(0.3, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(True) for t in (A, b, c))


def solve(backward, A, b, c, **kw):
    solver = il.solvers.Newton(rtol=1e-12 if A.dtype == torch.float64 else 1e-6)
    return il.argmin(objective, torch.zeros_like(b), A, b, c, solver=solver, backward=backward,
                     batched=True, **kw)


def dense_reference(A, b, c, w, g):
    """``-(∂∇L/∂θ)ᵀ H⁻¹ g`` at ``w`` with each sample's exact Hessian (float64)."""
    def one(wi, Ai, bi):
        return objective(wi[None], Ai[None], bi[None], c).sum()

    H = torch.func.vmap(torch.func.hessian(one))(w, A.detach(), b.detach())
    u = torch.linalg.solve(H, g)
    wr = w.detach().requires_grad_(True)
    (gw,) = torch.autograd.grad(objective(wr, A, b, c).sum(), wr, create_graph=True)
    return torch.autograd.grad(gw, (A, b, c), -u)


def test_gradients_equal_dense_reference_and_eager_cg() -> None:
    A, b, c = data()
    cg = il.linear.CG(rtol=1e-12)
    w, info = solve(il.backward.CompiledImplicit(cg), A, b, c, return_info=True)
    g = torch.linspace(-1, 1, B * N, dtype=torch.float64).view(B, N)
    grads = torch.autograd.grad(w, (A, b, c), g)
    ref = dense_reference(A, b, c, w, g)
    w_e, info_e = solve(il.backward.Implicit(cg), A, b, c, return_info=True)
    eager = torch.autograd.grad(w_e, (A, b, c), g)
    for got, want, same in zip(grads, ref, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got, same, rtol=1e-10, atol=1e-12)
    # Same verdicts, per sample; the steps of the eager CG to within one (compiled sums may
    # round differently near the tolerance). The ill-conditioned samples need more steps.
    back, back_e = info.backward, info_e.backward
    assert back.solver == "CG (compiled)" and back_e.solver == "CG"
    assert back.converged.all() and back_e.converged.all()
    assert (back.steps - back_e.steps).abs().max() <= 1
    assert back.steps[0] < back.steps[2]
    assert (back.residual <= back.tolerance).all()


@pytest.mark.slow
def test_custom_root_ridge_against_closed_form() -> None:
    """Ridge regression (symmetric ``custom_root`` over a closed-form forward): the
    hypergradient of the validation loss equals autograd through the closed form."""
    gen = torch.Generator().manual_seed(1)
    X, Xv = (torch.randn(40, 10, generator=gen, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randn(40, generator=gen, dtype=torch.float64) for _ in range(2))
    G, Xty = X.T @ X / 40, X.T @ y / 40

    def closed_form(theta):
        return torch.linalg.solve(G + torch.diag(theta.exp()), Xty)

    def optimality(w, theta):
        return G @ w - Xty + theta.exp() * w

    mode = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12))

    @il.custom_root(optimality, symmetric=True, backward=mode)
    def inner(w0, theta):
        return closed_form(theta)

    theta = torch.linspace(-2, 0, 10, dtype=torch.float64).requires_grad_(True)
    outer = lambda w: ((Xv @ w - yv) ** 2).mean()  # noqa: E731
    got = torch.autograd.grad(outer(inner(torch.zeros(10, dtype=torch.float64), theta)), theta)[0]
    want = torch.autograd.grad(outer(closed_form(theta)), theta)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_compiles_once() -> None:
    A, b, c = data()
    solve(il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)), A, b, c).sum().backward()
    counters.clear()
    # New values of the same shapes: the compiled loop is reused, nothing is compiled again.
    A2, b2, c2 = (t.detach().mul(1.1).requires_grad_(True) for t in (A, b, c))
    solve(il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)), A2, b2, c2).sum().backward()
    assert counters["stats"]["unique_graphs"] == 0
    assert b2.grad is not None and torch.isfinite(b2.grad).all()


def test_higher_orders_and_transforms_run_eagerly_with_the_same_values() -> None:
    """create_graph=True and torch.func are served by the eager CG (same settings)."""
    A, b, c = data()
    cg = il.linear.CG(rtol=1e-12)
    for mode in (il.backward.CompiledImplicit(cg), il.backward.Implicit(cg)):
        w = solve(mode, A, b, c)
        (gb,) = torch.autograd.grad(w.pow(2).sum(), b, create_graph=True)
        (gc,) = torch.autograd.grad(gb.sum(), c)
        if isinstance(mode, il.backward.CompiledImplicit):
            first = (gb.detach(), gc)
        else:
            torch.testing.assert_close(first[0], gb.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(first[1], gc, rtol=1e-9, atol=1e-12)

    def loss(bb, mode):
        return solve(mode, A.detach(), bb, c.detach()).pow(2).sum()

    got = torch.func.grad(loss)(b.detach(), il.backward.CompiledImplicit(cg))
    want = torch.func.grad(loss)(b.detach(), il.backward.Implicit(cg))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_batched_cotangents_against_dense_reference() -> None:
    """``is_grads_batched=True`` (several cotangents at once) takes the eager CG with products
    through the backward's recording: each gradient equals the dense reference's."""
    A, b, c = data()
    w = solve(il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)), A, b, c)
    gs = torch.stack([torch.ones(B, N, dtype=torch.float64),
                      torch.linspace(-1, 1, B * N, dtype=torch.float64).view(B, N)])
    got = torch.autograd.grad(w, (A, b, c), gs, is_grads_batched=True)
    for k in range(2):
        want = dense_reference(A, b, c, w, gs[k])
        for got_k, want_k in zip(got, want, strict=True):
            torch.testing.assert_close(got_k[k], want_k, rtol=1e-9, atol=1e-11)


def test_non_convergence_warns() -> None:
    A, b, c = data()
    short = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12, max_steps=2))
    w = solve(short, A, b, c)
    with pytest.warns(il.ConvergenceWarning, match=r"CG \(compiled\) did not converge.*backward"):
        w.sum().backward()
    assert torch.isfinite(b.grad).all()


@pytest.mark.slow
def test_indefinite_stops_without_nan() -> None:
    # A saddle point declared symmetric: CG meets negative curvature, stops and says so; the
    # gradient stays finite.
    M = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)

    @il.custom_root(lambda z, t: M @ z - t, symmetric=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    def inner(z0, t):
        return torch.linalg.solve(M, t)

    z = inner(torch.zeros(3, dtype=torch.float64), t)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        z.sum().backward()
    assert torch.isfinite(t.grad).all()


def test_nan_in_the_jacobian_stops_without_nan() -> None:
    # A NaN product stops CG (as negative curvature does); 0 · NaN must not carry it into the
    # solution at the loop's next step.
    scale = torch.tensor(float("nan"), dtype=torch.float64)
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)

    @il.custom_root(lambda z, t: scale * z - t, symmetric=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    def inner(z0, t):
        return t.clone()

    z = inner(torch.zeros(3, dtype=torch.float64), t)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        z.sum().backward()
    assert torch.isfinite(t.grad).all()


def test_vmap_inference_mode_and_no_grad() -> None:
    """vmap (of grad) runs the eager CG with the same results; without a graph the layer is
    the forward alone, with the same solution."""
    A, b, c = data()
    cg = il.linear.CG(rtol=1e-12)

    def loss(bb, mode):
        return solve(mode, A.detach(), bb, c.detach()).pow(2).sum()

    bs = torch.stack([b.detach(), 0.5 * b.detach()])
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(bs, il.backward.CompiledImplicit(cg))
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(bs, il.backward.Implicit(cg))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    reference = solve(il.backward.Implicit(cg), A, b, c).detach()
    with torch.no_grad():
        w = solve(il.backward.CompiledImplicit(cg), A, b, c)
    assert not w.requires_grad
    torch.testing.assert_close(w, reference, rtol=0, atol=0)
    # (LBFGS here: Newton's Hessian products need autograd, which inference_mode turns off.)
    outs = []
    for mode in (il.backward.CompiledImplicit(cg), il.backward.Implicit(cg)):
        with torch.inference_mode():
            outs.append(il.argmin(objective, torch.zeros_like(b), A, b, c, backward=mode, batched=True,
                                  solver=il.solvers.LBFGS(rtol=1e-12)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], reference, rtol=1e-8, atol=1e-10)


def test_untraceable_function_is_a_clear_error() -> None:
    A, b, c = data()

    def branching(w, A, b, c):
        value = objective(w, A, b, c)
        return value if bool(c > 0) else -value  # a Python branch on a tensor's value

    w = il.argmin(branching, torch.zeros_like(b), A, b, c, batched=True,
                  solver=il.solvers.Newton(rtol=1e-12),
                  backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    with pytest.raises(ValueError, match=r"could not compile.*traceable.*il.linear.CG"):
        w.sum().backward()


def test_an_internal_compile_failure_falls_back_to_the_eager_cg() -> None:
    """``.T`` of a closed-over tensor inside the function makes torch 2.13's tracer fail on
    the loop with an internal AssertionError (not the function's fault): the backward warns
    once and solves with the eager CG, the same gradient as ``backward=il.linear.CG``."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)

    def optimality(w, th):
        return X.T @ (X @ w - y) / 30 + th.exp() * w

    def layer(backward):
        return il.custom_root(optimality, symmetric=True, backward=backward)(
            lambda w0, th: torch.linalg.solve(X.T @ X / 30 + torch.diag(th.exp()), X.T @ y / 30))

    def grad(backward):
        th = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(layer(backward)(torch.zeros_like(th), th).square().sum(), th)[0]

    mode = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12))
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed.*eager CG.*\.T"):
        got = grad(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = grad(mode)  # said once; no second attempt to compile
    want = grad(il.linear.CG(rtol=1e-12))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(again, want, rtol=1e-10, atol=1e-14)


def test_past_the_recompile_limit_it_solves_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past dynamo's recompile limit (here 1 graph) a new shape is solved by the eager CG, with
    a warning, and the same gradient."""
    A, b, c = data()
    cg = il.linear.CG(rtol=1e-12)
    solve(il.backward.CompiledImplicit(cg), A, b, c).sum().backward()  # compiled (or cached)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    A2, b2 = A[:2].detach().requires_grad_(True), b[:2].detach().requires_grad_(True)
    w, info = solve(il.backward.CompiledImplicit(cg), A2, b2, c, return_info=True)
    with pytest.warns(RuntimeWarning, match="recompile_limit"):
        w.sum().backward()
    assert info.backward.solver == "CG"
    want = torch.autograd.grad(solve(il.backward.Implicit(cg), A2, b2, c).sum(), b2)[0]
    torch.testing.assert_close(b2.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_float32() -> None:
    A, b, c = data(torch.float32)
    cg = il.linear.CG(rtol=1e-5)
    g = torch.ones(B, N)
    got = torch.autograd.grad(solve(il.backward.CompiledImplicit(cg), A, b, c), b, g)[0]
    want = torch.autograd.grad(solve(il.backward.Implicit(cg), A, b, c), b, g)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_under_autocast_the_gradient_is_the_float32_problems() -> None:
    # The parameter VJP is recorded in the backward, outside the forward's autocast region:
    # the gradient at the returned point is the float32 problem's implicit gradient (a
    # bfloat16 forward cannot meet float32 tolerances, so it stops at its step budget).
    A, b, c = data(torch.float32)
    g = torch.ones(B, N)
    solver = il.solvers.Newton(max_steps=20, on_failure="ignore")
    backward = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = il.argmin(objective, torch.zeros_like(b), A, b, c, solver=solver, backward=backward,
                      batched=True)
    got = torch.autograd.grad(w, (A, b), g)
    A64, b64, c64 = (t.detach().double().requires_grad_(True) for t in (A, b, c))
    want = dense_reference(A64, b64, c64, w.detach().double(), g.double())[:2]
    for gi, wi in zip(got, want, strict=True):
        assert gi.dtype == torch.float32
        rel = float((gi.double() - wi).norm() / wi.norm())
        assert rel < 1e-3, rel


def test_clear_errors() -> None:
    with pytest.raises(TypeError, match="linear_solver must be il.linear.CG"):
        il.backward.CompiledImplicit(il.linear.GMRES())
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="not declared symmetric.*GMRES"):
        il.fixed_point(lambda z, x: 0.5 * torch.cos(z) + x, torch.zeros(3, dtype=torch.float64), x,
                       backward=il.backward.CompiledImplicit())
    mode = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-8))
    names = {"CompiledImplicit": il.backward.CompiledImplicit, "CG": il.linear.CG}
    assert eval(repr(mode), names) == mode


def test_one_compiled_loop_per_function() -> None:
    """Each user function has a compiled loop of its own (dynamo's recompile limit is per
    code object), and the same function gets the same one."""
    def other(w, A, b, c):
        return objective(w, A, b, c)

    assert _compiled_cg(objective) is _compiled_cg(objective)
    assert _compiled_cg(objective) is not _compiled_cg(other)


def test_non_leaf_parameters_take_the_compiled_path() -> None:
    """Parameters computed from others (``b = 2 b0``): the loop runs compiled and the
    gradient reaches the leaf through them."""
    A, b0, c = data()
    b = 2 * b0
    cg = il.linear.CG(rtol=1e-12)
    w, info = solve(il.backward.CompiledImplicit(cg), A, b, c, return_info=True)
    got = torch.autograd.grad(w.sum(), b0)[0]
    assert info.backward.solver == "CG (compiled)"
    want = torch.autograd.grad(solve(il.backward.Implicit(cg), A, 2 * b0, c).sum(), b0)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_proximal_root_with_a_gradient_inside_against_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """iMAML's optimality condition ``∇L(φ) + λ (φ - θ) = 0``, its gradient taken by
    ``torch.func.grad`` inside the function: the backward's check of the tensors the function
    reads is not misled by that gradient (a tensor made outside a torch operation), the loop
    runs compiled, and the meta-gradient is ``λ (H + λ I)⁻¹ g`` with the exact Hessian."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, generator=gen, dtype=torch.float64)
    lam = 2.0

    def train_loss(phi):
        return torch.log(torch.cosh(X @ phi - y)).mean()

    def optimality(phi, theta):
        return torch.func.grad(train_loss)(phi) + lam * (phi - theta)

    def solve_exactly(theta):
        def proximal(phi, theta):
            return train_loss(phi) + 0.5 * lam * (phi - theta).square().sum()

        with torch.no_grad():
            return il.argmin(proximal, theta.clone(), theta, solver=il.solvers.Newton(rtol=1e-14))

    mode = il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12))
    inner = il.custom_root(optimality, symmetric=True, backward=mode, has_aux=True)(
        lambda phi0, theta: (solve_exactly(theta), None))
    theta = torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_(True)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    loops = []
    monkeypatch.setattr(compiled_adjoint, "_compiled_cg", lambda fn: loops.append(fn) or _compiled_cg(fn))
    phi, _ = inner(theta.detach(), theta)
    (got,) = torch.autograd.grad(phi, theta, g)
    H = torch.func.hessian(train_loss)(phi.detach())
    want = lam * torch.linalg.solve(H + lam * torch.eye(5, dtype=torch.float64), g)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert loops == [optimality]  # the compiled loop served the backward


G3 = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))


def _cubic_layer(scale: Callable[[], Any], calls: list[int]) -> Callable[..., torch.Tensor]:
    """``custom_root`` over ``F(w, θ) = G w + s w³ - θ`` (the gradient of ``½ wᵀGw + ¼ Σ s w⁴
    - θᵀw``, minimised by Newton), ``s = scale()`` read at each call, with the compiled
    adjoint; ``calls`` counts the optimality function's eager calls."""

    def optimality(w, theta):
        if not torch.compiler.is_compiling():
            calls[0] += 1
        return G3 @ w + scale() * w.pow(3) - theta

    def objective(w, theta):  # optimality is its gradient; the solver does not call it
        return 0.5 * w @ G3 @ w + 0.25 * (scale() * w.pow(4)).sum() - theta @ w

    @il.custom_root(optimality, symmetric=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    def inner(w0, theta):
        return il.argmin(objective, w0, theta, solver=il.solvers.Newton(rtol=1e-14))

    return inner


def test_steady_state_call_evaluates_the_function_once() -> None:
    """Once compiled, a forward + backward of ``custom_root`` calls the optimality function
    once in Python: the forward's call finds its tensors and records it for the parameter
    gradient; the products run in the compiled loop, whose report of the tensors it read
    checks them. The gradient is the dense ``(∂F/∂w)⁻¹ 1`` (``∂F/∂θ = -I``)."""
    calls = [0]
    inner = _cubic_layer(lambda: 1.0, calls)
    theta = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    w0 = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        w_star = inner(w0, theta)
    jac = G3 + torch.diag(3 * w_star**2)
    want = torch.linalg.solve(jac, torch.ones(3, dtype=torch.float64))
    torch.autograd.grad(inner(w0, theta).sum(), theta)  # compiles the loop
    calls[0] = 0
    (got,) = torch.autograd.grad(inner(w0, theta).sum(), theta)
    assert calls[0] == 1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_custom_root_function_that_reads_other_tensors_at_the_backward() -> None:
    """The closed-over tensor is rebound between the forward and the backward: the compiled
    loop reads the new one, its report says so, and the backward solves eagerly through the
    tensor the layer was called with (the gradient of that problem, not of the new one)."""
    state = {"scale": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)}
    inner = _cubic_layer(lambda: state["scale"], [0])
    theta = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    w0 = torch.zeros(3, dtype=torch.float64)
    torch.autograd.grad(inner(w0, theta).sum(), theta)  # compiles the loop
    scale = state["scale"]
    w = inner(w0, theta)
    w2 = w.detach() ** 2
    u = torch.linalg.solve(G3 + torch.diag(3 * scale.detach() * w2), torch.ones(3, dtype=torch.float64))
    state["scale"] = torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64, requires_grad=True)
    got_theta, got_scale = torch.autograd.grad(w.sum(), (theta, scale))
    torch.testing.assert_close(got_theta, u, rtol=1e-10, atol=1e-12)  # ∂F/∂θ = -I
    torch.testing.assert_close(got_scale, -u * w2 * w.detach(), rtol=1e-10, atol=1e-12)  # ∂F/∂s = w³


class _Layer(torch.nn.Module):
    """An argmin layer over the shared objective whose linear term is a parameter, read by the
    objective from the module (a closure, not an argument)."""

    def __init__(self, mode) -> None:
        super().__init__()
        A, b, c = data()
        self.A, self.c = A.detach(), c.detach()
        self.b = torch.nn.Parameter(b.detach().clone())
        self.mode = mode

    def objective(self, w: torch.Tensor) -> torch.Tensor:
        return objective(w, self.A, self.b, self.c)  # reads the parameter at each call

    def forward(self) -> tuple[torch.Tensor, il.SolveInfo]:
        return il.argmin(self.objective, torch.zeros(B, N, dtype=torch.float64),
                         solver=il.solvers.Newton(rtol=1e-12), backward=self.mode, batched=True,
                         return_info=True)


def test_functional_call_parameters_take_the_eager_path() -> None:
    """After a torch.func.functional_call returns, the module's own parameter is back in
    place: the function no longer reads the tensor the layer was called with, so the backward
    solves eagerly (substituting the saved tensors) and the gradient goes to the swapped-in
    tensor, as with Implicit(CG)."""
    cg = il.linear.CG(rtol=1e-12)
    grads, solvers = [], []
    for mode in (il.backward.CompiledImplicit(cg), il.backward.Implicit(cg)):
        layer = _Layer(mode)
        swapped = (layer.b.detach() * 1.5).requires_grad_(True)
        w, info = torch.func.functional_call(layer, {"b": swapped}, ())
        grads.append(torch.autograd.grad(w.sum(), swapped)[0])
        solvers.append(info.backward.solver)
        assert layer.b.grad is None
    assert solvers == ["CG", "CG"]  # the eager CG served both
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_closed_over_module_parameter_takes_the_compiled_path() -> None:
    cg = il.linear.CG(rtol=1e-12)
    grads, solvers = [], []
    for mode in (il.backward.CompiledImplicit(cg), il.backward.Implicit(cg)):
        layer = _Layer(mode)
        w, info = layer()
        w.sum().backward()
        grads.append(layer.b.grad)
        solvers.append(info.backward.solver)
    assert solvers == ["CG (compiled)", "CG"]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_ridge_breakdown_benchmark_reports_every_part() -> None:
    from benchmarks import ridge_breakdown

    threads = torch.get_num_threads()
    parts = ridge_breakdown.main(["--d", "12", "--rounds", "1", "--calls", "1"])
    assert torch.get_num_threads() == threads  # the benchmark's thread settings are undone
    assert len(parts) == 10 and all(math.isfinite(ms) and ms > 0 for ms in parts.values())


@pytest.mark.slow
def test_ridge_breakdown_floor_compares_equal_hypergradients() -> None:
    """``--floor`` times jaxopt and our two compiled forms only after checking that they give
    the same hypergradient (against autograd through the closed form); each floor of the
    all-alternated rounds is the sum of its parts, and each form has its paired ratio."""
    pytest.importorskip("jaxopt")
    from benchmarks import ridge_breakdown

    out = ridge_breakdown.main(["--d", "12", "--calls", "3", "--floor"])
    errors = {k: v for k, v in out.items() if k.endswith("relative error")}
    assert len(errors) == 3 and all(err < 1e-9 for err in errors.values())
    fixed = out["closed form"] + out["compiled CG loop alone"]
    assert out["floor, whole loss compiled"] == pytest.approx(
        fixed + out["torch.compile of a one-line loss, fwd + bwd"])
    assert out["floor, layer called eagerly"] == pytest.approx(
        fixed + out["eager autograd: pass-through Function + loss"])
    paired = [k for k in out if k.endswith("/ jaxopt, paired")]
    assert len(paired) == 4 and all(math.isfinite(out[k]) and out[k] > 0 for k in paired)


def test_ridge_breakdown_floor_without_jax_says_what_it_needs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import ridge_breakdown

    def missing(name: str) -> None:
        raise ImportError(f"{name} unavailable; pip install {name}")

    monkeypatch.setattr(ridge_breakdown, "import_peer", missing)
    assert ridge_breakdown.main(["--d", "12", "--floor"]) == {}
    assert "--floor needs jax and jaxopt" in capsys.readouterr().out


def test_loop_is_one_graph_without_breaks() -> None:
    """torch's own explain of the loop. Last in the file: explain resets dynamo's caches, so
    the tests after it would compile the loop again."""
    A, b, c = data()
    w = solve(None, A, b, c).detach()
    problem = il._problem.Problem("argmin", objective, (A.detach(), b.detach(), c.detach()), w,
                                  batched=True, name="fun")
    tol = torch.full((B,), 1e-10, dtype=torch.float64)
    explained = torch._dynamo.explain(_cg_loop)(problem.pure_residual, w, b.detach(), tol, torch.tensor(100))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_custom_root_explicit_argument_the_function_ignores(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit argument that requires grad is a parameter even where the function ignores
    it (a zero gradient); the compiled loop, which does not read it, still serves the backward."""
    from implicit_layers._implicit import ImplicitCore

    eager = []
    real = ImplicitCore.linear_solve
    monkeypatch.setattr(ImplicitCore, "linear_solve",
                        lambda self, *a: eager.append(1) or real(self, *a))

    def optimality(w, theta, ignored):
        return G3 @ w + w.pow(3) - theta

    @il.custom_root(optimality, symmetric=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    def inner(w0, theta, ignored):
        return il.argmin(lambda w, t: 0.5 * w @ G3 @ w + 0.25 * w.pow(4).sum() - t @ w, w0, theta,
                         solver=il.solvers.Newton(rtol=1e-14))

    theta = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ignored = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    w = inner(torch.zeros(3, dtype=torch.float64), theta, ignored)
    got_theta, got_ignored = torch.autograd.grad(w.sum(), (theta, ignored))
    u = torch.linalg.solve(G3 + torch.diag(3 * w.detach() ** 2), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(got_theta, u, rtol=1e-10, atol=1e-12)
    assert got_ignored == 0.0 and not eager
