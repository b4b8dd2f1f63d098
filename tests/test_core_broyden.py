"""The Broyden forward solver on slowly contracting maps, where it needs more steps than its
memory holds (the limited-memory regime)."""

import pytest
import torch

import implicit_layers as il

F64 = torch.float64


def _hard_map(n: int, batch: int, device: torch.device):
    """``z = tanh(W z + c)`` with ``W = 0.95 Q`` (Q orthogonal): contraction factor near 0.95,
    so Broyden needs far more steps than a small memory keeps."""
    g = torch.Generator().manual_seed(0)
    W = (0.95 * torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]).to(device)
    c = (0.3 * torch.randn(batch, n, generator=g, dtype=F64)).to(device)

    def f(z, c, W):
        return torch.tanh(z @ W.T + c)

    return f, c, W


def _picard_reference(f, c, W):
    z = torch.zeros_like(c)
    for _ in range(3000):
        z = f(z, c, W)
    return z


@pytest.mark.parametrize("memory", [3, 5])
def test_broyden_converges_beyond_its_memory(memory, device):
    # Regression: dropping the oldest rank-one update left an inconsistent inverse estimate
    # and the iteration diverged to NaN (NonFiniteError) after ~100 steps.
    f, c, W = _hard_map(32, 4, device)
    solver = il.solvers.Broyden(memory=memory, rtol=1e-10, max_steps=2000)
    z, info = il.fixed_point(
        f, torch.zeros_like(c), c, W, solver=solver, batched=True, return_info=True
    )
    assert bool(info.converged.all())
    assert int(info.steps.max()) > 3 * memory  # the memory really was exhausted
    ref = _picard_reference(f, c, W)  # independent: plain fixed-point iteration
    assert float((z - ref).norm() / ref.norm()) < 1e-8
    rel_res = (z - f(z, c, W)).norm(dim=-1) / z.norm(dim=-1)
    assert float(rel_res.max()) <= 1e-9


def test_broyden_linear_root_matches_solve(device):
    # A non-symmetric linear root problem F(z) = A z - b: Broyden with a short memory must
    # still reach the dense solution (its updates are exact secant steps on a linear map).
    g = torch.Generator().manual_seed(1)
    n = 20
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = (torch.eye(n, dtype=F64) - 0.9 * M / torch.linalg.matrix_norm(M, 2)).to(device)
    b = torch.randn(n, generator=g, dtype=F64).to(device)
    solver = il.solvers.Broyden(memory=4, rtol=1e-12, max_steps=2000)
    z = il.root(lambda z, A, b: A @ z - b, torch.zeros_like(b), A, b, solver=solver)
    ref = torch.linalg.solve(A, b)
    assert float((z - ref).norm() / ref.norm()) < 1e-9
