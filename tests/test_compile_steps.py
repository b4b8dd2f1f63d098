"""Each solver's step function compiles with ``torch.compile(fullgraph=True)`` (no graph break:
no host synchronisation and no Python branch on data inside a step), and one compiled step
equals the eager step."""

from __future__ import annotations

import functools

import pytest
import torch

from implicit_layers.linear.cg import cg_step
from implicit_layers.linear.gmres import _InPlaceCycles, arnoldi_step
from implicit_layers.linear.neumann import neumann_step
from implicit_layers.solvers.anderson import anderson_step
from implicit_layers.solvers.picard import damped_step, picard_step

pytestmark = pytest.mark.slow

B, N = 4, 12


@functools.lru_cache(maxsize=1)
def _compile_unavailable() -> str | None:
    try:
        torch._dynamo.reset()
        torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as exc:  # no C++ compiler, unsupported Python, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


@pytest.fixture(autouse=True)
def _needs_compile():
    why = _compile_unavailable()
    if why is not None:
        pytest.skip(f"torch.compile is unavailable on this machine ({why})")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=gen, dtype=torch.float64) / (2 * N**0.5)
    x = torch.randn(B, N, generator=gen, dtype=torch.float64)
    A = torch.randn(N, N, generator=gen, dtype=torch.float64)
    spd = A @ A.T / N + torch.eye(N, dtype=torch.float64)
    return W, x, spd


def _same(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    else:
        for u, v in zip(a, b, strict=True):
            _same(u, v)


def test_picard_steps_compile():
    W, x, _ = _data()

    def f(z):
        return torch.tanh(z @ W.T + x)

    fz = f(torch.zeros(B, N, dtype=torch.float64))
    step = torch.compile(picard_step, fullgraph=True)
    _same(step(f, fz), picard_step(f, fz))
    r = torch.randn(B, N, dtype=torch.float64)

    def residual(z):
        return z - f(z)

    damped = torch.compile(damped_step, fullgraph=True)
    _same(damped(residual, fz, r, 0.7), damped_step(residual, fz, r, 0.7))


def test_anderson_step_compiles():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(B, 3, N, generator=gen, dtype=torch.float64)
    R = torch.randn(B, 3, N, generator=gen, dtype=torch.float64)
    ones = torch.ones(B, 1, 3, dtype=torch.float64)
    step = torch.compile(anderson_step, fullgraph=True)
    for rescale in (True, False):
        _same(step(G, R, ones, 1e-12, rescale), anderson_step(G, R, ones, 1e-12, rescale))
    # the reference of the mixing weights: the constrained least-squares problem solved densely
    z = anderson_step(G, R, ones, 0.0, False)
    H = R @ R.mT
    w = torch.linalg.solve(H, torch.ones(B, 3, 1, dtype=torch.float64))
    alpha = w / w.sum(-2, keepdim=True)
    torch.testing.assert_close(z, (alpha.mT @ G).squeeze(1), rtol=1e-8, atol=1e-10)


def _state(*tensors):
    return [t.clone() for t in tensors]


def test_neumann_step_compiles():
    W, _, _ = _data()
    M = torch.eye(N, dtype=torch.float64) - W

    def mv(v):
        return v @ M.T

    b = torch.randn(B, N, dtype=torch.float64)
    mask = torch.tensor([[1.0], [1.0], [0.0], [1.0]], dtype=torch.float64)
    args = (torch.zeros(B, N, dtype=torch.float64), b, mask, torch.zeros(B, 1, dtype=torch.float64))
    tol = torch.full((B, 1), 1e-3, dtype=torch.float64)
    step = torch.compile(neumann_step, fullgraph=True)
    out_c = step(mv, *_state(*args), tol, None)
    out_e = neumann_step(mv, *_state(*args), tol, None)
    _same(out_c, out_e)
    # one Richardson step: x = b for the stepping samples, 0 for the masked one
    torch.testing.assert_close(out_e[0], b * mask)


def test_cg_step_compiles():
    _, _, A = _data()

    def mv(v):
        return v @ A

    b = torch.randn(B, N, dtype=torch.float64)

    def run(fn):
        x, r = torch.zeros(B, N, dtype=torch.float64), b.clone()
        p = r.clone()
        views = (x.view(B, N, 1), r.view(B, N, 1), p.view(B, N, 1), p.view(B, 1, N),
                 r.view(B, 1, N))
        rs = (r * r).sum(-1).view(B, 1, 1)
        active = torch.tensor([True, True, False, True]).view(B, 1, 1)
        tol2 = torch.full((B, 1, 1), 1e-20, dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float64)
        rs, active, stepped = fn(mv, p, *views, rs, active, tol2, zero)
        return x, r, p, rs, active, stepped

    eager = run(cg_step)
    _same(run(torch.compile(cg_step, fullgraph=True)), eager)
    # the first CG step is a steepest-descent step with the exact line search
    alpha = (b * b).sum(-1, keepdim=True) / (b * mv(b)).sum(-1, keepdim=True)
    expect = alpha * b
    expect[2] = 0.0
    torch.testing.assert_close(eager[0], expect)


def test_arnoldi_step_compiles():
    W, _, _ = _data()
    M = torch.eye(N, dtype=torch.float64) - W

    def mv(v):
        return v @ M.T

    b = torch.randn(B, N, dtype=torch.float64)
    beta = torch.linalg.vector_norm(b, dim=-1)

    def in_graph(mv, j, v, v_next, V, *rest):
        # under torch.compile the written row is a view made inside the graph: a view of it
        # passed in beside the whole basis is a mutated, aliased input (miscompiled)
        return arnoldi_step(mv, j, v, V[:, j + 1 : j + 2], V, *rest)

    def run(fn):
        cyc = _InPlaceCycles(b, 5, mv)
        cyc.rows3[0].copy_((b / beta.unsqueeze(-1)).unsqueeze(1))
        cyc.omega.copy_(cyc.eye)
        beta3 = beta.view(B, 1, 1)
        rel_tol = torch.full((B, 1, 1), 1e-12, dtype=torch.float64) / beta3
        res, active = torch.ones_like(beta3), torch.ones(B, 1, 1, dtype=torch.bool)
        used = torch.zeros(B, 1, 1, dtype=torch.int64)
        for j in range(2):
            res, active = fn(
                mv, j, cyc.rows[j], cyc.rows3[j + 1], cyc.V, cyc.VT, cyc.omegaT, cyc.pairs[j],
                cyc.next0[j], cyc.cols[j], cyc.diag[j], rel_tol, res, active, used, cyc.eps,
                cyc.c,
            )
        return cyc.V[:, :3], cyc.omega[:, :3, :3], cyc.R[:, :2, :2], res * beta3, active, used

    eager = run(arnoldi_step)
    # static shapes: step j works on j + 1 basis vectors, one graph per j (the dynamic-shape
    # graph of this step trips an inductor code-generation bug in torch 2.13)
    _same(run(torch.compile(in_graph, fullgraph=True, dynamic=False)), eager)
    # the basis is orthonormal and the residual estimate is the true minimal residual
    V = eager[0]
    torch.testing.assert_close(V @ V.mT, torch.eye(3, dtype=torch.float64).expand(B, 3, 3),
                               atol=1e-12, rtol=0)
    K = V[:, :2]  # Krylov basis of dimension 2
    AK = torch.stack([mv(K[:, 0]), mv(K[:, 1])], dim=-1)  # (B, n, 2)
    y = torch.linalg.lstsq(AK, b.unsqueeze(-1)).solution
    best = torch.linalg.vector_norm(b.unsqueeze(-1) - AK @ y, dim=(-2, -1))
    torch.testing.assert_close(eager[3].view(B), best, rtol=1e-8, atol=1e-12)
