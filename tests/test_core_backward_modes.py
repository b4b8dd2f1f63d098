"""Backward modes other than plain implicit differentiation: Truncated, JacobianFree, Phantom,
Unrolled with a learnable step size, and Implicit with a fallback."""

import pytest
import torch

import implicit_layers as il

DT = torch.float64


def randn_factory(seed, device):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    return randn


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class FixedPoint:
    """``z = tanh(W z + x)``, unbatched, ``‖W‖₂ = 0.6``."""

    def __init__(self, device, n=6, seed=0):
        randn = randn_factory(seed, device)
        W = randn(n, n)
        self.W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
        self.x = randn(n)
        self.cot = randn(n)
        self.n = n

    def f(self, z, x):
        return torch.tanh(self.W @ z + x)

    def grad(self, backward, solver=None, return_info=False):
        x = self.x.clone().requires_grad_(True)
        z0 = torch.zeros(self.n, dtype=DT, device=x.device)
        z, info = il.fixed_point(
            self.f, z0, x, solver=solver, backward=backward, return_info=True
        )
        (g,) = torch.autograd.grad(z, x, self.cot)
        return (g, info) if return_info else g


class Quadratic:
    """``min_w 0.5 wᵀAw - θᵀw + Σ log cosh(w)``, Hessian eigenvalues in ``[1, 5]``."""

    def __init__(self, device, n=6, seed=1):
        randn = randn_factory(seed, device)
        Q, _ = torch.linalg.qr(randn(n, n))
        self.A = (Q * torch.linspace(1.0, 4.0, n, dtype=DT, device=device)) @ Q.T
        self.theta = randn(n)
        self.cot = randn(n)
        self.n = n

    def fun(self, w, theta):
        return 0.5 * w @ self.A @ w - theta @ w + torch.log(torch.cosh(w)).sum()

    def grad(self, backward, solver=None):
        theta = self.theta.clone().requires_grad_(True)
        w0 = torch.zeros(self.n, dtype=DT, device=theta.device)
        w = il.argmin(self.fun, w0, theta, solver=solver, backward=backward)
        (g,) = torch.autograd.grad(w, theta, self.cot)
        return g


def neumann(k, eta):
    # rtol=0: exactly k terms, as Truncated(k) takes exactly k steps (never "converged").
    return il.backward.Implicit(il.linear.Neumann(max_steps=k, alpha=eta, rtol=0.0,
                                                  on_failure="ignore"))


@pytest.mark.parametrize("problem_type", [FixedPoint, Quadratic])
def test_truncated_equals_neumann_and_approaches_implicit(problem_type, device):
    problem = problem_type(device)
    eta = 0.7 if problem_type is FixedPoint else 0.2
    exact = problem.grad(il.linear.Dense())
    errors = []
    for k in (1, 3, 10, 30, 100):
        truncated = problem.grad(il.backward.Truncated(k, step_size=eta))
        # K differentiated steps z ← z - η F(z) from z* are a K-term Neumann series.
        assert rel(truncated, problem.grad(neumann(k, eta))) < 1e-10
        errors.append(rel(truncated, exact))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-2  # k = 1 is genuinely biased ...
    assert errors[-1] < 1e-8  # ... and k = 100 has converged.


def test_truncated_default_step_size_uses_gradient_descent_step(device):
    problem = Quadratic(device)
    solver = il.solvers.GradientDescent(0.2)
    got = problem.grad(il.backward.Truncated(5), solver=solver)
    assert rel(got, problem.grad(neumann(5, 0.2))) < 1e-10


def test_truncated_argmin_without_step_size_is_explained(device):
    problem = Quadratic(device)
    with pytest.raises(ValueError, match="step_size"):
        problem.grad(il.backward.Truncated(5), solver=il.solvers.LBFGS())


def test_jacobian_free_is_df_dtheta_transpose_g(device):
    problem = FixedPoint(device)
    g, info = problem.grad(il.backward.JacobianFree(), return_info=True)
    # By hand: z* from plain iteration, then (∂f/∂x)ᵀ g = diag(1 - tanh²(W z* + x)) g.
    z = torch.zeros(problem.n, dtype=DT, device=device)
    for _ in range(200):
        z = problem.f(z, problem.x)
    by_hand = (1 - torch.tanh(problem.W @ z + problem.x) ** 2) * problem.cot
    assert rel(g, by_hand) < 1e-9
    assert info.backward is None  # no linear system was solved


def test_phantom_approaches_implicit_with_more_steps(device):
    problem = FixedPoint(device)
    exact = problem.grad(il.linear.Dense())
    errors = [rel(problem.grad(il.backward.Phantom(k, damping=0.5)), exact) for k in (1, 5, 20, 60)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6


def test_unrolled_gradient_descent_learnable_step_size(device):
    """d(outer)/d(step size) through 30 unrolled steps vs central differences."""
    problem = Quadratic(device)
    steps = 30

    def outer(eta):
        solver = il.solvers.GradientDescent(eta, max_steps=steps, rtol=0.0, on_failure="ignore")
        w0 = torch.zeros(problem.n, dtype=DT, device=device)
        w = il.argmin(problem.fun, w0, problem.theta, solver=solver,
                      backward=il.backward.Unrolled())
        return (problem.cot * w).sum() + (w**2).sum()

    eta = torch.tensor(0.1, dtype=DT, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(outer(eta), eta)
    h = 1e-6
    with torch.no_grad():
        fd = (outer(torch.tensor(0.1 + h, dtype=DT, device=device))
              - outer(torch.tensor(0.1 - h, dtype=DT, device=device))) / (2 * h)
    assert abs(float(g) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))
    assert abs(float(g)) > 1e-3  # the step size matters after 30 unconverged steps


def test_unrolled_picard_matches_implicit(device):
    problem = FixedPoint(device)
    solver = il.solvers.Picard(max_steps=500)
    assert rel(problem.grad(il.backward.Unrolled(), solver=solver),
               problem.grad(il.linear.Dense())) < 1e-8


def test_implicit_fallback_replaces_failed_samples_only(device):
    """Batched DEQ with one hard sample: a GMRES capped below what the hard sample needs fails
    for it alone; that sample gets the Phantom gradient, the others the implicit one."""
    B, n = 4, 12
    randn = randn_factory(5, device)
    W = randn(B, n, n)
    W = W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    W = W * torch.tensor([0.98, 0.05, 0.05, 0.05], dtype=DT, device=device)[:, None, None]
    x0, cot = randn(B, n), randn(B, n)

    def f(z, x):
        return torch.tanh((W @ z.unsqueeze(-1)).squeeze(-1) + x)

    def grad(backward):
        x = x0.clone().requires_grad_(True)
        z0 = torch.zeros(B, n, dtype=DT, device=device)
        z, info = il.fixed_point(f, z0, x, backward=backward, batched=True, return_info=True)
        (g,) = torch.autograd.grad(z, x, cot)
        return g, info

    exact, info = grad(il.linear.GMRES())
    needed = info.backward.steps
    cap = int(needed[1:].max())
    assert int(needed[0]) > cap  # the hard sample needs more GMRES steps than the easy ones
    phantom = il.backward.Phantom(8, damping=0.5)
    reference_phantom, _ = grad(phantom)
    capped = il.backward.Implicit(il.linear.GMRES(max_steps=cap), fallback=phantom)
    with pytest.warns(il.ConvergenceWarning,
                      match=r"GMRES.*1 of 4.*residual .* > tolerance .*Phantom.*max_steps"):
        got, info = grad(capped)
    assert info.backward.converged.tolist() == [False, True, True, True]
    assert rel(got[0], reference_phantom[0]) < 1e-10
    assert rel(got[1:], exact[1:]) < 1e-8
    assert rel(got[0], exact[0]) > 1e-3  # the fallback really is a different gradient


def test_implicit_fallback_on_diverging_backward(device):
    """A non-contractive fixed point (forward solved by Anderson) makes the Neumann series
    diverge; with a fallback the gradient is the fallback's, finite, with a warning."""
    x0 = torch.linspace(-1.0, 1.0, 3, dtype=DT, device=device)

    def f(z, x):
        return -3.0 * z + x  # |∂f/∂z| = 3: Neumann on (I - J)ᵀ diverges

    def grad(backward):
        x = x0.clone().requires_grad_(True)
        z = il.fixed_point(f, torch.zeros_like(x0), x, backward=backward)
        return torch.autograd.grad(z.sum(), x)[0]

    fallback = il.backward.JacobianFree(step_size=0.25)
    mode = il.backward.Implicit(il.linear.Neumann(max_steps=2000, alpha=1.0), fallback=fallback)
    with pytest.warns(il.ConvergenceWarning, match="Neumann.*NaN or Inf.*JacobianFree"):
        got = grad(mode)
    assert bool(torch.isfinite(got).all())
    assert rel(got, grad(fallback)) < 1e-10


def test_implicit_fallback_does_not_hide_a_nan_cotangent(device):
    """A fallback replaces a failed solve, never a NaN: the NaN cotangent still raises."""
    problem = FixedPoint(device)
    x = problem.x.clone().requires_grad_(True)
    mode = il.backward.Implicit(il.linear.GMRES(), fallback=il.backward.JacobianFree())
    z = il.fixed_point(problem.f, torch.zeros_like(x), x, backward=mode)
    cot = torch.full_like(x, float("nan"))
    with pytest.raises(il.NonFiniteError):
        torch.autograd.grad(z, x, cot)


@pytest.mark.parametrize("per_sample", [False, True])
def test_implicit_fallback_with_tensor_step_size(per_sample, device):
    """Implicit(fallback=Truncated(k)) after GradientDescent with a tensor step size: the
    fallback uses the step's value (no TypeError) and equals Truncated(k) with that float."""
    problem = Quadratic(device)
    B, k = 3, 5
    thetas = torch.stack([problem.theta * s for s in (1.0, 0.5, -1.0)])
    cot = torch.stack([problem.cot] * B)

    def fun(w, theta):  # batched Quadratic: one value per row
        quad = 0.5 * ((w @ problem.A) * w).sum(-1)
        return quad - (theta * w).sum(-1) + torch.log(torch.cosh(w)).sum(-1)

    def grad(backward, step):
        theta = thetas.clone().requires_grad_(True)
        solver = il.solvers.GradientDescent(step, max_steps=2000)
        w = il.argmin(fun, torch.zeros_like(thetas), theta, solver=solver, backward=backward,
                      batched=True)
        return torch.autograd.grad(w, theta, cot)[0]

    eta = 0.2
    step = (torch.full((B,), eta, dtype=DT, device=device) if per_sample
            else torch.tensor(eta, dtype=DT, device=device))
    # CG limited to one step cannot converge: every sample takes the fallback.
    mode = il.backward.Implicit(il.linear.CG(max_steps=1), fallback=il.backward.Truncated(k))
    with pytest.warns(il.ConvergenceWarning, match="Truncated"):
        got = grad(mode, step.requires_grad_(True))
    expected = grad(il.backward.Truncated(k, step_size=eta), eta)
    assert rel(got, expected) < 1e-10
    exact = grad(il.linear.Dense(), eta)
    assert rel(got, exact) > 1e-8  # really the truncated gradient, not the implicit one
