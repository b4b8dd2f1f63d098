"""Batching: every sample of a batch is an independent problem with its own step count,
tolerance and convergence, in forward and backward; one hard sample does not change the easy
samples' answers; ``SolveInfo`` fields have shape ``(B,)`` batched and ``()`` unbatched."""

import pytest
import torch

import implicit_layers as il

DT = torch.float64
B, N = 4, 12


def randn_factory(seed, device):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    return randn


def close(a, b, tol=1e-12):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def deq_batch(device):
    """Per-sample ``W_i`` with ``‖W_0‖ = 0.97`` (hard) and ``‖W_i‖ <= 0.3`` (easy)."""
    randn = randn_factory(0, device)
    W = randn(B, N, N)
    W = W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    W = W * torch.tensor([0.97, 0.3, 0.2, 0.1], dtype=DT, device=device)[:, None, None]
    return W, randn(B, N), randn(B, N)


def deq_f(z, x, W):
    return torch.tanh((W @ z.unsqueeze(-1)).squeeze(-1) + x)


def quad_batch(device, n=20):
    """Per-sample quadratics ``0.5 wᵀA_i w - θ_iᵀw + Σ log cosh w``, sample 0 ill-conditioned.

    ``n = 20`` so that Krylov solvers on the easy samples stop well before ``n`` steps."""
    randn = randn_factory(1, device)
    Q, _ = torch.linalg.qr(randn(B, n, n))
    conds = torch.tensor([15.0, 1.2, 2.0, 1.5], dtype=DT, device=device)
    eig = torch.stack([torch.logspace(0, float(c.log10()), n, dtype=DT, device=device)
                       for c in conds])
    A = (Q * eig.unsqueeze(1)) @ Q.mT
    return A, randn(B, n), randn(B, n)


def quad_fun(w, theta, A):
    return (0.5 * (w.unsqueeze(1) @ A @ w.unsqueeze(-1)).reshape(-1) - (theta * w).sum(-1)
            + torch.log(torch.cosh(w)).sum(-1))


def solve_deq(W, x0, cot, idx, solver, linear):
    x = x0[idx].clone().requires_grad_(True)
    z0 = torch.zeros_like(x)
    z, info = il.fixed_point(deq_f, z0, x, W[idx], solver=solver, backward=linear,
                             batched=True, return_info=True)
    assert info.backward is None  # nothing solved backward yet
    (g,) = torch.autograd.grad(z, x, cot[idx])
    return z.detach(), g, info


def solve_quad(A, theta0, cot, idx, solver, linear):
    theta = theta0[idx].clone().requires_grad_(True)
    w0 = torch.zeros_like(theta)
    w, info = il.argmin(quad_fun, w0, theta, A[idx], solver=solver, backward=linear,
                        batched=True, return_info=True)
    assert info.backward is None
    (g,) = torch.autograd.grad(w, theta, cot[idx])
    return w.detach(), g, info


CASES = [
    ("fixed_point", lambda: il.solvers.Picard(max_steps=2000), lambda: il.linear.GMRES()),
    ("fixed_point", lambda: il.solvers.Anderson(), lambda: il.linear.Broyden()),
    ("fixed_point", lambda: il.solvers.Broyden(), lambda: il.linear.Neumann(max_steps=2000)),
    ("argmin", lambda: il.solvers.LBFGS(), lambda: il.linear.CG()),
    ("argmin", lambda: il.solvers.LBFGS(), lambda: il.linear.MINRES()),
    # Newton's step count barely depends on conditioning; its backward's does.
    ("argmin", lambda: il.solvers.Newton(), lambda: il.linear.BiCGStab()),
    # Default GradientDescent step and Neumann step are power-iteration estimates per sample.
    ("argmin", lambda: il.solvers.GradientDescent(max_steps=20000),
     lambda: il.linear.Neumann(max_steps=20000)),
]


@pytest.mark.parametrize(
    "kind, make_solver, make_linear", CASES,
    ids=[f"{k}-{s().name}-{lin().name}" for k, s, lin in CASES],
)
def test_hard_sample_does_not_hold_back_easy_ones(kind, make_solver, make_linear, device):
    if kind == "fixed_point":
        data, solve = deq_batch(device), solve_deq
    else:
        data, solve = quad_batch(device), solve_quad
    every = torch.arange(B, device=device)
    z, g, info = solve(*data, every, make_solver(), make_linear())

    for field in (info.converged, info.steps, info.residual, info.tolerance):
        assert field.shape == (B,)
    for field in (info.backward.converged, info.backward.steps, info.backward.residual):
        assert field.shape == (B,)
    assert info.all_converged and info.backward.all_converged
    # Per-sample step counts: the hard sample needs strictly more, forward and backward
    # (the Krylov solvers may tie on the easy ones, the hard one may not).
    fwd, bwd = info.steps, info.backward.steps
    if info.solver != "Newton":
        assert int(fwd[0]) > int(fwd[1:].max()), fwd.tolist()
    assert int(bwd[0]) > int(bwd[1:].max()), bwd.tolist()

    for i in range(1, B):
        zi, gi, info_i = solve(*data, every[i : i + 1], make_solver(), make_linear())
        # Solved alone, an easy sample takes the same steps and lands on the same answer.
        if info.solver == "Newton":
            # Newton's inner CG uses one forcing tolerance for the whole batch (the smallest),
            # so alone an easy sample takes a slightly different path to its tolerance.
            assert close(zi[0], z[i], 1e-9) and close(gi[0], g[i], 1e-9)
            continue
        assert int(info_i.steps[0]) == int(fwd[i])
        assert int(info_i.backward.steps[0]) == int(bwd[i])
        assert close(zi[0], z[i]) and close(gi[0], g[i])


def test_unbatched_info_fields_are_scalars(device):
    W, x0, cot = deq_batch(device)
    x = x0[1].clone().requires_grad_(True)
    z, info = il.fixed_point(deq_f, torch.zeros(N, dtype=DT, device=device), x, W[1],
                             return_info=True)
    assert info.backward is None
    for field in (info.converged, info.steps, info.residual, info.tolerance):
        assert field.shape == ()
    assert info.converged.dtype == torch.bool
    assert float(info.residual) <= float(info.tolerance)
    z.backward(cot[1])
    assert info.backward is not None
    for field in (info.backward.converged, info.backward.steps, info.backward.residual):
        assert field.shape == ()
    assert bool(info.backward.converged)
    # the default forward observed a good contraction and picked the Neumann series
    assert info.backward.solver == "Neumann"
    assert info.contraction.shape == ()


def test_batched_argmin_objective_of_shape_b1_is_accepted(device):
    A, theta, _ = quad_batch(device)
    w = il.argmin(lambda w, t, A: quad_fun(w, t, A).unsqueeze(-1), torch.zeros_like(theta),
                  theta, A, batched=True)
    w_ref = il.argmin(quad_fun, torch.zeros_like(theta), theta, A, batched=True)
    assert close(w, w_ref, 1e-10)


def test_batched_solution_satisfies_each_samples_equation(device):
    """Residuals recomputed independently of the solver's own bookkeeping."""
    W, x, _ = deq_batch(device)
    z, info = il.fixed_point(deq_f, torch.zeros_like(x), x, W, batched=True, return_info=True)
    residual = torch.linalg.vector_norm(z - deq_f(z, x, W), dim=-1)
    assert bool((residual <= 1.01 * info.tolerance).all())
    assert torch.allclose(residual, info.residual, rtol=1e-6, atol=1e-15)


def test_solvers_leave_the_global_rng_alone(device):
    """Power-iteration estimates (GradientDescent's default step, Neumann's default alpha) use
    their own generator: solving and differentiating does not shift the user's random stream."""
    A, theta0, cot = quad_batch(device)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    easy = torch.arange(1, B, device=device)
    solve_quad(A, theta0, cot, easy, il.solvers.GradientDescent(), il.linear.Neumann())
    assert torch.equal(state, torch.get_rng_state())
