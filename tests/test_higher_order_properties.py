"""Property tests of second derivatives over random problems (size, conditioning, seed), float64.

For argmin, fixed point and root, the Hessian-vector product of an outer loss through the layer
(double backward) equals an independent reference: autograd through the ridge closed form,
central differences of the first-order implicit gradient (itself exact to ~1e-10), and double
backward through Picard / Newton unrolled by hand to convergence. Forward mode obeys the
transpose identity ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩``. Each property runs a few small examples.
"""

import math

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import implicit_layers as il
from tests.helpers import DT, leaf, randn_factory, rel

PROPERTY = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    # No shrinking: a failing example is reported as found, so a failure stays fast.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
sizes = st.integers(min_value=2, max_value=5)
conds = st.floats(min_value=1.0, max_value=30.0)
seeds = st.integers(min_value=0, max_value=2**16)
contractions = st.floats(min_value=0.05, max_value=0.85)





def spd(randn, n, cond):
    Q, _ = torch.linalg.qr(randn(n, n))
    eig = torch.logspace(0.0, math.log10(cond), n, dtype=DT, device=Q.device)
    return (Q * eig) @ Q.T


def outer(z):
    return (z.sin() * z).sum() + 0.5 * z.square().sum().square()


def hvp(loss, theta, v):
    return torch.autograd.functional.hvp(loss, theta, v)[1]


@PROPERTY
@given(d=sizes, cond=conds, seed=seeds)
def test_ridge_hvp_matches_closed_form(d, cond, seed, device):
    """Design matrix with condition number ``cond``; per-feature decays; default backward."""
    randn = randn_factory(seed, device)
    m = d + 3
    U, _ = torch.linalg.qr(randn(m, d))
    X = U @ spd(randn, d, cond)
    y = randn(m)
    lam = 0.1 + randn(d).abs()
    v = randn(d)
    w0 = torch.zeros(d, dtype=DT, device=device)

    def fun(w, lam):
        return 0.5 * (X @ w - y).square().sum() + 0.5 * (lam * w.square()).sum()

    def layer(lam):
        return il.argmin(fun, w0, lam, solver=il.solvers.LBFGS(rtol=1e-13, max_steps=1000))

    closed = lambda lam: torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)  # noqa: E731
    assert rel(hvp(lambda t: outer(layer(t)), lam, v), hvp(lambda t: outer(closed(t)), lam, v)) < 1e-6


@PROPERTY
@given(n=sizes, cond=conds, seed=seeds)
def test_argmin_hvp_matches_finite_differences_of_gradient(n, cond, seed, device):
    """``min_w ½ wᵀAw - θᵀw + Σ log cosh(w - c)``, derivatives w.r.t. ``(θ, c)`` jointly."""
    randn = randn_factory(seed, device)
    A = spd(randn, n, cond)
    theta = randn(2 * n)
    v = randn(2 * n)
    w0 = torch.zeros(n, dtype=DT, device=device)

    def fun(w, p):
        return 0.5 * w @ A @ w - p[:n] @ w + torch.log(torch.cosh(w - p[n:])).sum()

    def loss(p):
        return outer(il.argmin(fun, w0, p, solver=il.solvers.Newton(rtol=1e-14, on_failure="ignore")))

    def grad(p):
        p = leaf(p)
        return torch.autograd.grad(loss(p), p)[0]

    h = 1e-4
    fd = (grad(theta + h * v) - grad(theta - h * v)) / (2 * h)
    assert rel(hvp(loss, theta, v), fd) < 1e-5


@PROPERTY
@given(n=sizes, contraction=contractions, seed=seeds)
def test_fixed_point_hvp_matches_unrolled(n, contraction, seed, device):
    """``z = tanh(W z + U x + b)`` with ``‖W‖₂ = contraction``; derivatives w.r.t. ``x``."""
    randn = randn_factory(seed, device)
    W = randn(n, n)
    W = contraction * W / torch.linalg.matrix_norm(W, 2)
    U, b, x, v = randn(n, 3), randn(n), randn(3), randn(3)
    z0 = torch.zeros(n, dtype=DT, device=device)

    def f(z, x):
        return torch.tanh(W @ z + U @ x + b)

    def unrolled(x):
        z = z0
        for _ in range(int(math.log(1e-16) / math.log(contraction)) + 5):
            z = f(z, x)
        return z

    layer = lambda x: il.fixed_point(f, z0, x, solver=il.solvers.Anderson(rtol=1e-13))  # noqa: E731
    got = hvp(lambda t: outer(layer(t)), x, v)
    ref = hvp(lambda t: outer(unrolled(t)), x, v)
    assert rel(got, ref) < 1e-6


@PROPERTY
@given(n=sizes, cond=conds, seed=seeds)
def test_root_hvp_matches_unrolled_newton(n, cond, seed, device):
    """``F(z) = (A + S) z + tanh(z) - x``, ``A`` SPD and ``S`` skew (a unique root)."""
    randn = randn_factory(seed, device)
    S = randn(n, n)
    M = spd(randn, n, cond) + 0.3 * (S - S.T) / torch.linalg.matrix_norm(S - S.T, 2).clamp_min(1e-12)
    x, v = randn(n), randn(n)
    z0 = torch.zeros(n, dtype=DT, device=device)

    def F(z, x):
        return M @ z + torch.tanh(z) - x

    def newton(x):
        z = z0
        for _ in range(30):
            z = z - torch.linalg.solve(M + torch.diag(1 - torch.tanh(z) ** 2), F(z, x))
        return z

    layer = lambda x: il.root(F, z0, x, solver=il.solvers.Broyden(rtol=1e-13, max_steps=500))  # noqa: E731
    assert rel(hvp(lambda t: outer(layer(t)), x, v), hvp(lambda t: outer(newton(t)), x, v)) < 1e-6


@PROPERTY
@given(n=sizes, contraction=contractions, seed=seeds, batch=st.integers(1, 3))
def test_batched_fixed_point_jvp_vjp_transpose_identity(n, contraction, seed, batch, device):
    randn = randn_factory(seed, device)
    W = randn(n, n)
    W = contraction * W / torch.linalg.matrix_norm(W, 2)
    x, v, u = randn(batch, n), randn(batch, n), randn(batch, n)
    z0 = torch.zeros(batch, n, dtype=DT, device=device)

    def layer(x):
        return il.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), z0, x, batched=True,
                              solver=il.solvers.Anderson(rtol=1e-13))

    _, Jv = torch.func.jvp(layer, (x,), (v,))
    xl = leaf(x)
    (JTu,) = torch.autograd.grad(layer(xl), xl, u)
    lhs, rhs = float((u * Jv).sum()), float((JTu * v).sum())
    assert abs(lhs - rhs) < 1e-9 * float(u.norm() * v.norm()) / (1 - contraction)
