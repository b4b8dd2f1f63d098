"""Property tests over random problems (size, conditioning, seed): for argmin, fixed point and
root, the implicit gradient equals the gradient unrolled through many converged forward steps,
and both equal central finite differences of an independent high-precision solve (float64).
"""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_layers as il

DT = torch.float64
# The ``device`` fixture is a constant, so sharing it across examples is safe.
PROPERTY = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
sizes = st.integers(min_value=2, max_value=6)
conds = st.floats(min_value=1.0, max_value=10.0)
seeds = st.integers(min_value=0, max_value=2**16)
contractions = st.floats(min_value=0.05, max_value=0.9)


def randn_factory(seed, device):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    return randn


def spd(randn, n, cond):
    """Symmetric positive-definite matrix with eigenvalues spread over ``[1, cond]``."""
    Q, _ = torch.linalg.qr(randn(n, n))
    eig = torch.logspace(0.0, math.log10(cond), n, dtype=DT, device=Q.device)
    return (Q * eig) @ Q.T


def outer_loss(z, cot):
    # Non-linear in z so the cotangent depends on the solution.
    return (cot * z).sum() + 0.5 * (z**2).sum()


def three_way(solve_implicit, solve_unrolled, solve_precise, params, cot, randn):
    """Implicit gradient vs unrolled gradient vs central finite differences.

    Each ``solve_*`` maps a tuple of parameter tensors to ``z*``. Returns the worst relative
    discrepancies ``(implicit vs unrolled, implicit vs finite differences)``.
    """
    grads = {}
    for name, solve in (("implicit", solve_implicit), ("unrolled", solve_unrolled)):
        leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
        grads[name] = torch.autograd.grad(outer_loss(solve(leaves), cot), leaves)
    flat_i = torch.cat([g.reshape(-1) for g in grads["implicit"]])
    flat_u = torch.cat([g.reshape(-1) for g in grads["unrolled"]])
    err_unrolled = float((flat_i - flat_u).norm() / flat_i.norm())

    # Central differences of the exact solution map along a random direction.
    direction = tuple(randn(*p.shape) for p in params)
    h = 1e-5
    pairs = list(zip(params, direction, strict=True))
    with torch.no_grad():
        plus = outer_loss(solve_precise(tuple(p + h * v for p, v in pairs)), cot)
        minus = outer_loss(solve_precise(tuple(p - h * v for p, v in pairs)), cot)
    fd = float((plus - minus) / (2 * h))
    analytic = float(
        sum((g * v).sum() for g, v in zip(grads["implicit"], direction, strict=True))
    )
    err_fd = abs(analytic - fd) / max(abs(fd), 1e-3 * float(flat_i.norm()))
    return err_unrolled, err_fd


@PROPERTY
@given(n=sizes, cond=conds, seed=seeds)
def test_argmin_implicit_unrolled_finite_differences(n, cond, seed, device):
    """``min_w 0.5 wᵀAw - θᵀw + Σ log cosh(w - c)``; Hessian eigenvalues in ``[1, cond + 1]``."""
    randn = randn_factory(seed, device)
    A = spd(randn, n, cond)
    params = (randn(n), randn(n))
    cot = randn(n)
    w0 = torch.zeros(n, dtype=DT, device=device)

    def fun(w, theta, c):
        return 0.5 * w @ A @ w - theta @ w + torch.log(torch.cosh(w - c)).sum()

    def implicit(p):
        return il.argmin(fun, w0, *p, solver=il.solvers.LBFGS(rtol=1e-12))

    def unrolled(p):
        solver = il.solvers.GradientDescent(1.0 / (cond + 1.0), rtol=1e-12, max_steps=5000)
        return il.argmin(fun, w0, *p, solver=solver, backward=il.backward.Unrolled())

    def precise(p):
        return il.argmin(fun, w0, *p, solver=il.solvers.Newton(rtol=1e-14, on_failure="ignore"))

    err_unrolled, err_fd = three_way(implicit, unrolled, precise, params, cot, randn)
    assert err_unrolled < 1e-7
    assert err_fd < 1e-6


@PROPERTY
@given(n=sizes, contraction=contractions, seed=seeds)
def test_fixed_point_implicit_unrolled_finite_differences(n, contraction, seed, device):
    """``z = tanh(W z + U x + b)`` with ``‖W‖₂ = contraction``; gradients w.r.t. W, U, b, x."""
    randn = randn_factory(seed, device)
    W = randn(n, n)
    W = contraction * W / torch.linalg.matrix_norm(W, 2)
    params = (W, randn(n, 3), randn(n), randn(3))
    cot = randn(n)
    z0 = torch.zeros(n, dtype=DT, device=device)

    def f(z, W, U, b, x):
        return torch.tanh(W @ z + U @ x + b)

    def implicit(p):
        return il.fixed_point(f, z0, *p, solver=il.solvers.Anderson(rtol=1e-12))

    def unrolled(p):
        solver = il.solvers.Picard(rtol=1e-12, max_steps=5000)
        return il.fixed_point(f, z0, *p, solver=solver, backward=il.backward.Unrolled())

    def precise(p):
        solver = il.solvers.Anderson(rtol=1e-15, max_steps=200, on_failure="ignore")
        return il.fixed_point(f, z0, *p, solver=solver)

    err_unrolled, err_fd = three_way(implicit, unrolled, precise, params, cot, randn)
    assert err_unrolled < 1e-7
    assert err_fd < 1e-6


@PROPERTY
@given(n=sizes, cond=conds, seed=seeds)
def test_root_implicit_unrolled_finite_differences(n, cond, seed, device):
    """``F(z) = (A + S) z + tanh(z) - x`` with ``A`` SPD and ``S`` skew: a non-symmetric
    Jacobian whose symmetric part is positive definite, so the root is unique."""
    randn = randn_factory(seed, device)
    A = spd(randn, n, cond)
    S = randn(n, n)
    S = 0.3 * (S - S.T) / torch.linalg.matrix_norm(S - S.T, 2).clamp_min(1e-12)
    params = (A + S, randn(n))
    cot = randn(n)
    z0 = torch.zeros(n, dtype=DT, device=device)

    def F(z, M, x):
        return M @ z + torch.tanh(z) - x

    def implicit(p):
        return il.root(F, z0, *p, solver=il.solvers.Broyden(rtol=1e-12))

    def unrolled(p):
        # Richardson z ← z - η F(z) with η = 2 / (λ_min + λ_max) of the symmetric part.
        solver = il.solvers.Picard(2.0 / (cond + 2.0), rtol=1e-12, max_steps=5000)
        return il.root(F, z0, *p, solver=solver, backward=il.backward.Unrolled())

    def precise(p):
        solver = il.solvers.Broyden(rtol=1e-15, max_steps=200, on_failure="ignore")
        return il.root(F, z0, *p, solver=solver)

    err_unrolled, err_fd = three_way(implicit, unrolled, precise, params, cot, randn)
    assert err_unrolled < 1e-7
    assert err_fd < 1e-6
