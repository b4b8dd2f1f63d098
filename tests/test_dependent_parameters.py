"""Arguments computed from one another: the implicit gradient counts each path once.

A layer called as ``fixed_point(f, z0, W, 2 * W)`` (or a QP with ``b = A @ z0`` beside ``A``)
differentiates ``F`` partially in each argument; the caller's autograd then carries ``2 * W``'s
share back to ``W``. Checked against autograd through the unrolled iteration, central
differences and a dense solve, on every backward path (ordinary, ``create_graph=True``,
``torch.func``).
"""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from tests.helpers import DT, rel

X = torch.tensor([0.3, -0.2, 0.5], dtype=DT)


def _map(z, A, B):
    return torch.tanh(A @ z + B @ X)


def _W():
    return (0.3 * torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))).requires_grad_()


def _unrolled_grad(W):
    def loss(W):
        z = torch.zeros(3, dtype=DT)
        for _ in range(200):
            z = _map(z, W, 2 * W)
        return z.square().sum()

    return torch.autograd.grad(loss(W), W)[0]


def _implicit(W, **kw):
    return il.fixed_point(_map, torch.zeros(3, dtype=DT), W, 2 * W, **kw)


def test_fixed_point_first_order_matches_unrolled():
    W = _W()
    (g,) = torch.autograd.grad(_implicit(W).square().sum(), W)
    assert rel(g, _unrolled_grad(W)) < 1e-9


def test_fixed_point_create_graph_and_torch_func_match_unrolled():
    W = _W()
    (g,) = torch.autograd.grad(_implicit(W).square().sum(), W, create_graph=True)
    reference = _unrolled_grad(W)
    assert rel(g.detach(), reference) < 1e-9
    g_func = torch.func.grad(lambda W_: _implicit(W_).square().sum())(W.detach())
    assert rel(g_func, reference) < 1e-9


def test_a_closure_over_a_tensor_derived_from_an_argument():
    # The derived tensor reaches the map by closure, the original as an argument.
    W = _W()
    B = 2 * W

    z = il.fixed_point(lambda z, A: torch.tanh(A @ z + B @ X), torch.zeros(3, dtype=DT), W)
    (g,) = torch.autograd.grad(z.square().sum(), W)
    assert rel(g, _unrolled_grad(W)) < 1e-9


@pytest.mark.parametrize("backward", ["default", "dense"])
def test_argmin_with_a_derived_regulariser(backward):
    # w* = argmin ½‖w - t‖² + ½ λ‖w‖² + ½ (2λ) ‖w‖² = t / (1 + 3λ), λ passed twice.
    t = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def objective(w, a, b):
        return 0.5 * (w - t).square().sum() + 0.5 * a * w.square().sum() + 0.5 * b * w.square().sum()

    kw = {} if backward == "default" else {"backward": il.linear.Dense()}
    w = il.argmin(objective, torch.zeros(3, dtype=DT), lam, 2 * lam, **kw)
    (g,) = torch.autograd.grad(w.sum(), lam)
    exact = -3 * t.sum() / (1 + 3 * lam.detach()) ** 2
    assert abs(float(g - exact)) < 1e-8 * abs(float(exact))


def test_qp_with_equality_right_hand_side_computed_from_its_matrix():
    # OptNet's parametrisation: b = A z0 with A learned. Against central differences.
    g = torch.Generator().manual_seed(1)
    n, p = 6, 2
    Q = torch.eye(n, dtype=DT)
    q = torch.randn(n, dtype=DT, generator=g)
    G, h = -torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT)
    z0 = torch.rand(n, dtype=DT, generator=g) + 0.1
    A = torch.randn(p, n, dtype=DT, generator=g).requires_grad_()
    w = torch.randn(n, dtype=DT, generator=g)

    def loss(A_):
        return (il.qp(Q, q, G, h, A_, A_ @ z0) * w).sum()

    (grad,) = torch.autograd.grad(loss(A), A)
    D = torch.randn(p, n, dtype=DT, generator=g)
    e = 1e-6
    with torch.no_grad():
        fd = (loss(A + e * D) - loss(A - e * D)) / (2 * e)
    assert abs(float((grad * D).sum() - fd)) < 1e-7 * max(1.0, abs(float(fd)))


def test_qp_layer_parameter_gradients_match_central_differences():
    # QPLayer's h = G z0 + softplus(s0) and b = A z0 reach il.qp beside G and A themselves.
    torch.manual_seed(3)
    layer = il.nn.QPLayer(5, n_ineq=6, n_eq=2, dtype=DT)
    with torch.no_grad():
        layer.z0.copy_(0.3 * torch.randn(5, dtype=DT))
        layer.L.add_(0.2 * torch.randn(5, 5, dtype=DT))
    q = torch.randn(4, 5, dtype=DT)
    w = torch.randn(4, 5, dtype=DT)
    (layer(q) * w).sum().backward()
    e = 1e-6
    for name, param in layer.named_parameters():
        D = torch.randn(param.shape, dtype=DT)
        with torch.no_grad():
            param.add_(e * D)
            plus = (layer(q) * w).sum()
            param.sub_(2 * e * D)
            minus = (layer(q) * w).sum()
            param.add_(e * D)
        fd = float((plus - minus) / (2 * e))
        assert abs(float((param.grad * D).sum()) - fd) < 1e-6 * max(1.0, abs(fd)), name


@pytest.mark.parametrize("mode", ["default", "gmres", "neumann", "unrolled", "jacobian_free", "phantom"])
def test_every_backward_mode_obeys_the_chain_rule(mode):
    # d/dW of a layer called with (W, 2W) = ∂A + 2 ∂B of the same layer called with two leaves.
    backward = {
        "default": None, "gmres": il.linear.GMRES(), "neumann": il.linear.Neumann(100),
        "unrolled": il.backward.Unrolled(), "jacobian_free": il.backward.JacobianFree(),
        "phantom": il.backward.Phantom(5, damping=0.8),
    }[mode]
    kw = {} if backward is None else {"backward": backward}
    if mode == "unrolled":
        kw["solver"] = il.solvers.Picard(max_steps=300)
    W = _W()
    (g,) = torch.autograd.grad(il.fixed_point(_map, torch.zeros(3, dtype=DT), W, 2 * W, **kw).sum(), W)
    A, B = W.detach().clone().requires_grad_(), (2 * W.detach()).requires_grad_()
    gA, gB = torch.autograd.grad(il.fixed_point(_map, torch.zeros(3, dtype=DT), A, B, **kw).sum(), (A, B))
    assert rel(g, gA + 2 * gB) < 1e-12


def test_composite_argmin_with_the_prox_strength_derived_from_an_argument():
    # The objective takes θ, the proximal operator closes over λ = 0.01 exp(θ).
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 5, dtype=DT, generator=g), torch.randn(20, dtype=DT, generator=g)

    def objective(w, t):
        return 0.5 * (X @ w - y).square().mean() + 0.5 * t * w.square().sum()

    def solve(t, lam):
        return il.argmin(objective, torch.zeros(5, dtype=DT), t, prox=il.prox.bind(il.prox.l1, lam))

    theta = torch.tensor(0.5, dtype=DT, requires_grad=True)
    (grad,) = torch.autograd.grad(solve(theta, 0.01 * theta.exp()).sum(), theta)
    t, lam = theta.detach().clone().requires_grad_(), (0.01 * theta.detach().exp()).requires_grad_()
    g_t, g_lam = torch.autograd.grad(solve(t, lam).sum(), (t, lam))
    assert rel(grad, g_t + g_lam * 0.01 * theta.detach().exp()) < 1e-10
    e = 1e-6
    with torch.no_grad():
        plus = solve(theta + e, 0.01 * (theta + e).exp())
        minus = solve(theta - e, 0.01 * (theta - e).exp())
        fd = (plus - minus).sum() / (2 * e)
    assert abs(float(grad - fd)) < 1e-6 * max(1.0, abs(float(fd)))
