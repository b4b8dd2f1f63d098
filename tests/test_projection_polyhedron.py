"""il.projection.polyhedron: against the closed-form projections it generalises, against proxsuite
on random polyhedra, derivatives against central differences (gradcheck, double backward),
batching, float32, an empty set and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import implicit_layers as il

P = il.projection
D = torch.float64


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def random_polyhedron(seed: int, n: int, p: int, m: int, batch: tuple[int, ...] = ()):
    """A nonempty ``{Ay = b, Gy <= h}`` (``y0`` strictly inside the inequalities) and a point
    ``x`` far enough outside that several inequalities are active at its projection."""
    A, G = randn(seed, *batch, p, n), randn(seed + 1, *batch, m, n)
    y0 = randn(seed + 2, *batch, n)
    b = (A @ y0.unsqueeze(-1)).squeeze(-1)
    h = (G @ y0.unsqueeze(-1)).squeeze(-1) + 0.1 + torch.rand(*batch, m, dtype=D)
    x = y0 + 3 * randn(seed + 3, *batch, n)
    return x, A, b, G, h


def proxsuite_projection(x, A, b, G, h) -> np.ndarray:
    """ProxQP at 1e-14 on ``min ½‖y‖² − xᵀy  s.t.  Ay = b, Gy <= h`` (one vector)."""
    proxsuite = pytest.importorskip("proxsuite")
    n, p, m = x.shape[-1], b.shape[-1], h.shape[-1]
    solver = proxsuite.proxqp.dense.QP(n, p, m)
    solver.settings.eps_abs, solver.settings.eps_rel, solver.settings.max_iter = 1e-14, 0.0, 100000
    solver.init(np.eye(n), -x.numpy(), A.numpy(), b.numpy(), G.numpy(), None, h.numpy())
    solver.solve()
    return solver.results.x.copy()


def test_single_halfspace_is_halfspace():
    x = randn(0, 5, 4)
    a = randn(1, 4)
    beta = torch.tensor(0.3, dtype=D)
    y = P.polyhedron(x, G=a[None], h=beta.reshape(1))
    ref = P.halfspace(x, a, beta)
    # Some points are inside (unchanged), some outside (on the plane).
    inside = (x @ a <= beta)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-9)


def test_affine_set_is_affine_set_shared_and_batched():
    x = randn(2, 3, 6)
    A, b = randn(3, 2, 6), randn(4, 2)
    torch.testing.assert_close(P.polyhedron(x, A, b), P.affine_set(x, A, b), rtol=0, atol=1e-9)
    # One set per vector.
    Ab, bb = randn(5, 3, 2, 6), randn(6, 3, 2)
    torch.testing.assert_close(P.polyhedron(x, Ab, bb), P.affine_set(x, Ab, bb), rtol=0, atol=1e-9)


def test_box_as_inequalities_is_box_with_its_gradient():
    x = (2 * randn(7, 4, 5)).requires_grad_()
    lo, up = -torch.ones(5, dtype=D), torch.linspace(0.2, 1.0, 5, dtype=D)
    eye = torch.eye(5, dtype=D)
    y = P.polyhedron(x, G=torch.cat([eye, -eye]), h=torch.cat([up, -lo]))
    ref = P.box(x, lo, up)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-9)
    w = randn(8, 4, 5)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_polyhedra_match_proxsuite(seed):
    x, A, b, G, h = random_polyhedron(10 * seed, n=8, p=2, m=12, batch=(4,))
    y = P.polyhedron(x, A, b, G, h)
    ref = torch.tensor(np.stack([proxsuite_projection(*(t[i] for t in (x, A, b, G, h))) for i in range(4)]))
    assert (y - ref).abs().max() < 1e-8
    # Several inequalities are active, so the test is not the affine projection in disguise.
    active = ((G @ y.unsqueeze(-1)).squeeze(-1) - h).abs() < 1e-8
    assert active.sum(-1).min() >= 1


def test_gradcheck_every_argument():
    x, A, b, G, h = random_polyhedron(40, n=4, p=1, m=5)
    args = tuple(t.clone().requires_grad_() for t in (x, A, b, G, h))
    assert torch.autograd.gradcheck(P.polyhedron, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward():
    x, A, b, G, h = random_polyhedron(50, n=4, p=1, m=5)
    args = tuple(t.clone().requires_grad_() for t in (x, b, G))
    assert torch.autograd.gradgradcheck(
        lambda x_, b_, G_: P.polyhedron(x_, A, b_, G_, h), args, eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_batched_equals_unbatched_with_nested_batch_dims():
    x, A, b, G, h = random_polyhedron(60, n=5, p=1, m=6, batch=(2, 3))
    y = P.polyhedron(x, A, b, G, h)
    assert y.shape == x.shape
    for i in range(2):
        for j in range(3):
            one = P.polyhedron(x[i, j], A[i, j], b[i, j], G[i, j], h[i, j])
            torch.testing.assert_close(y[i, j], one, rtol=0, atol=1e-10)
    # A shared set with batched points.
    shared = P.polyhedron(x, A[0, 0], b[0, 0], G[0, 0], h[0, 0])
    torch.testing.assert_close(shared[1, 2], P.polyhedron(x[1, 2], A[0, 0], b[0, 0], G[0, 0], h[0, 0]))


def test_jacrev_matches_the_halfspace_jacobian():
    x = torch.tensor([1.0, 2.0, -0.5], dtype=D)
    a = torch.tensor([1.0, 1.0, 0.0], dtype=D)
    jac = torch.func.jacrev(lambda v: P.polyhedron(v, G=a[None], h=torch.ones(1, dtype=D)))(x)
    torch.testing.assert_close(jac, torch.eye(3, dtype=D) - torch.outer(a, a) / 2, rtol=0, atol=1e-9)


def test_float32():
    x, A, b, G, h = random_polyhedron(70, n=6, p=1, m=8, batch=(3,))
    y = P.polyhedron(x.float().requires_grad_(), A.float(), b.float(), G.float(), h.float())
    assert y.dtype == torch.float32
    assert (y.double() - P.polyhedron(x, A, b, G, h)).abs().max() < 1e-4
    y.sum().backward()


def test_inference_mode_autocast_and_vmap():
    x, A, b, G, h = random_polyhedron(90, n=5, p=1, m=6, batch=(3,))
    y = P.polyhedron(x, A, b, G, h)
    with torch.inference_mode():
        torch.testing.assert_close(P.polyhedron(x, A, b, G, h), y)
    xf = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The solve stays in the inputs' dtype (autocast would make the KKT residual bfloat16).
        yf = P.polyhedron(xf, A.float(), b.float(), G.float(), h.float())
    assert yf.dtype == torch.float32 and (yf.double() - y).abs().max() < 1e-4
    with pytest.raises(TypeError, match="polyhedron does not run under torch.func.vmap .x is a vmapped"):
        torch.func.vmap(lambda v: P.polyhedron(v, A[0], b[0], G[0], h[0]))(x)


def test_empty_set_warns_naming_the_projection_and_the_vector():
    x = randn(80, 3, 2)
    x[0, 0] = 1.5  # outside the strip of sample 0
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    h = torch.tensor([[1.0, 0.0], [1.0, -2.0], [1.0, 0.0]], dtype=D)  # sample 1: y1 <= 1 and y1 >= 2
    with pytest.warns(il.ConvergenceWarning, match=r"polyhedron.*\(1,\) \(primal infeasible\): 1 of 3"):
        y = P.polyhedron(x, G=G, h=h)
    # The other vectors are still projected: sample 0 onto the strip 0 <= y0 <= 1.
    inf = float("inf")
    strip = P.box(x[0], torch.tensor([0.0, -inf], dtype=D), torch.tensor([1.0, inf], dtype=D))
    torch.testing.assert_close(y[0], strip, rtol=0, atol=1e-9)
    with pytest.raises(il.ConvergenceError, match="polyhedron"):
        P.polyhedron(x, G=G, h=h, solver=il.InteriorPoint(on_failure="raise"))


X = torch.zeros(2, 3, dtype=D)
M = torch.ones(1, 3, dtype=D)
V = torch.ones(1, dtype=D)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "A, b, G and h all None"),
        ({"A": M}, ValueError, "A and b go together: got A but b=None"),
        ({"b": V}, ValueError, "A and b go together: got b but A=None"),
        ({"G": M}, ValueError, "G and h go together"),
        ({"G": torch.ones(1, 4, dtype=D), "h": V}, ValueError, r"G must have shape \(k, n\).*n = 3"),
        ({"A": M, "b": torch.ones(2, dtype=D)}, ValueError, r"b must have shape \(k,\).*k = 1"),
        ({"G": torch.ones(5, 1, 3, dtype=D), "h": V}, ValueError, r"G must have shape.*\[:-1\] = \(2,\)"),
        ({"G": M, "h": torch.ones(5, 1, dtype=D)}, ValueError, r"h must have shape"),
        ({"G": M.numpy(), "h": V}, TypeError, "G must be a torch.Tensor"),
        ({"G": M, "h": V, "solver": "ipm"}, TypeError, "solver must be an il.InteriorPoint"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        P.polyhedron(X, **kwargs)
