"""Adaptive's trial of Anderson when plain iteration contracts slowly but below switch_ratio.

* the lasso proximal-gradient map on scikit-learn's diabetes data (plain iteration: contraction
  ~0.88, ~180 steps; Anderson ~45) switches and keeps Anderson; the solution is scikit-learn's
  Lasso;
* a map with an orthogonal Jacobian (all eigenvalues of modulus 0.9, where Anderson gains
  nothing) tries Anderson and goes back to plain iteration; the solution is a dense solve's.
"""

import pytest
import torch

import implicit_layers as il

pytest.importorskip("sklearn")
from sklearn.datasets import load_diabetes  # noqa: E402
from sklearn.linear_model import Lasso  # noqa: E402

F64 = torch.float64


def lasso_problem(alpha=0.05):
    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor(X, dtype=F64)
    y = torch.tensor(y, dtype=F64)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    n = X.shape[0]
    step = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2 / n)

    def prox_gradient(w, lam):
        # w - η ∇(1/(2n)‖Xw - y‖²), then soft thresholding at η λ
        v = w - step * (X.T @ (X @ w - y) / n)
        return torch.sign(v) * torch.clamp(v.abs() - step * lam, min=0.0)

    return X, y, prox_gradient, torch.tensor(alpha, dtype=F64)


def test_lasso_prox_gradient_switches_to_anderson():
    X, y, T, lam = lasso_problem()
    w0 = torch.zeros(X.shape[1], dtype=F64)
    solver = il.solvers.Adaptive(max_steps=2000)
    w, info = il.fixed_point(T, w0, lam, solver=solver, return_info=True)
    _, plain = il.fixed_point(T, w0, lam, solver=il.solvers.Picard(max_steps=2000), return_info=True)
    _, anderson = il.fixed_point(T, w0, lam, solver=il.solvers.Anderson(max_steps=2000),
                                 return_info=True)
    assert info.solver == "Adaptive (Picard, then Anderson)"
    assert bool(info.converged)
    assert int(plain.steps) > 150
    assert int(info.steps) <= 1.5 * int(anderson.steps)
    ref = Lasso(alpha=0.05, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.tensor(ref.coef_, dtype=F64), rtol=1e-7, atol=1e-9)


def test_orthogonal_jacobian_tries_anderson_and_returns_to_plain():
    n = 40
    Q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    A = 0.9 * Q  # eigenvalues 0.9 e^{iθ} spread on a circle: Anderson gains nothing
    b = torch.ones(n, dtype=F64)
    z, info = il.fixed_point(lambda z: A @ z + b, torch.zeros(n, dtype=F64),
                             solver=il.solvers.Adaptive(max_steps=2000), return_info=True)
    assert info.solver == "Adaptive (Picard; Anderson tried)"
    assert bool(info.converged)
    _, plain = il.fixed_point(lambda z: A @ z + b, torch.zeros(n, dtype=F64),
                              solver=il.solvers.Picard(max_steps=2000), return_info=True)
    assert int(info.steps) <= int(plain.steps) + 2
    torch.testing.assert_close(z, torch.linalg.solve(torch.eye(n, dtype=F64) - A, b),
                               rtol=1e-8, atol=0)
