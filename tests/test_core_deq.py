"""Deep-equilibrium fixed points ``z = tanh(W z + U x + b)`` with contractive ``W``: implicit
gradients w.r.t. ``W``, ``U``, ``b`` and ``x`` against the dense implicit-function-theorem
solution (Jacobian materialised by ``torch.autograd.functional.jacobian``, adjoint system
``(I - J)ᵀ u = g`` solved by ``torch.linalg.solve``).
"""

import functools

import pytest
import torch

import implicit_layers as il
from tests import registry

B, N, P = 4, 6, 3


def make_params(device, seed=0, contraction=0.7):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    W = randn(N, N)
    W = contraction * W / torch.linalg.matrix_norm(W, 2)
    U, b, x, cot = randn(N, P), randn(N), randn(B, P), randn(B, N)
    return (x, W, U, b), cot


def f(z, x, W, U, b):
    return torch.tanh(z @ W.T + x @ U.T + b)


def dense_ift_gradients(params, cot):
    """Gradients of ``<cot, z*>`` w.r.t. ``(x, W, U, b)`` by the dense IFT."""
    x, W, U, b = (p.detach().clone().requires_grad_(True) for p in params)
    with torch.no_grad():
        z = torch.zeros_like(cot)
        # Contraction 0.7: 200 plain iterations reach rounding level.
        for _ in range(200):
            z = f(z, x, W, U, b)
    eye = torch.eye(N, dtype=z.dtype, device=z.device)
    us = []
    for i in range(B):
        J = torch.autograd.functional.jacobian(
            lambda zi, i=i: f(zi.unsqueeze(0), x[i : i + 1], W, U, b).squeeze(0), z[i]
        )
        us.append(torch.linalg.solve((eye - J).T, cot[i]))
    u = torch.stack(us)
    grads = torch.autograd.grad(f(z, x, W, U, b), (x, W, U, b), u)
    return z, grads


def implicit_gradients(params, cot, solver, backward, batched):
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
    z0 = torch.zeros_like(cot)
    z, info = il.fixed_point(
        f, z0, *leaves, solver=solver, backward=backward, batched=batched, return_info=True
    )
    grads = torch.autograd.grad(z, leaves, cot)
    return z.detach(), grads, info


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


#: Settings the DEQ problem needs beyond the registry's.
SETTINGS = {"Neumann": {"max_steps": 500}, "Picard": {"max_steps": 2000}}

# Every fixed-point solver, and every accurate linear solver of non-symmetric systems.
LINEAR_SOLVERS = {
    c.name: functools.partial(c.make, **SETTINGS.get(c.name, {}))
    for c in registry.linear("contract", estimator=False)
}
FORWARD_SOLVERS = {
    c.name: functools.partial(c.make, **SETTINGS.get(c.name, {}))
    for c in registry.forward("fixed_point")
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("forward", sorted(FORWARD_SOLVERS))
@pytest.mark.parametrize("linear", sorted(LINEAR_SOLVERS))
def test_deq_gradients_match_dense_ift(linear, forward, batched, device):
    params, cot = make_params(device)
    z_ref, g_ref = dense_ift_gradients(params, cot)
    z, grads, info = implicit_gradients(
        params, cot, FORWARD_SOLVERS[forward](), LINEAR_SOLVERS[linear](), batched
    )
    assert bool(info.converged.all())
    assert bool(info.backward.converged.all())
    assert rel(z, z_ref) < 1e-8
    for name, g, r in zip(("x", "W", "U", "b"), grads, g_ref, strict=True):
        assert rel(g, r) < 1e-8, name


def test_deq_default_solvers(device):
    """``il.fixed_point(f, z0, *args)`` with no options: Adaptive forward, which stays with
    plain iteration on this contraction and picks the Neumann backward."""
    params, cot = make_params(device, seed=3, contraction=0.9)
    _, g_ref = dense_ift_gradients(params, cot)
    _, grads, info = implicit_gradients(params, cot, None, None, batched=True)
    assert info.solver == "Adaptive (Picard)"
    assert info.backward.solver == "Neumann"
    for g, r in zip(grads, g_ref, strict=True):
        assert rel(g, r) < 1e-8


def test_deq_float32(device):
    params, cot = make_params(device, seed=4)
    _, g_ref = dense_ift_gradients(params, cot)
    params32 = tuple(p.float() for p in params)
    _, grads, _ = implicit_gradients(params32, cot.float(), None, None, batched=True)
    for g, r in zip(grads, g_ref, strict=True):
        assert g.dtype == torch.float32
        assert rel(g.double(), r) < 1e-4
