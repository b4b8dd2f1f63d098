"""il.prox: values against closed forms and a scipy minimisation of the prox objective,
derivatives against central differences and gradcheck, the Moreau decomposition, the solver's
calling convention, composability and bad inputs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

import implicit_layers as il

Q = il.prox
P = il.projection
D = torch.float64


def point(seed, shape=(6,), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D)


def scalar_prox(x, g):
    """argmin_y ½(y − x)² + g(y) for a separable 1-d convex g, by bounded Brent (tight tolerance)."""
    res = minimize_scalar(
        lambda y: 0.5 * (y - x) ** 2 + g(y),
        bounds=(-abs(x) - 1, abs(x) + 1),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return res.x


SEPARABLE = {
    "l1": (lambda x, h: Q.l1(x, 0.7, h), lambda y, h: h * 0.7 * abs(y)),
    "nonnegative_l1": (
        lambda x, h: Q.nonnegative_l1(x, 0.7, h),
        lambda y, h: h * 0.7 * y if y >= 0 else 1e6 * -y,
    ),
    "elastic_net": (
        lambda x, h: Q.elastic_net(x, 0.7, 0.4, h),
        lambda y, h: h * (0.7 * abs(y) + 0.2 * y * y),
    ),
    "ridge": (lambda x, h: Q.ridge(x, 0.4, h), lambda y, h: h * 0.2 * y * y),
    "nonnegative_ridge": (
        lambda x, h: Q.nonnegative_ridge(x, 0.4, h),
        lambda y, h: h * 0.2 * y * y if y >= 0 else 1e6 * -y,
    ),
}


@pytest.mark.parametrize("name", list(SEPARABLE))
@pytest.mark.parametrize("step", [1.0, 0.3])
def test_separable_prox_minimises_its_objective(name, step):
    prox, g = SEPARABLE[name]
    x = point(0)
    ref = torch.tensor([scalar_prox(float(v), lambda y: g(y, step)) for v in x], dtype=D)
    torch.testing.assert_close(prox(x, step), ref, atol=1e-6, rtol=0)


def test_closed_forms():
    x = torch.tensor([-2.0, 0.5, 3.0], dtype=D)
    torch.testing.assert_close(Q.l1(x, 1.0), torch.tensor([-1.0, 0.0, 2.0], dtype=D))
    torch.testing.assert_close(Q.nonnegative_l1(x, 1.0), torch.tensor([0.0, 0.0, 2.0], dtype=D))
    torch.testing.assert_close(Q.ridge(x, 1.0, step=3.0), x / 4)
    torch.testing.assert_close(Q.elastic_net(x, 1.0, 1.0), torch.tensor([-0.5, 0.0, 1.0], dtype=D))
    torch.testing.assert_close(Q.nonnegative_ridge(x, 1.0), torch.tensor([0.0, 0.25, 1.5], dtype=D))
    v = torch.tensor([3.0, 4.0], dtype=D)
    torch.testing.assert_close(Q.group_lasso(v, 1.0), v * 0.8)
    torch.testing.assert_close(Q.group_lasso(v, 2.0, step=3.0), torch.zeros(2, dtype=D))


def test_group_lasso_minimises_its_objective():
    # ½‖y − x‖² + t‖y‖ is minimised along y = s·x/‖x‖, s >= 0: a 1-d problem for the reference.
    x = point(1)
    t = 1.3
    nrm = float(x.norm())
    s = minimize_scalar(
        lambda s: 0.5 * (s - nrm) ** 2 + t * abs(s),
        bounds=(0, nrm),
        method="bounded",
        options={"xatol": 1e-12},
    ).x
    torch.testing.assert_close(Q.group_lasso(x, t), x * s / nrm, atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.01, 3.0), step=st.floats(0.1, 2.0))
def test_moreau_decomposition(seed, lam, step):
    # x = prox_{h f}(x) + h prox_{f*/h}(x / h); for f = λ‖·‖₁ the second term is the projection onto
    # the max-norm ball of radius hλ, for λ‖·‖₂ onto the l2 ball, for λ/2‖·‖² it is hλ x / (1 + hλ).
    x = point(seed, (3, 5))
    torch.testing.assert_close(Q.l1(x, lam, step) + P.linf_ball(x, step * lam), x)
    torch.testing.assert_close(Q.group_lasso(x, lam, step) + P.l2_ball(x, step * lam), x)
    torch.testing.assert_close(Q.ridge(x, lam, step) + step * lam * x / (1 + step * lam), x)
    # f = indicator of y >= 0: f* = indicator of y <= 0, prox of f* is min(x, 0).
    torch.testing.assert_close(Q.indicator(P.nonnegative)(x, step) + torch.clamp(x, max=0), x)


ALL = {
    **{k: v[0] for k, v in SEPARABLE.items()},
    "group_lasso": lambda x, h: Q.group_lasso(x, 0.7, h),
}


@pytest.mark.parametrize("name", list(ALL))
def test_jacobian_matches_central_differences(name):
    prox = ALL[name]
    x = point(4)
    x = torch.where(x.abs() < 0.9, x + 1.0, x)  # away from the kinks at |x| = 0.7·step and 0
    jac = torch.autograd.functional.jacobian(lambda v: prox(v, 0.8), x)
    eps = 1e-6
    fd = torch.stack(
        [(prox(x + eps * e, 0.8) - prox(x - eps * e, 0.8)) / (2 * eps) for e in torch.eye(6, dtype=D)], -1
    )
    torch.testing.assert_close(jac, fd, atol=1e-7, rtol=1e-7)


def test_strength_gradients_gradcheck_per_coordinate_and_per_sample():
    x = point(5, (2, 4))
    x = torch.where(x.abs() < 0.6, x + 1.2, x).requires_grad_()
    per_coord = torch.tensor([0.1, 0.3, 0.2, 0.05], dtype=D, requires_grad=True)
    per_sample = torch.tensor([[0.2], [0.4]], dtype=D, requires_grad=True)
    per_vector = torch.tensor([0.5, 0.9], dtype=D, requires_grad=True)
    step = torch.tensor(0.7, dtype=D, requires_grad=True)
    checks = [
        (Q.l1, (x, per_coord, step)),
        (Q.l1, (x, per_sample)),
        (Q.nonnegative_l1, (x, per_coord, step)),
        (Q.elastic_net, (x, per_coord, per_sample, step)),
        (Q.ridge, (x, per_sample, step)),
        (Q.nonnegative_ridge, (x, per_coord)),
        (Q.group_lasso, (x, per_vector, step)),
    ]
    for f, args in checks:
        assert torch.autograd.gradcheck(f, args), f.__name__
        assert torch.autograd.gradgradcheck(f, args), f.__name__


def test_kinks_are_on_the_zero_side_and_finite():
    t = torch.tensor(1.0, dtype=D, requires_grad=True)
    x = torch.tensor([-1.0, 1.0, 0.0], dtype=D, requires_grad=True)
    for f in (Q.l1, Q.nonnegative_l1, Q.elastic_net, Q.nonnegative_ridge):
        args = (x, t, t) if f is Q.elastic_net else (x, t)
        y = f(*args)
        gx, gt = torch.autograd.grad(y.sum(), (x, t))
        assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
    y = Q.l1(x, t)
    assert y.tolist() == [0.0, 0.0, 0.0]
    gx, gt = torch.autograd.grad(y.sum(), (x, t))
    assert gx.tolist() == [0.0, 0.0, 0.0] and float(gt) == 0.0
    v = torch.tensor([0.6, 0.8], dtype=D, requires_grad=True)
    (gv,) = torch.autograd.grad(Q.group_lasso(v, t).sum(), v)
    assert gv.tolist() == [0.0, 0.0]
    z = torch.zeros(3, dtype=D, requires_grad=True)
    (gz,) = torch.autograd.grad(Q.group_lasso(z, 0.0).sum(), z)
    assert torch.isfinite(gz).all()


def test_solver_calling_convention():
    lam = torch.tensor(0.5, dtype=D, requires_grad=True)
    w = torch.tensor([-2.0, 0.2, 3.0], dtype=D)
    p = Q.bind(Q.l1, lam)
    torch.testing.assert_close(p(w, 2.0), Q.l1(w, lam, 2.0))
    weights = torch.tensor([1.0, 5.0, 2.0], dtype=D)
    (g,) = torch.autograd.grad(p(w, 2.0) @ weights, lam)
    # ∂y_i/∂λ = −h·sign(w_i) on the support {0, 2} (|0.2| < hλ = 1): −2·(−1·1 + 1·2).
    torch.testing.assert_close(g, torch.tensor(-2.0, dtype=D))
    en = Q.bind(Q.elastic_net, 0.3, 0.2)
    torch.testing.assert_close(en(w, 0.5), Q.elastic_net(w, 0.3, 0.2, step=0.5))
    radius = torch.tensor(2.0, dtype=D, requires_grad=True)
    c = Q.indicator(P.l1_ball, radius)
    torch.testing.assert_close(c(w, 123.0), P.l1_ball(w, radius))
    (gr,) = torch.autograd.grad(c(w, 0.1)[2], radius)
    torch.testing.assert_close(gr, torch.tensor(0.5, dtype=D))  # 1/|support| on the l1 sphere


def test_batched_vmap_jacrev_double_backward_float32():
    x = point(6, (3, 5))
    for name, prox in ALL.items():
        out = prox(x, 0.5)
        torch.testing.assert_close(out, torch.stack([prox(v, 0.5) for v in x]))
        at_half = functools.partial(lambda v, f: f(v, 0.5), f=prox)
        torch.testing.assert_close(torch.func.vmap(at_half)(x), out)
        jac = torch.func.vmap(torch.func.jacrev(at_half))(x)
        ref = torch.stack([torch.autograd.functional.jacobian(at_half, v) for v in x])
        torch.testing.assert_close(jac, ref, msg=lambda m, n=name: f"{n}: {m}")
        assert prox(x.float(), 0.5).dtype == torch.float32
    # d²/dλ² of Σ ridge(x, λ) = Σ 2x / (1 + λ)³: double backward through the strength.
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(Q.ridge(x, lam).sum(), lam, create_graph=True)
    (gg,) = torch.autograd.grad(g, lam)
    torch.testing.assert_close(gg, 2 * x.sum() / 1.3**3)
    gf = torch.func.grad(lambda s: Q.elastic_net(x, s, 0.1).sum())(torch.tensor(0.2, dtype=D))
    shrunk = (x.abs() > 0.2).to(D)
    torch.testing.assert_close(gf, -(torch.sign(x) * shrunk).sum() / 1.1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: Q.l1(torch.ones(3), -0.1), "strength must be >= 0"),
        (lambda: Q.elastic_net(torch.ones(3), 0.1, -1.0), "l2 must be >= 0"),
        (lambda: Q.ridge(torch.ones(3), 0.1, step=0.0), "step must be > 0"),
        (
            lambda: Q.group_lasso(torch.ones(2, 3), torch.ones(3)),
            "strength must be a number or a tensor shaped",
        ),
        (lambda: Q.l1(torch.ones(3), torch.ones(4)), "strength must be a number or a tensor broadcastable"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_callables():
    with pytest.raises(TypeError, match="projection must be callable"):
        Q.indicator(1.0)
    with pytest.raises(TypeError, match="bind needs the strengths"):
        Q.bind(Q.l1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        Q.l1(np.ones(3), 0.1)


def test_inference_mode_and_autocast():
    x = point(8)
    for name, prox in ALL.items():
        ref = prox(x, 0.5)
        with torch.inference_mode():
            torch.testing.assert_close(prox(x, 0.5), ref, msg=lambda m, n=name: f"{n}: {m}")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prox(x, 0.5)
        assert out.dtype == D
        torch.testing.assert_close(out, ref)


def test_prox_and_projection_trace_into_one_graph_and_check_there() -> None:
    # Traced by torch.compile(fullgraph=True), the argument checks cannot read the data on the
    # host; they become checks in the graph, which raise the same message when it runs.
    prox = torch.compile(lambda x, s: il.prox.l1(x, s, 0.5), fullgraph=True, backend="aot_eager")
    simplex = torch.compile(lambda x, t: il.projection.simplex(x, t), fullgraph=True,
                            backend="aot_eager")
    x = torch.randn(3, 5, dtype=D, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prox(x, torch.tensor(0.3, dtype=D)), il.prox.l1(x, 0.3, 0.5))
    torch.testing.assert_close(simplex(x, torch.full((3,), 2.0, dtype=D)),
                               il.projection.simplex(x, 2.0))
    with pytest.raises(RuntimeError, match="strength must be >= 0"):
        prox(x, torch.tensor(-1.0, dtype=D))
    with pytest.raises(RuntimeError, match="total must be > 0"):
        simplex(x, torch.tensor([1.0, 0.0, 1.0], dtype=D))
