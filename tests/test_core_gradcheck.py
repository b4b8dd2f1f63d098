"""``torch.autograd.gradcheck`` (numerical Jacobian by finite differences vs the analytic
backward) on small float64 problems of every type, including ``custom_root`` and
``custom_fixed_point`` around plain-Python solvers.
"""

import torch
from torch.autograd import gradcheck

import implicit_layers as il

DT = torch.float64


def randn(*shape, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=DT).to(device)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_gradcheck_argmin(device):
    n = 4
    M = randn(n, n, seed=0, device=device)
    A = M @ M.T / n + torch.eye(n, dtype=DT, device=device)

    def fun(w, theta, c):
        return 0.5 * w @ A @ w - theta @ w + torch.log(torch.cosh(w - c)).sum()

    def layer(theta, c):
        w0 = torch.zeros(n, dtype=DT, device=device)
        return il.argmin(fun, w0, theta, c, solver=il.solvers.LBFGS(rtol=1e-13))

    inputs = (leaf(randn(n, seed=1, device=device)), leaf(randn(n, seed=2, device=device)))
    assert gradcheck(layer, inputs)


def test_gradcheck_fixed_point_batched(device):
    B, n = 2, 4
    W = randn(n, n, seed=3, device=device)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)

    def f(z, x, W):
        return torch.tanh(z @ W.T + x)

    def layer(x, W):
        z0 = torch.zeros(B, n, dtype=DT, device=device)
        return il.fixed_point(f, z0, x, W, solver=il.solvers.Anderson(rtol=1e-13), batched=True)

    inputs = (leaf(randn(B, n, seed=4, device=device)), leaf(W))
    assert gradcheck(layer, inputs)


def test_gradcheck_root(device):
    n = 4
    M = randn(n, n, seed=5, device=device)
    A = M @ M.T / n + torch.eye(n, dtype=DT, device=device)

    def F(z, A, x):
        return A @ z + torch.tanh(z) - x

    def layer(A, x):
        z0 = torch.zeros(n, dtype=DT, device=device)
        return il.root(F, z0, A, x, solver=il.solvers.Broyden(rtol=1e-13))

    inputs = (leaf(A), leaf(randn(n, seed=6, device=device)))
    assert gradcheck(layer, inputs)


def test_gradcheck_custom_root(device):
    """A Newton loop written by hand, differentiated through ``custom_root``."""
    n = 3
    M = randn(n, n, seed=7, device=device)
    A = M @ M.T / n + torch.eye(n, dtype=DT, device=device)

    def F(z, x):
        return A @ z + z**3 - x

    @il.custom_root(F)
    def newton(z0, x):
        z = z0
        for _ in range(50):
            J = A + torch.diag(3 * z**2)
            z = z - torch.linalg.solve(J, F(z, x))
        return z

    def layer(x):
        return newton(torch.zeros(n, dtype=DT, device=device), x)

    assert gradcheck(layer, (leaf(randn(n, seed=8, device=device)),))


def test_gradcheck_custom_fixed_point(device):
    n = 3
    W = randn(n, n, seed=9, device=device)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)

    def T(z, x):
        return torch.sin(W @ z) + x

    @il.custom_fixed_point(T)
    def iterate(z0, x):
        z = z0
        for _ in range(200):
            z = T(z, x)
        return z

    def layer(x):
        return iterate(torch.zeros(n, dtype=DT, device=device), x)

    assert gradcheck(layer, (leaf(randn(n, seed=10, device=device)),))
