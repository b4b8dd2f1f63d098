"""Second and third derivatives (reverse mode, ``create_graph=True``) through every implicit path.

References, each independent of the library's backward: autograd through a dense closed form
(ridge), double backward through a forward unrolled by hand to convergence (fixed point: Picard;
root: Newton), central finite differences in float64 of a gradient, and ``gradgradcheck``. The
references are themselves checked against finite differences of their own gradients.

The approximate backward modes are held to their own definition: the derivatives of every order
of ``JacobianFree``/``Truncated(k)``/``Phantom(k)`` are those of the explicit ``k``-step
computation ``z ← z - η F(z)`` started at the *detached* solution; ``Unrolled()`` is the explicit
forward loop; ``Implicit(Neumann(k))`` replaces ``A⁻¹`` by ``N_k = η Σ_{j<k} (I - η A)^j`` in every
derivative (checked where ``A`` is constant, so the definition is unambiguous).
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicit_layers as il
from tests.helpers import DT, leaf, randn_factory, rel


def derivatives(phi, t0, order):
    """``[φ'(t0), ..., φ^(order)(t0)]`` of a scalar function of a scalar, by nested autograd."""
    t = leaf(t0)
    out, d = [], phi(t)
    for _ in range(order):
        (d,) = torch.autograd.grad(d, t, create_graph=True)
        out.append(d.detach())
    return out


def fd_hessian(grad_fn, theta, h=1e-5):
    """Central differences of a gradient function: the Hessian column by column."""
    cols = []
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e.view(-1)[i] = h
        cols.append((grad_fn(theta + e) - grad_fn(theta - e)).reshape(-1) / (2 * h))
    return torch.stack(cols, dim=1)


# --------------------------------------------------------------------------------------------
# Ridge regression: the closed form is differentiable to every order.
# --------------------------------------------------------------------------------------------
class Ridge:
    """``w*(λ) = argmin ½‖Xw - y‖² + ½ Σ λ_j w_j²`` with outer loss ``Σ sin(w) + ‖w‖⁴ / 4``."""

    def __init__(self, device, m=30, d=6):
        randn = randn_factory(0, device)
        self.X, self.y = randn(m, d), randn(m)
        self.lam = torch.full((d,), 0.4, dtype=DT, device=device) + 0.1 * randn(d).abs()
        self.d = d
        self.device = device

    def fun(self, w, lam):
        return 0.5 * (self.X @ w - self.y).square().sum() + 0.5 * (lam * w.square()).sum()

    def closed_form(self, lam):
        H = self.X.T @ self.X + torch.diag(lam.expand(self.d))
        return torch.linalg.solve(H, self.X.T @ self.y)

    @staticmethod
    def outer(w):
        return w.sin().sum() + 0.25 * w.square().sum().square()

    def w0(self):
        return torch.zeros(self.d, dtype=DT, device=self.device)

    def layer(self, backward=None):
        solver = il.solvers.LBFGS(rtol=1e-12)
        return lambda lam: il.argmin(self.fun, self.w0(), lam, solver=solver, backward=backward)


IMPLICIT_ARGMIN = [
    pytest.param(None, id="default"),
    pytest.param(il.linear.CG(), id="CG"),
    pytest.param(il.linear.MINRES(), id="MINRES"),
    pytest.param(il.linear.GMRES(), id="GMRES"),
    pytest.param(il.linear.BiCGStab(), id="BiCGStab"),
    pytest.param(il.linear.Broyden(), id="Broyden"),
    pytest.param(il.linear.Dense(), id="Dense"),
    pytest.param(il.backward.Implicit(il.linear.CG(), fallback=il.backward.Phantom()),
                 id="CG+fallback"),
]


def test_ridge_reference_hessian_matches_finite_differences(device):
    """The closed-form Hessian used below is right: central differences of its gradient."""
    p = Ridge(device)
    H = torch.autograd.functional.hessian(lambda lam: p.outer(p.closed_form(lam)), p.lam)

    def grad(lam):
        lam = leaf(lam)
        return torch.autograd.grad(p.outer(p.closed_form(lam)), lam)[0]

    assert rel(fd_hessian(grad, p.lam), H) < 1e-7


@pytest.mark.parametrize("backward", IMPLICIT_ARGMIN)
def test_argmin_hessian_of_outer_loss_matches_closed_form(backward, device):
    p = Ridge(device)
    layer = p.layer(backward)
    H = torch.autograd.functional.hessian(lambda lam: p.outer(layer(lam)), p.lam)
    H_ref = torch.autograd.functional.hessian(lambda lam: p.outer(p.closed_form(lam)), p.lam)
    assert rel(H, H_ref) < 1e-6


@pytest.mark.parametrize("backward", [None, il.linear.CG(), il.linear.Dense()],
                         ids=["default", "CG", "Dense"])
def test_argmin_hvp_of_hypergradient_matches_closed_form(backward, device):
    p = Ridge(device)
    v = randn_factory(1, device)(p.d)
    layer = p.layer(backward)
    _, hv = torch.autograd.functional.hvp(lambda lam: p.outer(layer(lam)), p.lam, v)
    _, hv_ref = torch.autograd.functional.hvp(lambda lam: p.outer(p.closed_form(lam)), p.lam, v)
    assert rel(hv, hv_ref) < 1e-6


def test_argmin_third_derivative_matches_closed_form(device):
    """One shared decay ``λ``: ``d³ℓ/dλ³`` through the layer against the closed form, whose own
    third derivative is checked against central differences of its second."""
    p = Ridge(device)
    layer = p.layer(il.linear.CG())
    lam0 = torch.tensor(0.7, dtype=DT, device=device)
    got = derivatives(lambda t: p.outer(layer(t)), lam0, 3)
    ref = derivatives(lambda t: p.outer(p.closed_form(t)), lam0, 3)
    h = 1e-4
    d2 = [derivatives(lambda t: p.outer(p.closed_form(t)), lam0 + s, 2)[1] for s in (h, -h)]
    assert abs(float((d2[0] - d2[1]) / (2 * h) - ref[2])) < 1e-6 * abs(float(ref[2]))
    for k in range(3):
        assert abs(float(got[k] - ref[k])) < 1e-6 * abs(float(ref[k])), k


def test_argmin_gradgradcheck(device):
    p = Ridge(device, m=12, d=3)
    layer = p.layer(il.linear.CG())
    assert gradgradcheck(lambda lam: layer(lam), (leaf(p.lam),))


def test_argmin_layer_mixed_second_derivative_matches_closed_form(device):
    """A gradient penalty on ``ArgminLayer``'s input, differentiated w.r.t. the objective's
    parameter: ``w*(x) = (H + diag(softplus(p)))⁻¹ x`` per sample."""
    randn = randn_factory(2, device)
    n, B = 4, 3
    M = randn(n, n)
    H = M @ M.T / n + torch.eye(n, dtype=DT, device=device)

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(randn(n))

        def forward(self, w, x):
            s = torch.nn.functional.softplus(self.p)
            return 0.5 * ((w @ H) * w).sum(-1) + 0.5 * (s * w * w).sum(-1) - (x * w).sum(-1)

    obj = Objective()
    layer = il.nn.ArgminLayer(obj, solver=il.solvers.LBFGS(rtol=1e-12, max_steps=200),
                              backward=il.linear.CG(), w_shape=(n,))
    x = randn(B, n)

    def penalty(solve):
        xx = leaf(x)
        w = solve(xx)
        (gx,) = torch.autograd.grad((w.sin()).sum(), xx, create_graph=True)
        return gx.square().sum()

    (g,) = torch.autograd.grad(penalty(layer), obj.p)

    def closed(xx):
        A = H + torch.diag(torch.nn.functional.softplus(obj.p))
        return torch.linalg.solve(A, xx.T).T

    (g_ref,) = torch.autograd.grad(penalty(closed), obj.p)
    assert rel(g, g_ref) < 1e-6


# --------------------------------------------------------------------------------------------
# Fixed point z = tanh(W z + U x + b): the reference is Picard unrolled by hand.
# --------------------------------------------------------------------------------------------
class FixedPoint:
    def __init__(self, device, n=4, m=3, contraction=0.6, seed=3):
        randn = randn_factory(seed, device)
        W = randn(n, n)
        self.W = contraction * W / torch.linalg.matrix_norm(W, 2)
        self.U, self.b, self.x = randn(n, m), 0.3 * randn(n), randn(m)
        self.v = randn(m)
        self.n = n
        self.device = device

    def f(self, z, x):
        return torch.tanh(self.W @ z + self.U @ x + self.b)

    def z0(self):
        return torch.zeros(self.n, dtype=DT, device=self.device)

    def unrolled(self, x, steps=120):
        z = self.z0()
        for _ in range(steps):
            z = self.f(z, x)
        return z

    @staticmethod
    def outer(z):
        return (z.sin() * z).sum() + z.square().sum().square()

    def layer(self, backward=None):
        solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)
        return lambda x: il.fixed_point(self.f, self.z0(), x, solver=solver, backward=backward)


IMPLICIT_NONSYMMETRIC = [
    pytest.param(None, id="default"),
    pytest.param(il.linear.GMRES(), id="GMRES"),
    pytest.param(il.linear.GMRES(restart=2), id="GMRES-restart2"),
    pytest.param(il.linear.BiCGStab(), id="BiCGStab"),
    pytest.param(il.linear.Broyden(), id="Broyden"),
    pytest.param(il.linear.Dense(), id="Dense"),
    pytest.param(il.backward.Implicit(il.linear.GMRES(), fallback=il.backward.JacobianFree()),
                 id="GMRES+fallback"),
]


def test_fixed_point_unrolled_reference_is_converged(device):
    """The hand-unrolled reference has converged in value and in its second derivative."""
    p = FixedPoint(device)
    H = torch.autograd.functional.hessian(lambda x: p.outer(p.unrolled(x)), p.x)

    def grad(x):
        x = leaf(x)
        return torch.autograd.grad(p.outer(p.unrolled(x)), x)[0]

    assert rel(fd_hessian(grad, p.x), H) < 1e-7
    H_more = torch.autograd.functional.hessian(lambda x: p.outer(p.unrolled(x, 200)), p.x)
    assert rel(H_more, H) < 1e-12


@pytest.mark.parametrize("backward", IMPLICIT_NONSYMMETRIC)
def test_fixed_point_hessian_matches_unrolled(backward, device):
    p = FixedPoint(device)
    layer = p.layer(backward)
    H = torch.autograd.functional.hessian(lambda x: p.outer(layer(x)), p.x)
    H_ref = torch.autograd.functional.hessian(lambda x: p.outer(p.unrolled(x)), p.x)
    assert rel(H, H_ref) < 1e-6


@pytest.mark.parametrize("backward", [None, il.linear.Dense()], ids=["default", "Dense"])
def test_fixed_point_third_derivative_matches_unrolled(backward, device):
    p = FixedPoint(device)
    layer = p.layer(backward)
    t0 = torch.tensor(0.0, dtype=DT, device=device)
    got = derivatives(lambda t: p.outer(layer(p.x + t * p.v)), t0, 3)
    ref = derivatives(lambda t: p.outer(p.unrolled(p.x + t * p.v)), t0, 3)
    for k in range(3):
        assert abs(float(got[k] - ref[k])) < 1e-6 * abs(float(ref[k])), k


def test_fixed_point_second_derivative_wrt_closed_over_weight(device):
    """``W`` is closed over (not an argument): ``∂²ℓ/∂W∂x`` by a gradient penalty on ``x``."""
    p = FixedPoint(device)
    W = leaf(p.W)
    f = lambda z, x: torch.tanh(W @ z + p.U @ x + p.b)  # noqa: E731
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)

    def penalty(solve):
        x = leaf(p.x)
        (gx,) = torch.autograd.grad(p.outer(solve(x)), x, create_graph=True)
        return gx.square().sum()

    (g,) = torch.autograd.grad(penalty(lambda x: il.fixed_point(f, p.z0(), x, solver=solver)), W)

    def unrolled(x):
        z = p.z0()
        for _ in range(120):
            z = f(z, x)
        return z

    (g_ref,) = torch.autograd.grad(penalty(unrolled), W)
    assert rel(g, g_ref) < 1e-6


def test_fixed_point_batched_gradgradcheck(device):
    p = FixedPoint(device, n=3, m=3)
    B = 2
    x = randn_factory(4, device)(B, 3)

    def layer(x):
        z0 = torch.zeros(B, 3, dtype=DT, device=device)
        return il.fixed_point(lambda z, x: torch.tanh(z @ p.W.T + x), z0, x,
                              solver=il.solvers.Anderson(rtol=1e-13), batched=True)

    assert gradgradcheck(layer, (leaf(x),))


# --------------------------------------------------------------------------------------------
# Root F(z) = A z + tanh(z) - x: the reference is Newton's method unrolled by hand.
# --------------------------------------------------------------------------------------------
class Root:
    def __init__(self, device, n=4, seed=5):
        randn = randn_factory(seed, device)
        M = randn(n, n)
        S = randn(n, n)
        self.A = M @ M.T / n + torch.eye(n, dtype=DT, device=device) + 0.3 * (S - S.T) / n
        self.x, self.v = randn(n), randn(n)
        self.n = n
        self.device = device

    def F(self, z, x):
        return self.A @ z + torch.tanh(z) - x

    def z0(self):
        return torch.zeros(self.n, dtype=DT, device=self.device)

    def newton(self, x, steps=30):
        z = self.z0()
        for _ in range(steps):
            J = self.A + torch.diag(1 - torch.tanh(z) ** 2)
            z = z - torch.linalg.solve(J, self.F(z, x))
        return z

    @staticmethod
    def outer(z):
        return (z.cos() * z).sum() + z.square().sum().square()

    def layer(self, backward=None):
        solver = il.solvers.Broyden(rtol=1e-13, max_steps=300)
        return lambda x: il.root(self.F, self.z0(), x, solver=solver, backward=backward)


def test_root_newton_reference_matches_finite_differences(device):
    p = Root(device)
    H = torch.autograd.functional.hessian(lambda x: p.outer(p.newton(x)), p.x)

    def grad(x):
        x = leaf(x)
        return torch.autograd.grad(p.outer(p.newton(x)), x)[0]

    assert rel(fd_hessian(grad, p.x), H) < 1e-7


@pytest.mark.parametrize("backward", IMPLICIT_NONSYMMETRIC)
def test_root_hessian_matches_unrolled_newton(backward, device):
    p = Root(device)
    layer = p.layer(backward)
    H = torch.autograd.functional.hessian(lambda x: p.outer(layer(x)), p.x)
    H_ref = torch.autograd.functional.hessian(lambda x: p.outer(p.newton(x)), p.x)
    assert rel(H, H_ref) < 1e-6


def test_root_third_derivative_matches_unrolled_newton(device):
    p = Root(device)
    layer = p.layer()
    t0 = torch.tensor(0.0, dtype=DT, device=device)
    got = derivatives(lambda t: p.outer(layer(p.x + t * p.v)), t0, 3)
    ref = derivatives(lambda t: p.outer(p.newton(p.x + t * p.v)), t0, 3)
    for k in range(3):
        assert abs(float(got[k] - ref[k])) < 1e-6 * abs(float(ref[k])), k


def test_root_gradgradcheck(device):
    p = Root(device, n=3)
    layer = p.layer()
    A = leaf(p.A)

    def layer_A(A, x):
        F = lambda z, A, x: A @ z + torch.tanh(z) - x  # noqa: E731
        return il.root(F, p.z0(), A, x, solver=il.solvers.Broyden(rtol=1e-13, max_steps=300))

    assert gradgradcheck(layer, (leaf(p.x),))
    assert gradgradcheck(layer_A, (A, leaf(p.x)))


# --------------------------------------------------------------------------------------------
# custom_root / custom_fixed_point around hand-written solvers.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backward", [None, il.linear.Dense(), il.linear.BiCGStab()],
                         ids=["default", "Dense", "BiCGStab"])
def test_custom_root_hessian_and_gradgradcheck(backward, device):
    p = Root(device)

    @il.custom_root(p.F, backward=backward, rtol=1e-13)
    def newton(z0, x):
        return p.newton(x)  # runs on detached inputs: a black box

    layer = lambda x: newton(p.z0(), x)  # noqa: E731
    H = torch.autograd.functional.hessian(lambda x: p.outer(layer(x)), p.x)
    H_ref = torch.autograd.functional.hessian(lambda x: p.outer(p.newton(x)), p.x)
    assert rel(H, H_ref) < 1e-6
    assert gradgradcheck(layer, (leaf(p.x),))


def test_custom_root_symmetric_third_derivative_matches_closed_form(device):
    p = Ridge(device)

    @il.custom_root(lambda w, lam: torch.func.grad(p.fun)(w, lam), symmetric=True, rtol=1e-13)
    def ridge(w0, lam):
        return p.closed_form(lam)

    lam0 = torch.tensor(0.7, dtype=DT, device=device)
    got = derivatives(lambda t: p.outer(ridge(p.w0(), t)), lam0, 3)
    ref = derivatives(lambda t: p.outer(p.closed_form(t)), lam0, 3)
    for k in range(3):
        assert abs(float(got[k] - ref[k])) < 1e-6 * abs(float(ref[k])), k


def test_custom_fixed_point_hessian_and_gradgradcheck(device):
    p = FixedPoint(device)

    @il.custom_fixed_point(p.f, rtol=1e-13)
    def picard(z0, x):
        return p.unrolled(x, 200)

    layer = lambda x: picard(p.z0(), x)  # noqa: E731
    H = torch.autograd.functional.hessian(lambda x: p.outer(layer(x)), p.x)
    H_ref = torch.autograd.functional.hessian(lambda x: p.outer(p.unrolled(x)), p.x)
    assert rel(H, H_ref) < 1e-6
    assert gradgradcheck(layer, (leaf(p.x),))


# --------------------------------------------------------------------------------------------
# nn.DEQ: a gradient penalty (double backward) to the cell's parameters.
# --------------------------------------------------------------------------------------------
class Cell(torch.nn.Module):
    def __init__(self, n, seed=6, contraction=0.6):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=DT)
        self.W = torch.nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, 2))
        self.b = torch.nn.Parameter(0.3 * torch.randn(n, generator=gen, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


@pytest.mark.parametrize("backward", [None, il.linear.Dense(), il.linear.Broyden()],
                         ids=["default", "Dense", "Broyden"])
def test_deq_gradient_penalty_matches_unrolled(backward, device):
    n, B = 5, 3
    cell = Cell(n).to(device)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=300), backward=backward)
    x = randn_factory(7, device)(B, n)

    def unrolled(x):
        z = torch.zeros_like(x)
        for _ in range(120):
            z = cell(z, x)
        return z

    def loss(layer):
        xx = leaf(x)
        z = layer(xx)
        (gx,) = torch.autograd.grad(z.square().sum(), xx, create_graph=True)
        return (z.sin()).sum() + gx.square().sum()

    got = torch.autograd.grad(loss(deq), (cell.W, cell.b))
    ref = torch.autograd.grad(loss(unrolled), (cell.W, cell.b))
    for g, r in zip(got, ref, strict=True):
        assert rel(g, r) < 1e-6


# --------------------------------------------------------------------------------------------
# Nested implicit layers: an argmin whose objective calls il.fixed_point.
# --------------------------------------------------------------------------------------------
class Nested:
    """``w*(θ) = argmin_w ½‖w - θ‖² + ½ c ‖z*(w)‖²`` with ``z*(w) = tanh(W z* + w)``."""

    def __init__(self, device, n=3, seed=8):
        randn = randn_factory(seed, device)
        W = randn(n, n)
        self.W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
        self.theta, self.v = randn(n), randn(n)
        self.n = n
        self.device = device

    def zeros(self):
        return torch.zeros(self.n, dtype=DT, device=self.device)

    def layer(self, inner_backward=None, outer_backward=None, rtol=1e-12):
        inner_solver = il.solvers.Anderson(rtol=1e-14, max_steps=300)

        def inner(w):
            return il.fixed_point(lambda z, w: torch.tanh(self.W @ z + w), self.zeros(), w,
                                  solver=inner_solver, backward=inner_backward)

        def fun(w, theta):
            return 0.5 * (w - theta).square().sum() + 0.75 * inner(w).square().sum()

        solver = il.solvers.LBFGS(rtol=rtol, max_steps=300)
        return lambda theta: il.argmin(fun, self.zeros(), theta, solver=solver,
                                       backward=outer_backward)

    @staticmethod
    def outer(w):
        return (w.sin() * w).sum()


@pytest.mark.parametrize("outer_backward", [None, il.linear.CG(), il.linear.Dense()],
                         ids=["outer-default", "outer-CG", "outer-Dense"])
@pytest.mark.parametrize("inner_backward", [None, il.linear.Dense(), il.linear.Broyden()],
                         ids=["inner-default", "inner-Dense", "inner-Broyden"])
def test_nested_hypergradient_matches_finite_differences(inner_backward, outer_backward, device):
    p = Nested(device)
    layer = p.layer(inner_backward, outer_backward)
    theta = leaf(p.theta)
    (g,) = torch.autograd.grad(p.outer(layer(theta)), theta)
    precise = p.layer(rtol=1e-14)
    h = 1e-5
    with torch.no_grad():
        fd = (p.outer(precise(p.theta + h * p.v)) - p.outer(precise(p.theta - h * p.v))) / (2 * h)
    assert abs(float(g @ p.v - fd)) < 1e-6 * float(g.norm() * p.v.norm())


def test_nested_hvp_matches_finite_differences_of_gradient(device):
    p = Nested(device)
    layer = p.layer()
    _, hv = torch.autograd.functional.hvp(lambda th: p.outer(layer(th)), p.theta, p.v)

    def grad(th):
        th = leaf(th)
        return torch.autograd.grad(p.outer(layer(th)), th)[0]

    h = 1e-4
    fd = (grad(p.theta + h * p.v) - grad(p.theta - h * p.v)) / (2 * h)
    assert rel(hv, fd) < 1e-5


# --------------------------------------------------------------------------------------------
# Approximate modes: the exact derivatives of their own approximation.
# --------------------------------------------------------------------------------------------
STEP_MODES = [
    pytest.param(il.backward.JacobianFree(), 1, 1.0, id="JacobianFree"),
    pytest.param(il.backward.Truncated(3), 3, 1.0, id="Truncated3"),
    pytest.param(il.backward.Phantom(4, damping=0.5), 4, 0.5, id="Phantom4"),
]


@pytest.mark.parametrize(("mode", "steps", "eta"), STEP_MODES)
def test_step_modes_second_derivative_is_that_of_k_steps_from_detached_solution(
    mode, steps, eta, device
):
    p = FixedPoint(device)
    layer = p.layer(mode)
    with torch.no_grad():
        z_star = p.unrolled(p.x, 200)

    def explicit(x):
        z = z_star  # detached: the approximation does not see z*'s dependence on x
        for _ in range(steps):
            z = (1 - eta) * z + eta * p.f(z, x)
        return z

    H = torch.autograd.functional.hessian(lambda x: p.outer(layer(x)), p.x)
    H_ref = torch.autograd.functional.hessian(lambda x: p.outer(explicit(x)), p.x)
    H_exact = torch.autograd.functional.hessian(lambda x: p.outer(p.unrolled(x)), p.x)
    assert rel(H_ref, H_exact) > 1e-3  # the approximation is visibly not the exact Hessian
    assert rel(H, H_ref) < 1e-6


def test_truncated_argmin_third_derivative_is_that_of_k_gradient_steps(device):
    p = Ridge(device)
    eta, k = 0.02, 5
    layer = p.layer(il.backward.Truncated(k, step_size=eta))
    lam0 = torch.tensor(0.7, dtype=DT, device=device)
    w_star = p.closed_form(lam0)

    def explicit(lam):
        w = w_star
        for _ in range(k):
            w = w - eta * torch.func.grad(p.fun)(w, lam)
        return w

    got = derivatives(lambda t: p.outer(layer(t)), lam0, 3)
    ref = derivatives(lambda t: p.outer(explicit(t)), lam0, 3)
    for j in range(3):
        assert abs(float(got[j] - ref[j])) < 1e-6 * abs(float(ref[j])), j


def test_neumann_and_truncated_hessians_replace_the_inverse_by_the_series(device):
    """``min ½ wᵀHw - θᵀw`` (``A = H`` constant): every derivative of ``ℓ(w*(θ))`` uses ``N_k``
    for ``H⁻¹``, so the Hessian is ``N_k ∇²ℓ(w*) N_k`` (exact: ``H⁻¹ ∇²ℓ H⁻¹``)."""
    randn = randn_factory(9, device)
    n, k = 5, 4
    M = randn(n, n)
    Hm = M @ M.T / n + torch.eye(n, dtype=DT, device=device)
    eta = float(1.0 / torch.linalg.eigvalsh(Hm)[-1])
    theta = randn(n)
    fun = lambda w, th: 0.5 * w @ Hm @ w - th @ w  # noqa: E731
    outer = lambda w: (w.sin() * w).sum()  # noqa: E731
    w_star = torch.linalg.solve(Hm, theta)
    I = torch.eye(n, dtype=DT, device=device)
    Nk = eta * sum(torch.linalg.matrix_power(I - eta * Hm, j) for j in range(k))
    hess_l = torch.autograd.functional.hessian(outer, w_star)
    expected = Nk @ hess_l @ Nk
    exact = torch.linalg.solve(Hm, torch.linalg.solve(Hm, hess_l).T)
    assert rel(expected, exact) > 1e-2

    solver = il.solvers.LBFGS(rtol=1e-13)
    neumann = il.linear.Neumann(max_steps=k, alpha=eta, rtol=0.0, on_failure="ignore")
    for backward in (il.backward.Truncated(k, step_size=eta), neumann):
        def loss(th, backward=backward):
            w0 = torch.zeros(n, dtype=DT, device=device)
            return outer(il.argmin(fun, w0, th, solver=solver, backward=backward))

        H = torch.autograd.functional.hessian(loss, theta)
        assert rel(H, expected) < 1e-6, backward


def test_unrolled_second_derivative_is_that_of_the_forward_loop(device):
    """``Unrolled()`` with ``K`` Picard steps (not converged) is the explicit ``K``-step loop."""
    p = FixedPoint(device)
    K = 6
    solver = il.solvers.Picard(rtol=0.0, max_steps=K, on_failure="ignore")
    layer = lambda x: il.fixed_point(p.f, p.z0(), x, solver=solver,  # noqa: E731
                                     backward=il.backward.Unrolled())
    t0 = torch.tensor(0.0, dtype=DT, device=device)
    got = derivatives(lambda t: p.outer(layer(p.x + t * p.v)), t0, 3)
    ref = derivatives(lambda t: p.outer(p.unrolled(p.x + t * p.v, K)), t0, 3)
    for j in range(3):
        assert abs(float(got[j] - ref[j])) < 1e-9 * abs(float(ref[j])), j


def test_first_order_gradcheck_still_holds_with_create_graph_paths(device):
    """The first-order gradient stays exact (a regression guard for the rewritten backward)."""
    p = Ridge(device, m=12, d=3)
    assert gradcheck(p.layer(il.linear.CG()), (leaf(p.lam),))


# --------------------------------------------------------------------------------------------
# Composability: graphs only on request, float32, NaN never returned as a second derivative.
# --------------------------------------------------------------------------------------------
def test_gradient_carries_a_graph_only_with_create_graph(device):
    p = Ridge(device)
    layer = p.layer()
    lam = leaf(p.lam)
    (g,) = torch.autograd.grad(p.outer(layer(lam)), lam)
    assert not g.requires_grad
    (g2,) = torch.autograd.grad(p.outer(layer(lam)), lam, create_graph=True)
    assert g2.requires_grad
    assert rel(g2.detach(), g) < 1e-10


def test_argmin_hessian_float32_matches_float64_closed_form(device):
    p = Ridge(device)
    X32, y32, lam32 = p.X.float(), p.y.float(), p.lam.float()

    def fun(w, lam):
        return 0.5 * (X32 @ w - y32).square().sum() + 0.5 * (lam * w.square()).sum()

    w0 = torch.zeros(p.d, dtype=torch.float32, device=device)
    layer = lambda lam: il.argmin(fun, w0, lam, solver=il.solvers.LBFGS(max_steps=200))  # noqa: E731
    H = torch.autograd.functional.hessian(lambda lam: p.outer(layer(lam)), lam32)
    H_ref = torch.autograd.functional.hessian(lambda lam: p.outer(p.closed_form(lam)), p.lam)
    assert H.dtype == torch.float32
    assert rel(H.double(), H_ref) < 1e-3


@pytest.mark.parametrize("problem", ["argmin", "fixed_point"])
def test_nan_second_order_cotangent_raises_instead_of_nan(problem, device):
    """A NaN reaching the second-order solve stops it with NonFiniteError, as in first order."""
    if problem == "argmin":
        p = Ridge(device)
        theta, layer, outer = p.lam, p.layer(), p.outer
    else:
        p = FixedPoint(device)
        theta, layer, outer = p.x, p.layer(), p.outer
    theta = leaf(theta)
    (g,) = torch.autograd.grad(outer(layer(theta)), theta, create_graph=True)
    nan = torch.full_like(g, float("nan"))
    with pytest.raises(il.NonFiniteError):
        torch.autograd.grad(g, theta, nan)
