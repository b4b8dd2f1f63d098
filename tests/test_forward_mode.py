"""Forward-mode derivatives through every problem type: ``torch.func.jvp``, ``torch.func.jacfwd``
and ``torch.autograd.forward_ad`` dual tensors.

The tangent of ``z*(θ)`` solves ``(∂F/∂z) ż = -(∂F/∂θ) θ̇``. References: the dense Jacobian of
the implicit function theorem, ``J = -(∂F/∂z)⁻¹ ∂F/∂θ``, built from ``torch.autograd.functional.
jacobian`` of the residual at a solution found independently of the library (a closed form,
Picard or Newton unrolled by hand) and ``torch.linalg.solve``; the transpose identity
``⟨u, J v⟩ = ⟨Jᵀ u, v⟩`` against the library's (first-order, eager) reverse mode; and
``jacrev``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jacrev, jvp

import implicit_layers as il
from tests.helpers import DT, randn_factory, rel

TOL = 1e-7




def ift_jacobian(F, z_star, theta):
    """Dense ``-(∂F/∂z)⁻¹ ∂F/∂θ`` at ``z_star``, shape ``(z.numel(), θ.numel())``."""
    A = torch.autograd.functional.jacobian(lambda z: F(z, theta), z_star)
    Bt = torch.autograd.functional.jacobian(lambda t: F(z_star, t), theta)
    A = A.reshape(z_star.numel(), z_star.numel())
    Bt = Bt.reshape(z_star.numel(), theta.numel())
    return -torch.linalg.solve(A, Bt)


@dataclass
class Case:
    fn: Callable  # θ -> z*
    theta: torch.Tensor
    z_ref: torch.Tensor
    J: torch.Tensor  # dense reference Jacobian (z.numel(), θ.numel())


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
def ridge_case(device, backward=None):
    randn = randn_factory(0, device)
    m, d = 30, 6
    X, y = randn(m, d), randn(m)
    lam = 0.4 + 0.1 * randn(d).abs()

    def fun(w, lam):
        return 0.5 * (X @ w - y).square().sum() + 0.5 * (lam * w.square()).sum()

    def closed_form(lam):
        return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    w0 = torch.zeros(d, dtype=DT, device=device)
    solver = il.solvers.LBFGS(rtol=1e-12)
    fn = lambda lam: il.argmin(fun, w0, lam, solver=solver, backward=backward)  # noqa: E731
    J = torch.autograd.functional.jacobian(closed_form, lam)
    return Case(fn, lam, closed_form(lam), J)


def fixed_point_parts(device, n=4, m=3, seed=3):
    randn = randn_factory(seed, device)
    W = randn(n, n)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    U, b, x = randn(n, m), 0.3 * randn(n), randn(m)

    def f(z, x):
        return torch.tanh(W @ z + U @ x + b)

    def picard(x, steps=200):
        z = torch.zeros(n, dtype=DT, device=device)
        for _ in range(steps):
            z = f(z, x)
        return z

    return f, picard, x, n


def fixed_point_case(device, backward=None):
    f, picard, x, n = fixed_point_parts(device)
    z0 = torch.zeros(n, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)
    fn = lambda x: il.fixed_point(f, z0, x, solver=solver, backward=backward)  # noqa: E731
    z_ref = picard(x)
    return Case(fn, x, z_ref, ift_jacobian(lambda z, x: f(z, x) - z, z_ref, x))


def root_parts(device, n=4, seed=5):
    randn = randn_factory(seed, device)
    M, S = randn(n, n), randn(n, n)
    A = M @ M.T / n + torch.eye(n, dtype=DT, device=device) + 0.3 * (S - S.T) / n
    x = randn(n)

    def F(z, x):
        return A @ z + torch.tanh(z) - x

    def newton(x, steps=30):
        z = torch.zeros(n, dtype=DT, device=device)
        for _ in range(steps):
            z = z - torch.linalg.solve(A + torch.diag(1 - torch.tanh(z) ** 2), F(z, x))
        return z

    return F, newton, x, n


def root_case(device, backward=None):
    F, newton, x, n = root_parts(device)
    z0 = torch.zeros(n, dtype=DT, device=device)
    solver = il.solvers.Broyden(rtol=1e-13, max_steps=300)
    fn = lambda x: il.root(F, z0, x, solver=solver, backward=backward)  # noqa: E731
    z_ref = newton(x)
    return Case(fn, x, z_ref, ift_jacobian(F, z_ref, x))


def custom_root_case(device, backward=None):
    F, newton, x, n = root_parts(device)

    @il.custom_root(F, backward=backward, rtol=1e-13)
    def solve(z0, x):
        return newton(x)

    z0 = torch.zeros(n, dtype=DT, device=device)
    z_ref = newton(x)
    return Case(lambda x: solve(z0, x), x, z_ref, ift_jacobian(F, z_ref, x))


def custom_fixed_point_case(device, backward=None):
    f, picard, x, n = fixed_point_parts(device)

    @il.custom_fixed_point(f, backward=backward, rtol=1e-13)
    def solve(z0, x):
        return picard(x)

    z0 = torch.zeros(n, dtype=DT, device=device)
    z_ref = picard(x)
    return Case(lambda x: solve(z0, x), x, z_ref, ift_jacobian(lambda z, x: f(z, x) - z, z_ref, x))


class Cell(torch.nn.Module):
    def __init__(self, n, seed=6):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=DT)
        self.W = torch.nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.b = torch.nn.Parameter(0.3 * torch.randn(n, generator=gen, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def batched_fixed_point_case(device, backward=None):
    B, n = 3, 4
    cell = Cell(n).to(device)
    x = randn_factory(7, device)(B, n)
    z0 = torch.zeros(B, n, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)

    def f(z, x):
        return cell(z, x)

    fn = lambda x: il.fixed_point(f, z0, x, solver=solver, backward=backward,  # noqa: E731
                                  batched=True)
    with torch.no_grad():
        z = z0
        for _ in range(200):
            z = cell(z, x)
    return Case(fn, x, z, ift_jacobian(lambda z, x: cell(z, x) - z, z, x))


def deq_case(device, backward=None):
    B, n = 3, 4
    cell = Cell(n).to(device)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=300), backward=backward)
    x = randn_factory(8, device)(B, n)
    with torch.no_grad():
        z = torch.zeros(B, n, dtype=DT, device=device)
        for _ in range(200):
            z = cell(z, x)
    return Case(deq, x, z, ift_jacobian(lambda z, x: cell(z, x) - z, z, x))


def argmin_layer_case(device, backward=None):
    """``w*(x) = H⁻¹ tanh(x)`` per sample: ``L(w, x) = ½ wᵀHw - tanh(x)·w``."""
    randn = randn_factory(9, device)
    B, n = 3, 4
    M = randn(n, n)
    H = M @ M.T / n + torch.eye(n, dtype=DT, device=device)
    x = randn(B, n)

    def objective(w, x):
        return 0.5 * ((w @ H) * w).sum(-1) - (torch.tanh(x) * w).sum(-1)

    layer = il.nn.ArgminLayer(objective, solver=il.solvers.LBFGS(rtol=1e-12, max_steps=200),
                              backward=backward, w_shape=(n,))
    closed = lambda x: torch.linalg.solve(H, torch.tanh(x).T).T  # noqa: E731
    J = torch.autograd.functional.jacobian(closed, x).reshape(B * n, B * n)
    return Case(layer, x, closed(x), J)


CASES = {
    "argmin": ridge_case,
    "fixed_point": fixed_point_case,
    "root": root_case,
    "custom_root": custom_root_case,
    "custom_fixed_point": custom_fixed_point_case,
    "fixed_point_batched": batched_fixed_point_case,
    "DEQ": deq_case,
    "ArgminLayer": argmin_layer_case,
}


def test_references_agree_with_finite_differences(device):
    """The dense IFT Jacobians are right: central differences of the hand-written solvers."""
    f, picard, x, _ = fixed_point_parts(device)
    F, newton, xr, _ = root_parts(device)
    for solve, res, theta in ((picard, lambda z, x: f(z, x) - z, x), (newton, F, xr)):
        J = ift_jacobian(res, solve(theta), theta)
        h = 1e-6
        cols = []
        for i in range(theta.numel()):
            e = torch.zeros_like(theta)
            e[i] = h
            cols.append((solve(theta + e) - solve(theta - e)) / (2 * h))
        assert rel(torch.stack(cols, 1), J) < 1e-8


# --------------------------------------------------------------------------------------------
# jvp, forward_ad, transpose identity, jacfwd == jacrev == dense
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_func_jvp_matches_dense_jacobian(name, device):
    c = CASES[name](device)
    v = randn_factory(10, device)(*c.theta.shape)
    z, zdot = jvp(c.fn, (c.theta,), (v,))
    assert rel(z, c.z_ref) < 1e-9
    assert zdot.shape == z.shape
    assert rel(zdot.reshape(-1), c.J @ v.reshape(-1)) < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_forward_ad_dual_tangent_matches_dense_jacobian(name, device):
    c = CASES[name](device)
    v = randn_factory(11, device)(*c.theta.shape)
    with fwAD.dual_level():
        z = c.fn(fwAD.make_dual(c.theta, v))
        primal, tangent = fwAD.unpack_dual(z)
    assert tangent is not None, "the tangent of the solution was dropped"
    assert rel(primal, c.z_ref) < 1e-9
    assert rel(tangent.reshape(-1), c.J @ v.reshape(-1)) < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_and_vjp_satisfy_the_transpose_identity(name, device):
    """``⟨u, J v⟩ = ⟨Jᵀ u, v⟩`` with ``Jᵀ u`` from the library's eager reverse mode."""
    c = CASES[name](device)
    randn = randn_factory(12, device)
    v, u = randn(*c.theta.shape), randn(*c.z_ref.shape)
    _, Jv = jvp(c.fn, (c.theta,), (v,))
    theta = c.theta.detach().clone().requires_grad_(True)
    (JTu,) = torch.autograd.grad(c.fn(theta), theta, u)
    lhs, rhs = float((u * Jv).sum().detach()), float((JTu * v).sum())
    assert abs(lhs - rhs) < TOL * float(u.norm() * v.norm() * torch.linalg.matrix_norm(c.J, 2))


@pytest.mark.parametrize("name", list(CASES))
def test_jacfwd_equals_jacrev_equals_dense(name, device):
    c = CASES[name](device)
    Jf = jacfwd(c.fn)(c.theta).reshape(c.J.shape)
    Jr = jacrev(c.fn)(c.theta).reshape(c.J.shape)
    assert rel(Jf, c.J) < TOL
    assert rel(Jr, c.J) < TOL
    assert rel(Jf, Jr) < TOL


# --------------------------------------------------------------------------------------------
# The tangent solve uses the chosen linear solver (non-transposed operator).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "backward"),
    [
        ("argmin", il.linear.CG()),
        ("argmin", il.linear.MINRES()),
        ("argmin", il.linear.Dense()),
        ("argmin", il.linear.GMRES()),
        ("fixed_point", il.linear.Dense()),
        ("fixed_point", il.linear.BiCGStab()),
        ("fixed_point", il.linear.Broyden()),
        ("fixed_point", il.backward.Implicit(il.linear.GMRES(), fallback=il.backward.Phantom())),
        ("root", il.linear.Dense()),
        ("root", il.linear.GMRES(restart=2)),
        ("custom_root", il.linear.Dense()),
        ("fixed_point_batched", il.linear.Dense()),
        ("DEQ", il.linear.Broyden()),
    ],
    ids=lambda p: p if isinstance(p, str) else repr(p).split("(")[0],
)
def test_jvp_with_each_linear_solver(name, backward, device):
    c = CASES[name](device, backward)
    v = randn_factory(13, device)(*c.theta.shape)
    _, zdot = jvp(c.fn, (c.theta,), (v,))
    assert rel(zdot.reshape(-1), c.J @ v.reshape(-1)) < TOL


def test_batched_tangents_are_per_sample(device):
    """A tangent on one sample of a batch moves that sample's solution only."""
    c = batched_fixed_point_case(device)
    v = torch.zeros_like(c.theta)
    v[1] = randn_factory(14, device)(c.theta.shape[1])
    _, zdot = jvp(c.fn, (c.theta,), (v,))
    assert float(zdot[0].detach().abs().max()) == 0.0 and float(zdot[2].detach().abs().max()) == 0.0
    assert rel(zdot.reshape(-1), c.J @ v.reshape(-1)) < TOL


def test_forward_over_reverse_hvp_matches_closed_form(device):
    """``jvp(grad(ℓ ∘ w*))``: forward mode through a reverse-mode hypergradient."""
    c = ridge_case(device)
    randn = randn_factory(0, device)
    m, d = 30, 6
    X, y = randn(m, d), randn(m)  # the same data as ridge_case (same seed and order)
    closed_form = lambda lam: torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)  # noqa: E731
    outer = lambda w: (w.sin() * w).sum()  # noqa: E731
    v = randn_factory(15, device)(d)
    _, hv = jvp(torch.func.grad(lambda lam: outer(c.fn(lam))), (c.theta,), (v,))
    _, hv_ref = torch.autograd.functional.hvp(lambda lam: outer(closed_form(lam)), c.theta, v)
    assert rel(hv, hv_ref) < 1e-6


# --------------------------------------------------------------------------------------------
# Approximate modes in forward mode: the tangent of their own approximation.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "steps", "eta"),
    [(il.backward.JacobianFree(), 1, 1.0), (il.backward.Truncated(3), 3, 1.0),
     (il.backward.Phantom(4, damping=0.5), 4, 0.5)],
    ids=["JacobianFree", "Truncated3", "Phantom4"],
)
def test_step_modes_tangent_is_that_of_k_steps_from_detached_solution(mode, steps, eta, device):
    f, picard, x, n = fixed_point_parts(device)
    z0 = torch.zeros(n, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)
    z_star = picard(x)

    def explicit(x):
        z = z_star
        for _ in range(steps):
            z = (1 - eta) * z + eta * f(z, x)
        return z

    v = randn_factory(16, device)(x.shape[0])
    _, zdot = jvp(lambda x: il.fixed_point(f, z0, x, solver=solver, backward=mode), (x,), (v,))
    _, zdot_ref = jvp(explicit, (x,), (v,))
    assert rel(zdot, zdot_ref) < 1e-9


def test_unrolled_tangent_is_that_of_the_forward_loop(device):
    f, picard, x, n = fixed_point_parts(device)
    z0 = torch.zeros(n, dtype=DT, device=device)
    K = 6
    solver = il.solvers.Picard(rtol=0.0, max_steps=K, on_failure="ignore")
    v = randn_factory(17, device)(x.shape[0])
    layer = lambda x: il.fixed_point(f, z0, x, solver=solver,  # noqa: E731
                                     backward=il.backward.Unrolled())
    _, zdot = jvp(layer, (x,), (v,))
    _, zdot_ref = jvp(lambda x: picard(x, K), (x,), (v,))
    assert rel(zdot, zdot_ref) < 1e-12
