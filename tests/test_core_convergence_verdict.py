"""The forward solvers' convergence verdict and the robustness of the default solvers.

* a diverging map is never reported converged (the residual and the tolerance of the verdict
  come from the same iterate);
* fixed points at 0 converge with the default Anderson (the tolerance has an absolute floor
  at the scale of the map's first output);
* the default root solver (Broyden) solves ``F(y) = 0`` and ``-F(y) = 0`` alike, here for a
  100-dimensional nonlinear heat-equation residual with ``∂F/∂y ≈ -I``.
"""

import warnings

import pytest
import torch

import implicit_layers as il

F64 = torch.float64


def _true_residual(f, z, *args):
    return torch.linalg.vector_norm(z - f(z, *args), dim=-1)


def test_diverging_affine_map_is_not_reported_converged():
    # z = 2 z + 1 has its fixed point at -1, but Picard from 0 diverges (2^500 in float64,
    # still finite). The lowest-residual iterate is z0 with residual sqrt(3).
    f = lambda z: 2 * z + 1  # noqa: E731
    z0 = torch.zeros(3, dtype=F64)
    with pytest.warns(il.ConvergenceWarning, match=r"Picard.*1 of 1.*residual 1\.732e\+00"):
        z, info = il.fixed_point(f, z0, solver=il.solvers.Picard(), return_info=True)
    assert not bool(info.converged)
    true = float(torch.linalg.vector_norm(z - f(z)))
    assert true == pytest.approx(3**0.5)
    # The reported tolerance belongs to the returned iterate, not to the last (diverged) one.
    assert float(info.residual) == pytest.approx(true)
    assert float(info.tolerance) < 1e-6
    with pytest.raises(il.ConvergenceError):
        il.fixed_point(f, z0, solver=il.solvers.Picard(max_steps=50, on_failure="raise"))


def test_float32_relu_deq_with_expansive_weight_is_not_reported_converged():
    # A float32 ReLU cell with W ≈ 1.5 I: the iterates grow as 1.5^k without overflowing in 50
    # steps; the old verdict compared the residual of z0 with a tolerance of ~1e5.
    g = torch.Generator().manual_seed(0)
    n = 64
    W = 1.5 * torch.eye(n) + 0.01 * torch.randn(n, n, generator=g)
    U = torch.randn(n, 16, generator=g) / 4
    b = torch.rand(n, generator=g)
    x = torch.randn(8, 16, generator=g)

    def f(z, x):
        return torch.relu(z @ W.T + x @ U.T + b)

    with pytest.warns(il.ConvergenceWarning, match="Picard.*8 of 8"):
        z, info = il.fixed_point(
            f, torch.zeros(8, n), x, solver=il.solvers.Picard(max_steps=50), batched=True,
            return_info=True,
        )
    true = _true_residual(f, z, x)
    assert float(true.min()) > 1.0
    assert not bool(info.converged.any())
    # Whatever the verdict, it must agree with an independent check of the returned iterate.
    assert torch.equal(info.converged, true <= info.tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["linear", "sine"])
def test_default_anderson_converges_to_a_fixed_point_at_zero(case, dtype):
    theta = torch.tensor(0.5, dtype=dtype)
    f = (lambda z: theta * z) if case == "linear" else (lambda z: 0.5 * torch.sin(z))
    z0 = torch.ones(3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning either
        z, info = il.fixed_point(f, z0, return_info=True)
    assert bool(info.converged)
    rtol = 1e-10 if dtype == F64 else 1e-5
    # The exact fixed point is 0; the test is absolute at the scale ‖f(z0)‖ of the map.
    scale = float(torch.linalg.vector_norm(f(z0)))
    assert float(torch.linalg.vector_norm(z)) <= 2 * rtol * scale
    assert float(info.tolerance) == pytest.approx(rtol * scale, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anderson_mixing_does_not_underflow_near_zero(dtype):
    # rtol = 0 asks for an exact zero: the iterates shrink through the subnormals. The mixing
    # weights used to come from a Gram matrix that underflowed to 0 and gave NaN.
    theta = torch.tensor(0.5, dtype=dtype)
    solver = il.solvers.Anderson(rtol=0.0, max_steps=80, on_failure="ignore")
    z, info = il.fixed_point(lambda z: theta * z, torch.ones(3, dtype=dtype), solver=solver,
                             return_info=True)
    assert bool(torch.isfinite(z).all())
    assert float(z.abs().max()) < 1e-20


def test_fixed_point_tolerance_is_still_relative_far_from_zero():
    # Far from 0 the floor ‖f(z0)‖ does not loosen the relative test: z* = 1e6.
    z0 = torch.zeros(4, dtype=F64)
    f = lambda z: 0.5 * z + 0.5e6  # noqa: E731
    z, info = il.fixed_point(f, z0, return_info=True)
    assert float((z - 1e6).abs().max()) <= 1e-10 * 1e6 * 4
    assert float(info.tolerance) == pytest.approx(1e-10 * float(torch.linalg.vector_norm(z)))


# -- the heat equation -------------------------------------------------------------------
N = 100
DT = 1e-4


def _heat_problem():
    """One implicit-Euler step of ``u_t = u_xx - u³ + s`` on (0, 1) with zero boundary values,
    written as ``f(y) = y_prev + dt (L y - y³ + s)``: ``F(y) = f(y) - y`` has
    ``∂F/∂y = dt (L - 3 diag(y²)) - I``, about ``-I`` plus a stiff part (dt ‖L‖ ≈ 4)."""
    h = 1.0 / (N + 1)
    x = torch.linspace(h, 1 - h, N, dtype=F64)
    y_prev = torch.sin(torch.pi * x) + 0.5 * torch.sin(3 * torch.pi * x)
    source = 10 * torch.exp(-50 * (x - 0.3) ** 2)

    def f(y, s):
        padded = torch.nn.functional.pad(y, (1, 1))
        lap = (padded[..., 2:] - 2 * y + padded[..., :-2]) / h**2
        return y_prev + DT * (lap - y**3 + s)

    return f, source


def _newton_reference(F, y, *args):
    for _ in range(50):
        J = torch.func.jacrev(F)(y, *args)
        step = torch.linalg.solve(J, F(y, *args))
        y = y - step
        if float(step.norm()) <= 1e-14 * float(y.norm()):
            break
    return y


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["f(y)-y", "y-f(y)"])
def test_default_root_solves_heat_residual_in_either_sign(sign):
    f, source = _heat_problem()

    def F(y, s):
        return sign * (f(y, s) - y)

    ref = _newton_reference(F, torch.zeros(N, dtype=F64), source)
    assert float(F(ref, source).norm()) < 1e-9
    s = source.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, info = il.root(F, torch.zeros(N, dtype=F64), s, return_info=True)
    assert bool(info.converged)
    assert float((y.detach() - ref).norm() / ref.norm()) < 1e-8
    # The implicit gradient through the default root matches the dense IFT gradient.
    weights = torch.linspace(0, 1, N, dtype=F64)
    (grad,) = torch.autograd.grad((weights * y).sum(), s)
    J_y = torch.func.jacrev(F, argnums=0)(ref, source)
    J_s = torch.func.jacrev(F, argnums=1)(ref, source)
    expected = -J_s.T @ torch.linalg.solve(J_y.T, weights)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-10)


def test_broyden_heat_residual_batched_mixed_signs():
    # Per-sample globalisation: one batch holds F and -F problems; each is solved.
    f, source = _heat_problem()
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=F64).unsqueeze(-1)

    def F(y, s):
        return signs * (f(y, s) - y)

    y, info = il.root(F, torch.zeros(3, N, dtype=F64), source, batched=True, return_info=True)
    assert bool(info.converged.all())
    ref = _newton_reference(lambda y, s: f(y, s) - y, torch.zeros(N, dtype=F64), source)
    for k in range(3):
        assert float((y[k] - ref).norm() / ref.norm()) < 1e-8


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["f(z)-z", "z-f(z)"])
def test_unrolled_broyden_equals_implicit_in_either_sign(sign):
    # The globalised iteration (rejected trials, history kept in lists) stays differentiable:
    # autograd through every step gives the implicit gradient at convergence.
    g = torch.Generator().manual_seed(0)
    A = 0.3 * torch.randn(6, 6, generator=g, dtype=F64)
    c = torch.randn(6, generator=g, dtype=F64, requires_grad=True)

    def F(z, c):
        return sign * (torch.tanh(A @ z + c) - z)

    solver = il.solvers.Broyden(rtol=1e-13)
    z_imp = il.root(F, torch.zeros(6, dtype=F64), c, solver=solver)
    z_unr = il.root(F, torch.zeros(6, dtype=F64), c, solver=solver, backward=il.backward.Unrolled())
    (g_imp,) = torch.autograd.grad(z_imp.sum(), c)
    (g_unr,) = torch.autograd.grad(z_unr.sum(), c)
    torch.testing.assert_close(g_unr, g_imp, rtol=1e-9, atol=0)
