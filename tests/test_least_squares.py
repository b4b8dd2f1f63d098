"""``il.least_squares`` against scipy.optimize.least_squares and central differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares as scipy_least_squares

import implicit_layers as il

D = torch.float64
T = torch.linspace(0, 2, 25, dtype=D)


def _model(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # A decaying oscillation: a nonzero-residual fit to data it cannot match exactly.
    return w[..., 0:1] * torch.exp(-w[..., 1:2] * t) + w[..., 2:3] * torch.sin(3 * t)


def _data(seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    clean = 2.0 * torch.exp(-1.5 * T) + 0.5 * torch.sin(3 * T)
    return clean + 0.1 * torch.randn(*batch, T.numel(), dtype=D, generator=gen)


def _scipy_fit(y: np.ndarray) -> np.ndarray:
    t = T.numpy()

    def fun(w: np.ndarray) -> np.ndarray:
        return w[0] * np.exp(-w[1] * t) + w[2] * np.sin(3 * t) - y

    return scipy_least_squares(fun, np.ones(3), xtol=1e-15, ftol=1e-15, gtol=1e-15).x


@pytest.mark.parametrize("solver", [None, il.solvers.GaussNewton(),
                                    il.solvers.LevenbergMarquardt(dense_max_size=0)])
def test_solution_matches_scipy(solver) -> None:
    y = _data(0)
    w, info = il.least_squares(lambda w: _model(w, T) - y, torch.ones(3, dtype=D), solver=solver,
                               return_info=True)
    assert bool(info.converged)
    np.testing.assert_allclose(w.numpy(), _scipy_fit(y.numpy()), rtol=1e-8)


def test_gradient_is_exact_at_nonzero_residual() -> None:
    y = _data(1).requires_grad_(True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    w = il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), y)
    (grad,) = torch.autograd.grad(c @ w, y)
    # The implicit function theorem by dense linear algebra: dw/dy = -H⁻¹ ∂²L/∂w∂y with H the
    # full Hessian of L = ½‖r‖² at scipy's solution.
    w_ref = torch.tensor(_scipy_fit(y.detach().numpy()), dtype=D)

    def loss(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (_model(w, T) - y).square().sum()

    H = torch.func.hessian(loss)(w_ref, y.detach())
    cross = torch.func.jacrev(torch.func.grad(loss), argnums=1)(w_ref, y.detach())  # (3, m)
    dense = -(torch.linalg.solve(H, c) @ cross)
    torch.testing.assert_close(grad, dense, rtol=1e-8, atol=1e-10)
    # Central differences of forward solves (no derivatives involved; the solutions are
    # accurate to ~1e-9, the rounding floor of the decrease test, hence the tolerance).
    h = 1e-3
    with torch.no_grad():
        fit = lambda y: c @ il.least_squares(lambda w: _model(w, T) - y, torch.ones(3, dtype=D))  # noqa: E731
        fd = torch.stack([(fit(y + h * e) - fit(y - h * e)) / (2 * h) for e in torch.eye(25, dtype=D)])
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)
    # The residual is far from zero, so the Gauss-Newton matrix JᵀJ alone would be off:
    # the full Hessian is what makes the gradient exact.
    assert float((_model(w.detach(), T) - y.detach()).norm()) > 0.3


def test_batched_curve_fits_and_composability() -> None:
    Y = _data(2, (5,)).requires_grad_(True)
    W, info = il.least_squares(lambda w, Y: _model(w, T) - Y, torch.ones(5, 3, dtype=D), Y,
                               batched=True, return_info=True)
    assert info.converged.shape == (5,) and bool(info.converged.all())
    for i in range(5):
        np.testing.assert_allclose(W[i].detach().numpy(), _scipy_fit(Y[i].detach().numpy()),
                                   rtol=1e-8)
    # Batched gradient = per-sample gradients.
    (gb,) = torch.autograd.grad(W[:, 1].sum(), Y)
    y1 = Y[1].detach().requires_grad_(True)
    w1 = il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), y1)
    (g1,) = torch.autograd.grad(w1[1], y1)
    torch.testing.assert_close(gb[1], g1, rtol=1e-7, atol=1e-9)
    # torch.func.grad and vmap over problems, double backward.

    def decay(y: torch.Tensor) -> torch.Tensor:
        return il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), y)[1]

    torch.testing.assert_close(torch.func.grad(decay)(Y[1].detach()), g1, rtol=1e-7, atol=1e-9)
    gv = torch.func.vmap(torch.func.grad(decay))(Y.detach())
    torch.testing.assert_close(gv, gb, rtol=1e-7, atol=1e-9)
    y1 = Y[1].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(decay(y1), y1, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), y1)
    eps = 1e-5
    grad_of = torch.func.grad(decay)
    fd = (grad_of(y1.detach() + eps) - grad_of(y1.detach() - eps)).sum() / (2 * eps)
    assert hv.sum().item() == pytest.approx(fd.item(), rel=1e-4)


def test_float32() -> None:
    y = _data(3)
    w = il.least_squares(lambda w: _model(w, T.float()) - y.float(), torch.ones(3))
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), _scipy_fit(y.numpy()), rtol=1e-4)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="residual must return a floating-point torch.Tensor"):
        il.least_squares(lambda w: (w, w), torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match=r"batched=True residual must return residuals shaped \(B, ...\)"):
        il.least_squares(lambda w: w.sum(), torch.ones(4, 3, dtype=D), batched=True)
    with pytest.raises(ValueError, match="does not solve least_squares problems"):
        il.least_squares(lambda w: w, torch.ones(3, dtype=D), solver=il.solvers.Anderson())
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        il.solvers.LevenbergMarquardt(-1.0)
    with pytest.raises(TypeError, match="compile must be True or False, got str"):
        il.solvers.LevenbergMarquardt(compile="yes")  # type: ignore[arg-type]
    y = _data(0)
    with pytest.warns(il.ConvergenceWarning, match="LevenbergMarquardt"):
        il.least_squares(lambda w: _model(w, T) - y, torch.ones(3, dtype=D),
                         solver=il.solvers.LevenbergMarquardt(max_steps=1))


def test_gauss_newton_backward_exact_only_at_zero_residual() -> None:
    w_true = torch.tensor([2.0, 1.5, 0.5], dtype=D)
    gn = il.backward.GaussNewtonImplicit()
    for noise, exact in ((0.0, True), (0.1, False)):
        y = (_model(w_true, T) + noise * torch.sin(7 * T)).requires_grad_(True)
        grads = []
        for backward in (None, gn):
            w = il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), y,
                                 backward=backward)
            grads.append(torch.autograd.grad(w[1], y)[0])
        # Gauss-Newton's own formula: dw/dy = (JᵀJ)⁻¹ Jᵀ at the solution.
        J = torch.func.jacrev(lambda w: _model(w, T))(w.detach())
        torch.testing.assert_close(grads[1], torch.linalg.solve(J.T @ J, J.T)[1], rtol=1e-7, atol=1e-9)
        close = torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-8)
        assert close == exact
    with pytest.raises(ValueError, match="GaussNewtonImplicit differentiates least-squares"):
        il.argmin(lambda w: w.square().sum(), torch.ones(2, dtype=D, requires_grad=True) * 1, backward=gn)


def _underdetermined(w: torch.Tensor) -> torch.Tensor:
    # Fewer residuals (2) than unknowns (3) per sample: the Jacobian comes by rows.
    return torch.stack([w[..., 0] ** 2 + w[..., 1] - 1, w[..., 1] * w[..., 2] - 0.5], -1)


@pytest.mark.parametrize("residual", ["overdetermined", "underdetermined"])
@pytest.mark.parametrize("route", ["recorded", "inference_mode"])
def test_jacobian_products_match_jacrev(residual: str, route: str) -> None:
    from implicit_layers.solvers.least_squares import _Linearised

    Y = _data(4, (3,))
    fn = (lambda w: _model(w, T) - Y) if residual == "overdetermined" else _underdetermined
    z = torch.tensor([[1.0, 0.5, 0.2], [2.0, 1.5, -0.3], [0.5, 2.0, 1.0]], dtype=D)
    # Per-sample Jacobians by reverse mode, sample by sample: (B, m, n).
    J = torch.stack([torch.func.jacrev(lambda w, i=i: fn(w.unsqueeze(0).expand(3, 3))[i])(z[i])
                     for i in range(3)])
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, J.shape[1], dtype=D, generator=gen)
    v = torch.randn(3, 3, dtype=D, generator=gen)
    with torch.inference_mode(route == "inference_mode"):
        products = _Linearised(fn, z, dense=False)
        dense = _Linearised(fn, z, dense=True)
        assert products.recorded == dense.recorded == (route == "recorded")
        torch.testing.assert_close(products.r, fn(z))
        torch.testing.assert_close(products.jv(v), (J @ v.unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(products.jtv(u), (J.mT @ u.unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(dense.jt, J.mT)
        torch.testing.assert_close(dense.normal, J.mT @ J)
        torch.testing.assert_close(dense.jtv(u), (J.mT @ u.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("dense_max_size", [128, 0])
@pytest.mark.parametrize("sync", [True, False])
def test_batched_equals_looped_in_every_mode(dense_max_size: int, sync: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # From w0 = 1 some samples refuse their first steps while others accept: the batch merges
    # accepted and refused samples. Each sample must follow its own solve. sync=False takes the
    # accelerators' route (masked merges without reading the acceptance on the host).
    from implicit_layers.solvers import least_squares

    monkeypatch.setattr(least_squares, "_syncs_freely", lambda t: sync)
    Y = _data(5, (6,)) + torch.linspace(0.0, 1.5, 6, dtype=D).unsqueeze(-1) * torch.exp(-4 * T)
    solver = il.solvers.LevenbergMarquardt(dense_max_size=dense_max_size)
    W, info = il.least_squares(lambda w, Y: _model(w, T) - Y, torch.ones(6, 3, dtype=D), Y,
                               batched=True, solver=solver, return_info=True)
    assert bool(info.converged.all())
    assert int(info.steps.max()) > int(info.steps.min())  # samples stop on their own
    for i in range(6):
        wi = il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D), Y[i], solver=solver)
        torch.testing.assert_close(W[i], wi, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(W[i].numpy(), _scipy_fit(Y[i].numpy()), rtol=1e-8)
    # inference_mode takes the torch.func products; vmap over the problems folds them into a
    # batch solved under the transform: the same solutions.
    with torch.inference_mode():
        Wi = il.least_squares(lambda w, Y: _model(w, T) - Y, torch.ones(6, 3, dtype=D), Y,
                              batched=True, solver=solver)
    torch.testing.assert_close(Wi, W, rtol=1e-9, atol=1e-10)
    Wv = torch.func.vmap(lambda y: il.least_squares(lambda w, y: _model(w, T) - y, torch.ones(3, dtype=D),
                                                    y, solver=solver))(Y)
    torch.testing.assert_close(Wv, W, rtol=1e-9, atol=1e-10)


def test_fewer_residuals_than_unknowns() -> None:
    # A zero-residual problem with a 2-dimensional set of solutions: the solve must reach one
    # (r = 0, so the gradient Jᵀr vanishes), batched and unbatched alike.
    w = il.least_squares(_underdetermined, torch.ones(3, dtype=D))
    assert float(_underdetermined(w).abs().max()) < 1e-9
    W = il.least_squares(_underdetermined, torch.tensor([[1.0, 1.0, 1.0], [0.5, -1.0, 2.0]], dtype=D),
                         batched=True)
    assert float(_underdetermined(W).abs().max()) < 1e-9
    torch.testing.assert_close(W[0], w)


@pytest.mark.parametrize("n", [3, 10])
def test_compiled_step_jacobian_matches_jacrev(n: int) -> None:
    # The products of the compiled step (unrolled for few unknowns, one vmap beyond), run
    # eagerly here: r and Jᵀ of every sample against reverse mode sample by sample.
    from implicit_layers.solvers.least_squares import _value_and_jt

    gen = torch.Generator().manual_seed(1)
    A = torch.randn(4, 7, n, dtype=D, generator=gen)

    def fn(w: torch.Tensor) -> torch.Tensor:
        return torch.sin(torch.einsum("bmn,bn->bm", A, w)) - 0.3

    z = torch.randn(4, n, dtype=D, generator=gen)
    r, jt = _value_and_jt(fn, z)
    torch.testing.assert_close(r, fn(z))
    for i in range(4):
        J = torch.func.jacrev(lambda w, i=i: torch.sin(A[i] @ w) - 0.3)(z[i])
        torch.testing.assert_close(jt[i], J.T)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_unrolled_damped_solve_matches_cholesky(n: int) -> None:
    # The compiled step's written-out Cholesky solve against a dense solve of (JᵀJ + μI) δ = -g,
    # and a nil step where the matrix is not positive definite.
    from implicit_layers.solvers.least_squares import _unrolled_damped_solve

    gen = torch.Generator().manual_seed(n)
    J = torch.randn(5, 12, n, dtype=D, generator=gen)
    g = torch.randn(5, n, dtype=D, generator=gen)
    mu = torch.rand(5, 1, dtype=D, generator=gen)
    dense = torch.linalg.solve(J.mT @ J + mu.unsqueeze(-1) * torch.eye(n, dtype=D), -g)
    torch.testing.assert_close(_unrolled_damped_solve(J.mT @ J, g, mu), dense, rtol=1e-10, atol=1e-12)
    indefinite = -torch.eye(n, dtype=D).expand(5, n, n)
    assert bool((_unrolled_damped_solve(indefinite, g, mu.clamp_max(0.5)) == 0).all())
    # Per sample: the indefinite samples of a mixed batch take the nil step, the others theirs.
    mixed = torch.where(torch.tensor([True, False, True, False, False]).view(5, 1, 1), indefinite, J.mT @ J)
    step = _unrolled_damped_solve(mixed, g, mu.clamp_max(0.5))
    assert bool((step[[0, 2]] == 0).all())
    expected = torch.linalg.solve(J.mT @ J + mu.clamp_max(0.5).unsqueeze(-1) * torch.eye(n, dtype=D), -g)
    torch.testing.assert_close(step[[1, 3, 4]], expected[[1, 3, 4]], rtol=1e-10, atol=1e-12)


def test_closed_over_tensors_are_found_with_and_without_grad() -> None:
    # A closed-over tensor that requires grad is captured; without one the solution requires
    # none. The fit scales with the data in (a, c): w(s) = (s a₁, b₁, s c₁), so d(a + b + c)/ds =
    # (a + c) / s.
    y = _data(7)
    scale = torch.tensor(1.5, dtype=D, requires_grad=True)
    w = il.least_squares(lambda w: _model(w, T) - scale * y, torch.ones(3, dtype=D))
    (grad,) = torch.autograd.grad(w.sum(), scale)
    torch.testing.assert_close(grad, (w[0] + w[2]).detach() / 1.5, rtol=1e-7, atol=0.0)
    plain = il.least_squares(lambda w: _model(w, T) - 1.5 * y, torch.ones(3, dtype=D))
    assert not plain.requires_grad
    torch.testing.assert_close(plain, w.detach())


def test_a_step_taken_within_rounding_keeps_the_damping() -> None:
    # Near this fit's solution a step whose predicted decrease is below the rounding of r is
    # taken with a gain ratio far below 0 (rounding); Nielsen's factor there, 1 - (2ρ - 1)³,
    # multiplied μ by up to 3e11 and stalled the solve short of its tolerance.
    t = torch.linspace(0, 2, 25, dtype=D)
    th = torch.tensor([0.7, 2.0], dtype=D)
    y = 1.5 * torch.exp(-0.8 * t) + 0.3 * torch.sin(5 * t)

    def residual(w: torch.Tensor) -> torch.Tensor:
        return w[0] * torch.exp(-w[1] * t * th[0]) + torch.sin(th[1] * t) * w[1] - y

    w, info = il.least_squares(residual, torch.ones(2, dtype=D), return_info=True)
    assert bool(info.converged)
    ref = scipy_least_squares(lambda v: residual(torch.tensor(v, dtype=D)).numpy(), np.ones(2),
                              xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-8)


def test_noisy_batched_fits_all_converge() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 2, 25, dtype=D)
    B = 200
    A = 1 + torch.rand(B, 1, dtype=D, generator=gen)
    R = 0.5 + torch.rand(B, 1, dtype=D, generator=gen)
    Y = A * torch.exp(-R * t) + 0.3 * torch.randn(B, 25, dtype=D, generator=gen)
    W, info = il.least_squares(lambda w, Y: w[:, :1] * torch.exp(-w[:, 1:] * t) - Y,
                               torch.ones(B, 2, dtype=D), Y, batched=True, return_info=True)
    assert bool(info.converged.all())
    W_gn = il.least_squares(lambda w, Y: w[:, :1] * torch.exp(-w[:, 1:] * t) - Y,
                            torch.ones(B, 2, dtype=D), Y, batched=True, solver=il.solvers.GaussNewton())
    torch.testing.assert_close(W, W_gn, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), 0.0])
def test_damping_must_be_finite_and_positive(damping: float) -> None:
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        il.solvers.LevenbergMarquardt(damping=damping)


def test_a_residual_that_ignores_w_is_an_error() -> None:
    y = torch.randn(5, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="residual.*does not depend on w"):
        il.least_squares(lambda w, y: y - 1.0, torch.ones(2, dtype=D), y)
