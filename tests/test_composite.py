"""Composite argmin (``il.argmin(prox=...)``, ``constraint=...``) against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from sklearn import datasets, model_selection, preprocessing
from sklearn.linear_model import Lasso

import implicit_layers as il

D = torch.float64


@pytest.fixture(scope="module")
def diabetes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # jaxopt's lasso hyperparameter example: rows normalised, a third held out.
    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.normalize(X)
    return tuple(model_selection.train_test_split(X, y, test_size=0.33, random_state=0))


def _val_loss(theta: torch.Tensor, data, solver=None, backward=None) -> torch.Tensor:
    Xtr, Xval, ytr, yval = (torch.tensor(a) for a in data)
    lam = torch.exp(theta)  # the example's positive parametrisation, lam = exp(theta)
    w = il.argmin(
        lambda w: 0.5 * (Xtr @ w - ytr).square().mean(), torch.zeros(Xtr.shape[1], dtype=D),
        prox=il.prox.bind(il.prox.l1, lam), solver=solver, backward=backward,
    )
    return (Xval @ w - yval).square().mean()


def _closed_form(data, lam: float) -> tuple[np.ndarray, float, float]:
    """sklearn's lasso solution and d val / d theta, d² val / d theta² from the active set:
    on the support S with signs s, w_S = (X_Sᵀ X_S)⁻¹ (X_Sᵀ y − n λ s)."""
    Xtr, Xval, ytr, yval = data
    n = len(ytr)
    w = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(Xtr, ytr).coef_
    S = np.abs(w) > 0
    G = Xtr[:, S].T @ Xtr[:, S]
    w_S = np.linalg.solve(G, Xtr[:, S].T @ ytr - n * lam * np.sign(w[S]))
    w = np.zeros_like(w)
    w[S] = w_S
    dw = np.zeros_like(w)
    dw[S] = -n * lam * np.linalg.solve(G, np.sign(w[S]))  # d w / d theta (lam = e^theta)
    r = Xval @ w - yval
    m = len(yval)
    grad = 2 / m * r @ Xval @ dw
    # d²w/dθ² = dw (w_S is affine in λ, and dλ/dθ = λ).
    hess = 2 / m * (np.sum((Xval @ dw) ** 2) + r @ Xval @ dw)
    return w, grad, hess


def test_lasso_hypergradient_matches_the_active_set_closed_form(diabetes) -> None:
    w_ref, grad_ref, _ = _closed_form(diabetes, math.e)
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    loss = _val_loss(theta, diabetes, solver=il.solvers.ProximalGradient(rtol=1e-13))
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.item() == pytest.approx(155.659, abs=1e-3)  # the value quoted for this example
    assert grad.item() == pytest.approx(grad_ref, rel=1e-7)
    # The solution itself against scikit-learn's coordinate descent.
    Xtr, _, ytr, _ = (torch.tensor(a) for a in diabetes)
    w = il.argmin(lambda w: 0.5 * (Xtr @ w - ytr).square().mean(), torch.zeros(10, dtype=D),
                  prox=il.prox.bind(il.prox.l1, math.e),
                  solver=il.solvers.ProximalGradient(rtol=1e-13))
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-8 * np.abs(w_ref).max())


def test_lasso_hypergradient_central_differences_and_unrolled(diabetes) -> None:
    # Central differences of the validation loss through scikit-learn's solutions.
    Xtr, Xval, ytr, yval = diabetes
    h = 1e-5

    def val(theta: float) -> float:
        w = Lasso(alpha=math.exp(theta), fit_intercept=False, tol=1e-15, max_iter=10**6)
        return float(np.mean((Xval @ w.fit(Xtr, ytr).coef_ - yval) ** 2))

    fd = (val(1 + h) - val(1 - h)) / (2 * h)
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    (implicit,) = torch.autograd.grad(_val_loss(theta, diabetes), theta)
    assert implicit.item() == pytest.approx(fd, rel=1e-6)
    # Unrolled through every FISTA step, converged: the same number.
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    loss = _val_loss(theta, diabetes, solver=il.solvers.ProximalGradient(rtol=1e-13),
                     backward=il.backward.Unrolled())
    (unrolled,) = torch.autograd.grad(loss, theta)
    assert unrolled.item() == pytest.approx(implicit.item(), rel=1e-6)


def test_lasso_second_derivative_and_torch_func(diabetes) -> None:
    _, grad_ref, hess_ref = _closed_form(diabetes, math.e)
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(_val_loss(theta, diabetes), theta, create_graph=True)
    (h,) = torch.autograd.grad(g, theta)
    assert h.item() == pytest.approx(hess_ref, rel=1e-6)
    g_func = torch.func.grad(lambda t: _val_loss(t, diabetes))(torch.tensor(1.0, dtype=D))
    assert g_func.item() == pytest.approx(grad_ref, rel=1e-6)
    thetas = torch.tensor([0.5, 1.0, 1.5], dtype=D)
    g_vmap = torch.func.vmap(torch.func.grad(lambda t: _val_loss(t, diabetes)))(thetas)
    expected = [_closed_form(diabetes, math.exp(t))[1] for t in thetas.tolist()]
    np.testing.assert_allclose(g_vmap.numpy(), expected, rtol=1e-6)


def test_lasso_float32_and_batched(diabetes) -> None:
    Xtr, _, ytr, _ = (torch.tensor(a) for a in diabetes)
    lams = torch.tensor([0.5, math.e, 6.0], dtype=D, requires_grad=True)
    # One problem per λ, each with its own step, momentum and convergence test.
    Y = ytr.expand(3, -1)
    W, info = il.argmin(
        lambda w: 0.5 * ((w @ Xtr.T - Y).square().mean(-1)), torch.zeros(3, 10, dtype=D),
        prox=lambda w, step: il.prox.l1(w, lams.unsqueeze(-1), step), batched=True,
        return_info=True,
    )
    assert info.converged.shape == (3,) and bool(info.converged.all())
    W.sum().backward()
    for i, lam in enumerate(lams.tolist()):
        w_ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=10**6).fit(
            diabetes[0], diabetes[2]).coef_
        np.testing.assert_allclose(W[i].detach().numpy(), w_ref, atol=1e-6 * np.abs(w_ref).max())
        S = np.abs(w_ref) > 0
        G = diabetes[0][:, S].T @ diabetes[0][:, S]
        ref = -len(diabetes[2]) * np.linalg.solve(G, np.sign(w_ref[S])).sum()
        assert lams.grad[i].item() == pytest.approx(ref, rel=1e-6)
    # float32: the same solution and gradient to float32 accuracy.
    lam32 = torch.tensor(math.e, requires_grad=True)
    w32 = il.argmin(lambda w: 0.5 * (Xtr.float() @ w - ytr.float()).square().mean(),
                    torch.zeros(10), prox=il.prox.bind(il.prox.l1, lam32))
    assert w32.dtype == torch.float32
    w32.sum().backward()
    assert lam32.grad.item() == pytest.approx(lams.grad[1].item(), rel=1e-3)


def _simplex_reference(A: np.ndarray, b: np.ndarray, total: float) -> tuple[np.ndarray, np.ndarray, float]:
    """scipy's solution of min ½‖Aw − b‖² over {w >= 0, Σw = total}, and the derivatives of
    Σ_i c_i w_i with respect to b and total from the KKT system on the support."""
    n = A.shape[1]
    res = minimize(lambda w: 0.5 * np.sum((A @ w - b) ** 2), np.full(n, total / n),
                   jac=lambda w: A.T @ (A @ w - b), method="SLSQP",
                   bounds=[(0, None)] * n,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - total}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    w = res.x
    S = w > 1e-6
    k = int(S.sum())
    K = np.zeros((k + 1, k + 1))
    K[:k, :k] = A[:, S].T @ A[:, S]
    K[:k, k] = K[k, :k] = 1.0
    return w, S, K


def test_simplex_constrained_fit_against_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 6, dtype=D, generator=gen)
    b = torch.randn(12, dtype=D, generator=gen).requires_grad_(True)
    total = torch.tensor(2.0, dtype=D, requires_grad=True)
    c = torch.arange(1.0, 7.0, dtype=D)
    w = il.argmin(lambda w, b: 0.5 * (A @ w - b).square().sum(), torch.zeros(6, dtype=D), b,
                  constraint=lambda w: il.projection.simplex(w, total),
                  solver=il.solvers.ProximalGradient(rtol=1e-13))
    (c @ w).backward()
    w_ref, S, K = _simplex_reference(A.numpy(), b.detach().numpy(), 2.0)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, atol=1e-7)
    assert 1 < S.sum() < 6  # a face of the simplex, not a vertex or the interior
    # d(cᵀw)/d(b, total) from the KKT system K [w_S; ν] = [A_Sᵀ b; total].
    k = int(S.sum())
    u = np.linalg.solve(K, np.concatenate([c.numpy()[S], [0.0]]))
    np.testing.assert_allclose(b.grad.numpy(), A.numpy()[:, S] @ u[:k], rtol=1e-8, atol=1e-10)
    assert total.grad.item() == pytest.approx(u[k], rel=1e-8)


def test_gradcheck_of_a_constrained_and_a_penalised_argmin() -> None:
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(8, 5, dtype=D, generator=gen)
    b = torch.randn(8, dtype=D, generator=gen, requires_grad=True)
    radius = torch.tensor(0.7, dtype=D, requires_grad=True)
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    solver = il.solvers.ProximalGradient(rtol=1e-13)

    def ball(b: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        return il.argmin(lambda w: 0.5 * (A @ w - b).square().sum(), torch.zeros(5, dtype=D),
                         constraint=lambda w: il.projection.l1_ball(w, radius), solver=solver)

    def enet(b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return il.argmin(lambda w: 0.5 * (A @ w - b).square().sum(), torch.zeros(5, dtype=D),
                         prox=lambda w, step: il.prox.elastic_net(w, lam, 0.1, step), solver=solver)

    assert torch.autograd.gradcheck(ball, (b, radius), atol=1e-6)
    assert torch.autograd.gradcheck(enet, (b, lam), atol=1e-6)


def test_bad_inputs_name_the_argument() -> None:
    w0 = torch.zeros(3, dtype=D)

    def fun(w: torch.Tensor) -> torch.Tensor:
        return w.square().sum()

    with pytest.raises(ValueError, match="prox or constraint, not both"):
        il.argmin(fun, w0, prox=lambda w, s: w, constraint=lambda w: w)
    with pytest.raises(TypeError, match="constraint must be callable"):
        il.argmin(fun, w0, constraint=3)
    with pytest.raises(ValueError, match="prox must return a point shaped like w0"):
        il.argmin(fun, w0, prox=lambda w, s: w[:2])
    with pytest.raises(ValueError, match="does not solve composite problems; use ProximalGradient"):
        il.argmin(fun, w0, prox=il.prox.bind(il.prox.l1, 1.0), solver=il.solvers.LBFGS())
    with pytest.raises(ValueError, match="does not solve argmin"):
        il.argmin(fun, w0, solver=il.solvers.ProximalGradient())
    with pytest.raises(ValueError, match="shrink must be in"):
        il.solvers.ProximalGradient(shrink=1.5)


def test_no_convergence_warns() -> None:
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(30, 20, dtype=D, generator=gen)
    with pytest.warns(il.ConvergenceWarning, match="ProximalGradient"):
        il.argmin(lambda w: 0.5 * (A @ w - 1).square().sum(), torch.zeros(20, dtype=D),
                  prox=il.prox.bind(il.prox.l1, 0.01),
                  solver=il.solvers.ProximalGradient(max_steps=3))


def test_argmin_layer_with_a_constraint_is_sparsemax() -> None:
    # argmin_{w in simplex} ½‖w − x‖² is the projection of x, sparsemax.
    layer = il.nn.ArgminLayer(lambda w, x: 0.5 * (w - x).square().sum(-1), w_shape=(5,),
                              constraint=il.projection.simplex,
                              solver=il.solvers.ProximalGradient(rtol=1e-13))
    x = torch.tensor([[0.3, 1.2, -0.5, 0.9, 0.1], [2.0, 0.0, 0.1, -1.0, 1.9]], dtype=D,
                     requires_grad=True)
    weights = torch.arange(10.0, dtype=D).reshape(2, 5)
    w = layer(x)
    (g,) = torch.autograd.grad((weights * w).sum(), x)
    xr = x.detach().requires_grad_(True)
    ref = il.projection.simplex(xr)
    (g_ref,) = torch.autograd.grad((weights * ref).sum(), xr)
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="not both"):
        il.nn.ArgminLayer(lambda w, x: w.sum(-1), lower=0.0, constraint=il.projection.simplex)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), scale=st.floats(0.01, 100.0), accelerated=st.booleans())
def test_lasso_optimality_conditions_hold_per_sample(seed: int, scale: float, accelerated: bool) -> None:
    # A batch whose samples differ in curvature by `scale`: each gets its own step size.
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 12, 6, dtype=D, generator=gen) * torch.tensor([1.0, scale, 1 / scale],
                                                                     dtype=D).reshape(3, 1, 1)
    b = torch.randn(3, 12, dtype=D, generator=gen)
    lam = 0.3 * (A.mT @ b.unsqueeze(-1)).abs().amax((-1, -2))  # a sparse but nonzero solution
    w, info = il.argmin(
        lambda w: 0.5 * ((A @ w.unsqueeze(-1)).squeeze(-1) - b).square().sum(-1),
        torch.zeros(3, 6, dtype=D), prox=lambda w, step: il.prox.l1(w, lam.unsqueeze(-1), step),
        batched=True, return_info=True,
        solver=il.solvers.ProximalGradient(accelerated=accelerated, max_steps=20000),
    )
    assert bool(info.converged.all())
    grad = (A.mT @ ((A @ w.unsqueeze(-1)).squeeze(-1) - b).unsqueeze(-1)).squeeze(-1)
    tol = 1e-6 * lam.unsqueeze(-1)
    free = w != 0
    # Stationarity: ∇L = -λ sign(w) on the support, |∇L| <= λ off it.
    assert bool(((grad + lam.unsqueeze(-1) * w.sign()).abs() <= tol)[free].all())
    assert bool((grad.abs() <= lam.unsqueeze(-1) + tol)[~free].all())


def test_inference_mode_and_no_grad_give_the_same_solution() -> None:
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(10, 4, dtype=D, generator=gen)
    b = torch.randn(10, dtype=D, generator=gen)
    p = il.prox.bind(il.prox.l1, 0.5)
    with torch.no_grad():
        ref = il.argmin(lambda w: 0.5 * (A @ w - b).square().sum(), torch.zeros(4, dtype=D), prox=p)
    with torch.inference_mode():
        w = il.argmin(lambda w: 0.5 * (A @ w - b).square().sum(), torch.zeros(4, dtype=D), prox=p)
    torch.testing.assert_close(w, ref, rtol=1e-8, atol=1e-10)


def test_fista_momentum_grows_as_it_should_on_an_ill_conditioned_problem() -> None:
    # The momentum sequence m' = (1 + sqrt(1 + 4 m²)) / 2 grows by about 1/2 per step; grown
    # geometrically, it overflowed after some 900 steps (110 in float32) and the solve ended
    # in a NonFiniteError.
    h = torch.logspace(0, -3, 5, dtype=D)
    b = torch.ones(5, dtype=D)
    w, info = il.argmin(lambda w: 0.5 * (h * (w - b) ** 2).sum(), torch.zeros(5, dtype=D),
                        prox=il.prox.bind(il.prox.l1, 1e-4), return_info=True)
    assert bool(info.converged)
    torch.testing.assert_close(w, (b - 1e-4 / h).clamp(min=0), rtol=1e-7, atol=1e-9)
    h32 = torch.logspace(0, -2, 6)
    layer = il.nn.ArgminLayer(lambda w, x: 0.5 * (h32 * (w - x) ** 2).sum(-1), w_shape=(6,),
                              constraint=lambda w: il.projection.box(w, -0.5, 0.5))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x.clamp(-0.5, 0.5), rtol=0, atol=2e-3)


def test_a_nan_hessian_at_the_start_is_a_non_finite_error_naming_the_sample() -> None:
    # NaN in one sample's data makes its estimated step NaN; that step once reached the prox,
    # whose check then complained about the step ("step must be > 0. Got NaN.").
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(3, 10, 4, dtype=D, generator=gen)
    A[2, 0, 1] = float("nan")
    b = torch.randn(3, 10, dtype=D, generator=gen)
    with pytest.raises(il.NonFiniteError, match=r"batch sample\(s\) 2 of 3"):
        il.argmin(lambda w: 0.5 * (torch.einsum("bmn,bn->bm", A, w) - b).square().sum(-1),
                  torch.zeros(3, 4, dtype=D), prox=il.prox.bind(il.prox.l1, 0.1), batched=True)


def test_step_backward_modes_on_a_composite_problem_need_a_step_size() -> None:
    # The residual is a proximal-gradient step of unit length: unit steps diverge where the
    # Hessian's largest eigenvalue exceeds 2 (here 2.07), so the step modes take the forward
    # solver's step size or their own, as on a plain argmin.
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 8, dtype=D, generator=gen)
    w_true = torch.tensor([1.0, -2.0, 0, 0, 0.5, 0, 0, 3.0], dtype=D)
    y = X @ w_true + 0.1 * torch.randn(40, dtype=D, generator=gen)

    def grad(backward, solver=None):  # noqa: ANN001, ANN202
        lam = torch.tensor(0.2, dtype=D, requires_grad=True)
        w = il.argmin(lambda w: 0.5 * (X @ w - y).square().sum() / 40, torch.zeros(8, dtype=D),
                      prox=il.prox.bind(il.prox.l1, lam), backward=backward, solver=solver)
        return torch.autograd.grad(w.sum(), lam)[0]

    with pytest.raises(ValueError, match="Truncated on an argmin problem needs a step size"):
        grad(il.backward.Truncated(200))
    exact = grad(None)
    borrowed = grad(il.backward.Truncated(400), il.solvers.ProximalGradient(0.05))
    own = grad(il.backward.Truncated(400, step_size=0.05))
    torch.testing.assert_close(borrowed, exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(own, borrowed, rtol=1e-12, atol=0)


@pytest.mark.parametrize("step", [float("nan"), float("inf"), 0.0])
def test_step_size_must_be_finite_and_positive(step: float) -> None:
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        il.solvers.ProximalGradient(step)


@pytest.mark.parametrize("accelerated", [True, False])
def test_a_step_made_small_by_a_curved_start_grows_back(accelerated: bool) -> None:
    # From far out, the quartic term makes the curvature ~1000 times its value near the
    # solution: the first step is ~1/1000 of the step there. A step that never grew back moved
    # so little per iteration that the convergence test was met 15,818 steps later with an
    # error of 2.7e-6 (rtol 1e-10); grown back (up to 1 / the largest Hessian eigenvalue,
    # estimated again where it has fallen), the solve is accurate in about a hundred steps.
    b = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=D)

    def f(w: torch.Tensor) -> torch.Tensor:
        return (0.5 * (w - b) ** 2 + 0.1 * (w - b) ** 4).sum()

    p = il.prox.bind(il.prox.l1, 0.05)
    ref = il.argmin(f, b.clone(), prox=p, solver=il.solvers.ProximalGradient(rtol=1e-14, max_steps=100000))
    w, info = il.argmin(f, b + 30, prox=p, return_info=True,
                        solver=il.solvers.ProximalGradient(accelerated=accelerated, max_steps=5000))
    assert bool(info.converged) and int(info.steps) < 500
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-7)
