"""Ridge regression with per-feature weight decay: the hypergradient through ``il.argmin``
against the closed form (autograd through a dense ``torch.linalg.solve``).

Inner problem: ``w*(λ) = argmin_w 0.5 mean((X w - y)²) + 0.5 Σ_j exp(loglam_j) w_j²``.
Outer loss: validation MSE ``mean((X_val w* - y_val)²)``; its gradient w.r.t. ``loglam`` is
the hypergradient.
"""

import functools

import pytest
import torch

import implicit_layers as il
from tests import registry

N_TRAIN, N_VAL, D = 40, 30, 8


def make_data(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    X, y = randn(N_TRAIN, D), randn(N_TRAIN)
    # Spread the feature scales so the Hessian is moderately ill-conditioned.
    X = X * torch.logspace(-0.5, 0.5, D, dtype=dtype, device=device)
    X_val, y_val = randn(N_VAL, D), randn(N_VAL)
    loglam = 0.5 * randn(D) - 1.0
    return X, y, X_val, y_val, loglam


def inner(w, loglam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (loglam.exp() * w**2).sum()


def outer(w, X_val, y_val):
    return ((X_val @ w - y_val) ** 2).mean()


def closed_form_hypergradient(X, y, X_val, y_val, loglam):
    loglam = loglam.detach().clone().requires_grad_(True)
    H = X.T @ X / X.shape[0] + torch.diag(loglam.exp())
    w = torch.linalg.solve(H, X.T @ y / X.shape[0])
    (g,) = torch.autograd.grad(outer(w, X_val, y_val), loglam)
    return w.detach(), g


def implicit_hypergradient(X, y, X_val, y_val, loglam, solver, backward):
    loglam = loglam.detach().clone().requires_grad_(True)
    w0 = torch.zeros(D, dtype=X.dtype, device=X.device)
    w, info = il.argmin(
        inner, w0, loglam, X, y, solver=solver, backward=backward, return_info=True
    )
    (g,) = torch.autograd.grad(outer(w, X_val, y_val), loglam)
    return w.detach(), g, info


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


#: Settings the ridge problem needs beyond the registry's: enough terms for the series (step
#: 1/λ_max) and gradient steps to reach the forward tolerance.
SETTINGS = {"Neumann": {"max_steps": 5000}, "GradientDescent": {"max_steps": 20000}}

# Every argmin solver but Picard (GradientDescent is the same iteration), and every accurate
# linear solver of symmetric positive-definite systems.
LINEAR_SOLVERS = {
    c.name: functools.partial(c.make, **SETTINGS.get(c.name, {}))
    for c in registry.linear("spd", estimator=False)
}
FORWARD_SOLVERS = {
    c.name: functools.partial(c.make, **SETTINGS.get(c.name, {}))
    for c in registry.forward("argmin") if c.name != "Picard"
}


@pytest.mark.parametrize("forward", sorted(FORWARD_SOLVERS))
@pytest.mark.parametrize("linear", sorted(LINEAR_SOLVERS))
def test_ridge_hypergradient_float64(linear, forward, device):
    data = make_data(torch.float64, device)
    w_ref, g_ref = closed_form_hypergradient(*data)
    w, g, info = implicit_hypergradient(
        *data, FORWARD_SOLVERS[forward](), LINEAR_SOLVERS[linear]()
    )
    assert bool(info.converged)
    assert bool(info.backward.converged)
    assert rel(w, w_ref) < 1e-8
    assert rel(g, g_ref) < 1e-8


@pytest.mark.parametrize("linear", sorted(LINEAR_SOLVERS))
def test_ridge_hypergradient_float32(linear, device):
    data64 = make_data(torch.float64, device)
    _, g_ref = closed_form_hypergradient(*data64)
    data32 = tuple(t.float() for t in data64)
    _, g, info = implicit_hypergradient(*data32, il.solvers.LBFGS(), LINEAR_SOLVERS[linear]())
    assert g.dtype == torch.float32
    assert bool(info.converged)
    # float32 forward and backward tolerances are 1e-5 relative; the hypergradient inherits
    # them, amplified by the conditioning of the Hessian.
    assert rel(g.double(), g_ref) < 2e-4


def test_ridge_default_solvers_match(device):
    data = make_data(torch.float64, device, seed=1)
    _, g_ref = closed_form_hypergradient(*data)
    _, g, info = implicit_hypergradient(*data, None, None)
    assert info.solver == "LBFGS"
    assert bool(info.backward.converged)
    assert rel(g, g_ref) < 1e-8


def test_gradient_descent_default_step_under_inference_mode() -> None:
    """GradientDescent's default step (a power-iteration estimate of the Hessian's largest
    eigenvalue) needs Hessian-vector products; under inference_mode they come from torch.func,
    and the solve equals the no-grad one and the dense solution."""
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    H = A @ A.T + torch.eye(5, dtype=torch.float64)

    def f(w):
        return 0.5 * w @ H @ w - w.sum()

    solver = il.solvers.GradientDescent(max_steps=20000)
    with torch.no_grad():
        plain = il.argmin(f, torch.zeros(5, dtype=torch.float64), solver=solver)
    with torch.inference_mode():
        inference = il.argmin(f, torch.zeros(5, dtype=torch.float64), solver=solver)
    torch.testing.assert_close(inference, plain, rtol=0, atol=1e-14)
    torch.testing.assert_close(inference, torch.linalg.solve(H, torch.ones(5, dtype=torch.float64)),
                               rtol=0, atol=1e-8)


def test_newton_under_inference_mode_and_torch_func() -> None:
    """Newton's Hessian products under inference_mode and torch.func come from forward mode
    over torch.func.grad: the same minimiser as with autograd, and the hypergradient of the
    closed form (w solves 2(w - t) + 4w³ = 0, so dw/dt = 2 / (2 + 12 w²))."""

    def f(w, t):
        return ((w - t) ** 2).sum() + (w**4).sum()

    theta = torch.tensor(2.0, dtype=torch.float64)
    w0 = torch.zeros(3, dtype=torch.float64)
    solver = il.solvers.Newton()
    plain = il.argmin(f, w0, theta, solver=solver)
    with torch.inference_mode():
        inference = il.argmin(f, w0, theta, solver=solver)
    torch.testing.assert_close(inference, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(2 * (plain - theta) + 4 * plain**3, torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    g = torch.func.grad(lambda t: il.argmin(f, w0, t, solver=solver).sum())(theta)
    torch.testing.assert_close(g, 3 * 2 / (2 + 12 * plain[0] ** 2), rtol=1e-9, atol=0)
