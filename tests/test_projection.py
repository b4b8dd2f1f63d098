"""il.projection: values against closed forms and a QP solved by scipy, derivatives against
central differences and gradcheck, properties (feasibility, idempotence, the variational
inequality), composability and bad sets."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import implicit_layers as il

P = il.projection
D = torch.float64


def qp_projection(x, eq=(), ineq=(), bounds=None, split_l1=None, start=0.0):
    """argmin ½‖y − x‖² by SLSQP; eq / ineq are (fun, jac) pairs with fun(y) = 0 / >= 0.

    ``split_l1=r`` poses the l1 ball as the smooth QP in ``y = p − m`` with ``p, m >= 0`` and
    ``Σ(p + m) <= r``.
    """
    if split_l1 is not None:
        n = x.size
        res = minimize(
            lambda v: 0.5 * np.sum((v[:n] - v[n:] - x) ** 2),
            np.zeros(2 * n),
            jac=lambda v: np.concatenate([v[:n] - v[n:] - x, x - v[:n] + v[n:]]),
            constraints=[
                {"type": "ineq", "fun": lambda v: split_l1 - v.sum(), "jac": lambda v: -np.ones(2 * n)}
            ],
            bounds=[(0, None)] * (2 * n),
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        assert res.success, res.message
        return res.x[:n] - res.x[n:]
    cons = [{"type": "eq", "fun": f, "jac": j} for f, j in eq] + [
        {"type": "ineq", "fun": f, "jac": j} for f, j in ineq
    ]
    res = minimize(
        lambda y: 0.5 * np.sum((y - x) ** 2),
        start * x / np.linalg.norm(x),
        jac=lambda y: y - x,
        constraints=cons,
        bounds=bounds,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


def rng_point(seed, n=6, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=g, dtype=D)


# Each case: the projection with its set fixed, the same set as scipy constraints, a membership test.
A_VEC = torch.tensor([1.0, -2.0, 0.5, 1.5, 0.0, -1.0], dtype=D)
LO = torch.tensor([-1.0, -0.5, 0.0, -2.0, -0.3, -1.0], dtype=D)
UP = torch.tensor([1.0, 0.5, 0.8, 0.0, 0.3, 2.0], dtype=D)
A_MAT = torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0, -1.0, 2.0]], dtype=D)
B_VEC = torch.tensor([0.3, -0.7], dtype=D)
a_np, A_np = A_VEC.numpy(), A_MAT.numpy()
ones = np.ones(6)

CASES = {
    "box": (
        lambda x: P.box(x, LO, UP),
        dict(bounds=list(zip(LO.tolist(), UP.tolist(), strict=True))),
        lambda y: bool(((y >= LO - 1e-12) & (y <= UP + 1e-12)).all()),
    ),
    "nonnegative": (P.nonnegative, dict(bounds=[(0, None)] * 6), lambda y: bool((y >= 0).all())),
    "simplex": (
        lambda x: P.simplex(x, 1.5),
        dict(eq=[(lambda y: y.sum() - 1.5, lambda y: ones)], bounds=[(0, None)] * 6),
        lambda y: bool((y >= 0).all()) and abs(float(y.sum()) - 1.5) < 1e-12,
    ),
    "l1_ball": (
        lambda x: P.l1_ball(x, 1.2),
        dict(ineq=[], split_l1=1.2),
        lambda y: float(y.abs().sum()) <= 1.2 + 1e-12,
    ),
    "l2_ball": (
        lambda x: P.l2_ball(x, 0.9),
        dict(ineq=[(lambda y: 0.81 - y @ y, lambda y: -2 * y)], start=0.5),
        lambda y: float(y.norm()) <= 0.9 + 1e-12,
    ),
    "linf_ball": (
        lambda x: P.linf_ball(x, 0.4),
        dict(bounds=[(-0.4, 0.4)] * 6),
        lambda y: float(y.abs().max()) <= 0.4 + 1e-12,
    ),
    "hyperplane": (
        lambda x: P.hyperplane(x, A_VEC, 0.7),
        dict(eq=[(lambda y: a_np @ y - 0.7, lambda y: a_np)]),
        lambda y: abs(float(A_VEC @ y) - 0.7) < 1e-12,
    ),
    "halfspace": (
        lambda x: P.halfspace(x, A_VEC, 0.7),
        dict(ineq=[(lambda y: 0.7 - a_np @ y, lambda y: -a_np)]),
        lambda y: float(A_VEC @ y) <= 0.7 + 1e-12,
    ),
    "affine_set": (
        lambda x: P.affine_set(x, A_MAT, B_VEC),
        dict(eq=[(lambda y: A_np @ y - B_VEC.numpy(), lambda y: A_np)]),
        lambda y: float((A_MAT @ y - B_VEC).abs().max()) < 1e-12,
    ),
    "box_section": (
        lambda x: P.box_section(x, LO, UP, A_VEC, 0.4),
        dict(
            eq=[(lambda y: a_np @ y - 0.4, lambda y: a_np)],
            bounds=list(zip(LO.tolist(), UP.tolist(), strict=True)),
        ),
        lambda y: bool(((y >= LO - 1e-12) & (y <= UP + 1e-12)).all()) and abs(float(A_VEC @ y) - 0.4) < 1e-12,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_qp_reference(name, seed):
    project, cons, _ = CASES[name]
    x = rng_point(seed)
    ref = qp_projection(x.numpy(), **cons)
    torch.testing.assert_close(project(x), torch.from_numpy(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_jacobian_matches_central_differences(name):
    project = CASES[name][0]
    x = rng_point(3).requires_grad_()
    jac = torch.autograd.functional.jacobian(project, x)
    eps = 1e-6
    fd = torch.stack(
        [
            (project(x.detach() + eps * e) - project(x.detach() - eps * e)) / (2 * eps)
            for e in torch.eye(6, dtype=D)
        ],
        dim=-1,
    )
    torch.testing.assert_close(jac, fd, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 5.0))
def test_properties(name, seed, scale):
    project, _, member = CASES[name]
    x = rng_point(seed, scale=scale)
    y = project(x)
    assert member(y)
    torch.testing.assert_close(project(y), y, atol=1e-12, rtol=0)  # idempotent
    # Variational inequality <x − P(x), z − P(x)> <= 0 for feasible z (projections of other points).
    for k in range(4):
        z = project(rng_point(seed + 100 + k, scale=3.0))
        assert float((x - y) @ (z - y)) <= 1e-10 * (1 + float(x.norm()) ** 2)


def test_closed_forms():
    x = torch.tensor([0.5, 1.5, -1.0], dtype=D)
    torch.testing.assert_close(P.simplex(x), torch.tensor([0.0, 1.0, 0.0], dtype=D))
    torch.testing.assert_close(
        P.simplex(torch.tensor([0.3, 0.2, 0.1], dtype=D)), torch.tensor([0.3, 0.2, 0.1], dtype=D) + 0.4 / 3
    )
    torch.testing.assert_close(
        P.l2_ball(torch.tensor([3.0, 4.0], dtype=D), 1.0), torch.tensor([0.6, 0.8], dtype=D)
    )
    torch.testing.assert_close(
        P.l1_ball(torch.tensor([3.0, -1.0], dtype=D), 1.0), torch.tensor([1.0, 0.0], dtype=D)
    )
    inside = torch.tensor([0.2, -0.3], dtype=D)
    for f in (P.l1_ball, P.l2_ball, P.linf_ball):
        torch.testing.assert_close(f(inside), inside)


def test_sparse_simplex_jacobian_and_total_gradient():
    # On the support S: ∂y/∂x = I − 11ᵀ/|S|, ∂y/∂total = 1/|S|; zero off the support.
    x = torch.tensor([0.9, 0.7, -2.0, 0.1, 0.6], dtype=D, requires_grad=True)
    total = torch.tensor(1.0, dtype=D, requires_grad=True)
    y = P.simplex(x, total)
    s = (y > 0).to(D)
    jac = torch.autograd.functional.jacobian(lambda v: P.simplex(v, total.detach()), x.detach())
    torch.testing.assert_close(jac, torch.diag(s) - torch.outer(s, s) / s.sum())
    (g,) = torch.autograd.grad(y, total, torch.ones_like(y))
    torch.testing.assert_close(g, s.sum() / s.sum())


def test_parameter_gradients_gradcheck():
    x = rng_point(5).requires_grad_()
    r = torch.tensor(0.8, dtype=D, requires_grad=True)
    b = torch.tensor(0.3, dtype=D, requires_grad=True)
    a = A_VEC.clone().requires_grad_()
    lo, up = (LO.clone().requires_grad_(), UP.clone().requires_grad_())
    c = torch.tensor(0.4, dtype=D, requires_grad=True)
    A = A_MAT.clone().requires_grad_()
    bv = B_VEC.clone().requires_grad_()
    checks = [
        (P.simplex, (x, r)),
        (P.l1_ball, (x, r)),
        (P.l2_ball, (x, r)),
        (P.linf_ball, (x, r)),
        (P.hyperplane, (x, a, b)),
        (P.halfspace, (x, a, b)),
        (P.affine_set, (x, A, bv)),
        (P.box, (x, lo, up)),
        (P.box_section, (x, lo, up, a, c)),
    ]
    for f, args in checks:
        assert torch.autograd.gradcheck(f, args), f.__name__
        assert torch.autograd.gradgradcheck(f, args), f.__name__


def test_box_section_exact_with_infinite_bounds_and_zero_normal_entries():
    x = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=D)
    lo = torch.tensor([0.0, 0.0, 0.0, -torch.inf], dtype=D)
    up = torch.tensor([torch.inf, 1.0, 0.2, torch.inf], dtype=D)
    a = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=D)
    y = P.box_section(x, lo, up, a, 1.0)
    ref = qp_projection(
        x.numpy(),
        eq=[(lambda v: a.numpy() @ v - 1.0, lambda v: a.numpy())],
        bounds=[(0, None), (0, 1), (0, 0.2), (None, None)],
    )
    torch.testing.assert_close(y, torch.from_numpy(ref), atol=1e-6, rtol=0)
    assert abs(float(a @ y) - 1.0) < 1e-14  # exact to dtype precision, no solver tolerance
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(P.box_section(xg, lo, up, a, 1.0).sum(), xg)
    assert torch.isfinite(g).all()


def test_batched_per_sample_parameters_match_loop():
    x = torch.randn(4, 5, dtype=D)
    radius = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=D)
    for f in (P.simplex, P.l1_ball, P.l2_ball, P.linf_ball):
        out = f(x, radius)
        for i in range(4):
            torch.testing.assert_close(out[i], f(x[i], radius[i]))
    c = torch.tensor([0.1, 0.2, -0.3, 0.0], dtype=D)
    out = P.box_section(x, -1.0, 1.0, torch.ones(5, dtype=D), c)
    for i in range(4):
        torch.testing.assert_close(out[i], P.box_section(x[i], -1.0, 1.0, torch.ones(5, dtype=D), c[i]))


def test_torch_func_vmap_grad_jacrev_and_float32():
    x = torch.randn(3, 6)
    for name, (project, _, _) in CASES.items():
        # The float64 parameters of the fixed sets take the dtype of x.
        y = project(x)
        assert y.dtype == torch.float32, name
        torch.testing.assert_close(y, project(x.double()).float(), msg=lambda m, n=name: f"{n}: {m}")
    x64 = torch.randn(3, 6, dtype=D)
    for name, (project, _, _) in CASES.items():
        torch.testing.assert_close(torch.func.vmap(project)(x64), torch.stack([project(v) for v in x64]))
        jac = torch.func.vmap(torch.func.jacrev(project))(x64)
        ref = torch.stack([torch.autograd.functional.jacobian(project, v) for v in x64])
        torch.testing.assert_close(jac, ref, msg=lambda m, n=name: f"{n}: {m}")
    radius = torch.tensor(0.7, dtype=D)
    g = torch.func.grad(lambda r: P.l2_ball(x64[0], r).sum())(radius)
    norm = x64[0].norm()
    expected = x64[0].sum() / norm if norm > 0.7 else torch.zeros((), dtype=D)
    torch.testing.assert_close(g, expected)
    y32 = P.box_section(torch.randn(8), 0.0, 1.0, torch.ones(8), 2.0)
    assert y32.dtype == torch.float32 and abs(float(y32.sum()) - 2.0) < 1e-5


def test_no_nan_at_kinks():
    for f, x in [
        (P.l2_ball, torch.zeros(3, dtype=D)),
        (P.l2_ball, torch.tensor([0.6, 0.8], dtype=D)),
        (P.simplex, torch.ones(3, dtype=D) / 3),
        (P.l1_ball, torch.zeros(3, dtype=D)),
        (functools.partial(P.box, lower=0.0, upper=1.0), torch.tensor([0.0, 1.0], dtype=D)),
    ]:
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(x).sum(), x)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: P.l2_ball(torch.ones(3), -1.0), ValueError, "radius must be >= 0"),
        (lambda: P.l1_ball(torch.ones(3), torch.tensor([-1.0])), ValueError, "radius"),
        (lambda: P.simplex(torch.ones(3), 0.0), ValueError, "total must be > 0"),
        (lambda: P.box(torch.ones(3), 1.0, 0.0), ValueError, "lower must be <= upper"),
        (lambda: P.hyperplane(torch.ones(3), torch.zeros(3), 1.0), ValueError, "a must be nonzero"),
        (lambda: P.affine_set(torch.ones(3), torch.ones(2, 3), torch.ones(2)), ValueError, "full row rank"),
        (
            lambda: P.affine_set(torch.ones(3), torch.ones(2, 4), torch.ones(2)),
            ValueError,
            "A must have shape",
        ),
        (lambda: P.box_section(torch.ones(3), 0.0, 1.0, torch.ones(3), 5.0), ValueError, "c must lie in"),
        (
            lambda: P.simplex(torch.ones(4, 3), torch.ones(5)),
            ValueError,
            "total must be a number or a tensor shaped",
        ),
        (lambda: P.simplex([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: P.simplex(torch.tensor(1.0)), ValueError, "at least one dimension"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_inference_mode_and_autocast():
    x = rng_point(7)
    for name, (project, _, _) in CASES.items():
        ref = project(x)
        with torch.inference_mode():
            torch.testing.assert_close(project(x), ref, msg=lambda m, n=name: f"{n}: {m}")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # None of these operations is on autocast's lists: they keep the input's precision.
            out = project(x)
        assert out.dtype == D
        torch.testing.assert_close(out, ref)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.0))
@example(seed=1, frac=0.0)
@example(seed=2, frac=1.0)
@example(seed=3, frac=1.0)
@example(seed=425, frac=1.0)
def test_box_section_random_sets_exact_and_optimal(seed, frac):
    g = torch.Generator().manual_seed(seed)
    n = 7
    x = 3 * torch.randn(n, generator=g, dtype=D)
    a = torch.randn(n, generator=g, dtype=D)
    lo = -torch.rand(n, generator=g, dtype=D)
    up = torch.rand(n, generator=g, dtype=D)
    reach_min = torch.minimum(a * lo, a * up).sum()
    reach_max = torch.maximum(a * lo, a * up).sum()
    c = reach_min + frac * (reach_max - reach_min)
    y = P.box_section(x, lo, up, a, c)
    assert bool(((y >= lo) & (y <= up)).all())
    assert abs(float(a @ y - c)) <= 1e-13 * (1 + float(a.abs() @ y.abs()))
    # Optimality: x − y = ν a + (multipliers of the active bounds with the right signs), checked
    # through the variational inequality against feasible points (projections of other points).
    for _ in range(4):
        z = P.box_section(3 * torch.randn(n, generator=g, dtype=D), lo, up, a, c)
        assert float((x - y) @ (z - y)) <= 1e-10 * (1 + float(x.norm()) ** 2)


def test_vmap_over_points_and_per_sample_parameters():
    x = torch.randn(4, 5, dtype=D)
    radius = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=D)
    for f in (P.simplex, P.l1_ball, P.l2_ball, P.linf_ball):
        torch.testing.assert_close(torch.func.vmap(f)(x, radius), f(x, radius))
    grads = torch.func.vmap(torch.func.grad(lambda v, r: P.l1_ball(v, r)[0]), in_dims=(0, 0))(x, radius)
    ref = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, r=r: P.l1_ball(v, r)[0], v)
            for v, r in zip(x, radius, strict=True)
        ]
    )
    torch.testing.assert_close(grads, ref)
