"""Projections and proximal operators at the edges of their domain: extreme magnitudes,
infinite and NaN inputs and parameters, degenerate sets, kinks, parameter shapes, and the
errors for what they cannot take. Each expected value is a closed form or the same projection
of an equivalent, well-scaled input."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il

P, X = il.projection, il.prox
D = torch.float64
NAN, INF = float("nan"), float("inf")


def _jacobian(f, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return torch.autograd.functional.jacobian(f, x)


@pytest.mark.parametrize("project", [P.hyperplane, P.halfspace])
def test_a_normal_of_length_one_stands_for_n_equal_entries(project) -> None:  # noqa: ANN001
    x = torch.tensor([[0.0, 0.0, 3.0], [1.0, -2.0, 0.5]], dtype=D)
    one = torch.tensor([2.0], dtype=D)
    full = torch.full((3,), 2.0, dtype=D)
    got = project(x, one, torch.tensor([1.0, -4.0], dtype=D))
    torch.testing.assert_close(got, project(x, full, torch.tensor([1.0, -4.0], dtype=D)), rtol=0, atol=1e-15)
    assert (got @ full <= torch.tensor([1.0, -4.0], dtype=D) + 1e-12).all()


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e7), (D, 1e16)])
def test_simplex_and_l1_ball_far_from_the_origin(dtype, offset) -> None:  # noqa: ANN001
    # Equal entries far beyond the total: the simplex splits the total evenly, and the l1 ball
    # lands on its sphere (the partial sums must not lose the total to cancellation).
    y = P.simplex(torch.full((3,), offset, dtype=dtype))
    torch.testing.assert_close(y, torch.full((3,), 1 / 3, dtype=dtype))
    y = P.l1_ball(torch.full((2,), offset, dtype=dtype))
    torch.testing.assert_close(y, torch.full((2,), 0.5, dtype=dtype))
    # and unequal ones: the projection of x plus a common offset is the projection of x
    x = torch.tensor([0.5, 0.25, -1.0], dtype=D)
    torch.testing.assert_close(P.simplex(x + 1e6), P.simplex(x), rtol=0, atol=1e-9)


def test_simplex_with_a_tiny_total() -> None:
    y = P.simplex(torch.tensor([1.0, 0.0], dtype=D), 1e-300)
    assert y[0] == 1e-300 and y[1] == 0


@pytest.mark.parametrize("dtype, big, tiny", [(torch.float32, 1e20, 1e-30), (D, 1e200, 1e-300)])
def test_l2_ball_and_group_lasso_neither_overflow_nor_underflow(dtype, big, tiny) -> None:  # noqa: ANN001
    x = torch.tensor([big, 0.0], dtype=dtype)
    torch.testing.assert_close(P.l2_ball(x, 1.0), torch.tensor([1.0, 0.0], dtype=dtype))
    # prox of step·s·‖y‖ with s = big / 2: half of x remains
    torch.testing.assert_close(X.group_lasso(x, big / 2), torch.tensor([big / 2, 0.0], dtype=dtype))
    # a radius of 0 projects a tiny point to 0 (its squared norm underflows)
    assert (P.l2_ball(torch.tensor([tiny, 0.0], dtype=dtype), 0.0) == 0).all()


def test_an_infinite_radius_or_strength_gives_finite_gradients() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]], dtype=D, requires_grad=True)
    radius = torch.tensor([INF, 0.25], dtype=D, requires_grad=True)
    y = P.l2_ball(x, radius)
    torch.testing.assert_close(y[0], x[0].detach())
    gx, gr = torch.autograd.grad(y.sum(), (x, radius))
    torch.testing.assert_close(gx[0], torch.ones(3, dtype=D))
    assert torch.isfinite(gx).all() and gr[0] == 0 and gr[1] == 1.0
    strength = torch.tensor([INF, 0.1], dtype=D, requires_grad=True)
    z = X.group_lasso(x, strength)
    assert (z[0] == 0).all()
    gx, gs = torch.autograd.grad(z.sum(), (x, strength))
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all()
    assert (gx[0] == 0).all() and gs[0] == 0


@pytest.mark.parametrize("project", [P.simplex, P.l1_ball, lambda v: X.group_lasso(v, 0.1)])
def test_a_nan_entry_makes_the_whole_vector_nan(project) -> None:  # noqa: ANN001
    x = torch.tensor([[NAN, 0.5, 0.2], [0.3, 0.9, -0.4]], dtype=D)
    y = project(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("prox", [
    lambda v: X.l1(v, 0.1), lambda v: X.nonnegative_l1(v, 0.1), lambda v: X.elastic_net(v, 0.1, 0.1),
    lambda v: X.nonnegative_ridge(v, 0.1), lambda v: X.ridge(v, 0.1), P.nonnegative,
    lambda v: P.box(v, -1.0, 1.0), lambda v: P.l2_ball(v, 0.1), lambda v: P.linf_ball(v, 0.1),
])
def test_a_nan_entry_stays_nan(prox) -> None:  # noqa: ANN001
    y = prox(torch.tensor([NAN, 0.5, 0.2], dtype=D))
    assert torch.isnan(y[0])


def test_elementwise_prox_values_unchanged_by_the_kink_convention() -> None:
    # Soft-thresholding against its closed form, ties included (|x| == threshold gives 0 and
    # the derivative of the zero side).
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 0.7, 3.0], dtype=D, requires_grad=True)
    y = X.l1(x, 0.5)
    torch.testing.assert_close(y, torch.tensor([-1.5, 0.0, 0.0, 0.0, 0.2, 2.5], dtype=D))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=D))


@pytest.mark.parametrize("project, x", [
    (lambda v: P.l2_ball(v, 0.0), torch.zeros(2, dtype=D)),
    (lambda v: P.l1_ball(v, 0.0), torch.zeros(2, dtype=D)),
    (lambda v: P.linf_ball(v, 0.0), torch.zeros(2, dtype=D)),
    (lambda v: P.box(v, 1.0, 1.0), torch.ones(2, dtype=D)),
])
def test_a_set_that_is_a_point_has_a_zero_jacobian(project, x) -> None:  # noqa: ANN001
    # The projection is constant in x: no inactive side to take at the point itself.
    assert (_jacobian(project, x) == 0).all()
    assert (_jacobian(project, x + 0.3) == 0).all()


def test_simplex_at_a_kink_takes_the_inactive_side() -> None:
    # At x = (1, 0) the second entry sits exactly at the threshold: the derivative is the one
    # where y_2 >= 0 is inactive, the limit from x = (1, ε).
    at_kink = _jacobian(P.simplex, torch.tensor([1.0, 0.0], dtype=D))
    inside = _jacobian(P.simplex, torch.tensor([1.0, 1e-3], dtype=D))
    torch.testing.assert_close(at_kink, inside, rtol=0, atol=1e-15)
    torch.testing.assert_close(at_kink, torch.eye(2, dtype=D) - 0.5, rtol=0, atol=1e-15)


@pytest.mark.parametrize("call, match", [
    (lambda: X.group_lasso(torch.randn(2, 3), torch.ones(2, 1)), r"strength.squeeze\(-1\)"),
    (lambda: P.l2_ball(torch.randn(2, 3), torch.ones(2, 1)), r"radius must be .* shaped like x.shape\[:-1\]"),
    (lambda: P.l2_ball(torch.randn(3), torch.ones(4)), r"got shape \(4,\)"),
    (lambda: P.simplex(torch.randn(2, 3), torch.ones(3, 2)), "total"),
    (lambda: P.box_section(torch.randn(3), 0.0, 1.0, torch.ones(3), torch.ones(2)), "^c must"),
    (lambda: P.simplex(torch.zeros(2, 0)), "nonempty last dimension"),
    (lambda: P.affine_set(torch.randn(5, 3), torch.randn(4, 2, 3), torch.randn(2)), "batch dimensions"),
    (lambda: P.l2_ball(torch.ones(3), NAN), "radius must be >= 0. Got NaN"),
    (lambda: P.l1_ball(torch.ones(3), -2.0), "radius must be >= 0. Got -2"),
    (lambda: P.box(torch.ones(3), NAN, 1.0), "lower must be <= upper.*Got NaN"),
    (lambda: P.hyperplane(torch.ones(3), torch.tensor([NAN, 1.0, 1.0]), 1.0), "a must be nonzero.*Got NaN"),
    (lambda: X.l1(torch.ones(3), -0.5), "strength must be >= 0.*Got -0.5"),
    (lambda: X.l1(torch.ones(3), 0.5, step=0.0), "step must be > 0. Got 0"),
])
def test_bad_parameters_name_the_argument_and_the_value(call, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: P.simplex(torch.ones(3), "1"), "total must be a number or a real tensor; got str"),
    (lambda: P.l2_ball(torch.ones(3), None), "radius must be a number or a real tensor; got NoneType"),
])
def test_parameters_that_are_not_numbers(call, match) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match=match):
        call()


def test_empty_inputs() -> None:
    assert P.l1_ball(torch.zeros(2, 0)).shape == (2, 0)
    y = P.polyhedron(torch.zeros(0, 3, dtype=D), G=torch.ones(1, 3, dtype=D), h=torch.ones(1, dtype=D))
    assert y.shape == (0, 3)
