"""The default fixed-point solver, Adaptive, and the backward it picks.

* a well-contracting DEQ stays with plain iteration (one map evaluation per step, as Picard)
  and gets the Neumann backward; the gradient matches a dense solve of the adjoint system;
* a slow contraction, a budget plain iteration cannot meet, or a growing residual switch to
  Anderson (the same solution as a dense solve), and the backward is GMRES;
* the Neumann backward hands the samples it leaves unconverged (or diverges on) to GMRES;
* the unrolled backward differentiates through both phases.
"""

import pytest
import torch

import implicit_layers as il
from implicit_layers.linear._operator import FunctionOperator
from implicit_layers.solvers.adaptive import NeumannThenGMRES

F64 = torch.float64


def _affine(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A symmetric ``(n, n)`` matrix with the given eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(eigs) @ Q.T


def _deq(contraction: float, seed: int = 0, B: int = 4, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=F64)
    W = (contraction * W / torch.linalg.matrix_norm(W, 2)).requires_grad_(True)
    x = torch.randn(B, n, generator=g, dtype=F64, requires_grad=True)
    return W, x


def _dense_gradients(W: torch.Tensor, x: torch.Tensor, z: torch.Tensor):
    """``d Σ z*² / d(W, x)`` by the implicit function theorem with dense per-sample solves."""
    z = z.detach()
    D = 1 - z**2
    n = z.shape[1]
    A = torch.eye(n, dtype=F64) - D[:, :, None] * W.detach()[None]  # I - J per sample
    u = torch.linalg.solve(A.mT, (2 * z).unsqueeze(-1)).squeeze(-1)
    fz = torch.tanh(z @ W.T + x)
    return torch.autograd.grad((fz * u).sum(), (W, x))


def test_contractive_deq_stays_plain_and_uses_neumann():
    W, x = _deq(0.6)
    z, info = il.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x,
                             batched=True, return_info=True)
    (z**2).sum().backward()
    assert info.solver == "Adaptive (Picard)"
    assert bool(info.converged.all())
    assert float(info.contraction.max()) < 0.6
    assert info.backward.solver == "Neumann"
    assert bool(info.backward.converged.all())
    # Plain iteration: exactly Picard's steps.
    _, pinfo = il.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x,
                              solver=il.solvers.Picard(), batched=True, return_info=True)
    assert info.steps.tolist() == pinfo.steps.tolist()
    dW, dx = _dense_gradients(W, x, z)
    torch.testing.assert_close(W.grad, dW, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-8, atol=1e-12)


def test_slow_contraction_switches_to_anderson_and_gmres():
    # z = A z + b with eigenvalues in [0.5, 0.995]: plain iteration needs ~3500 steps,
    # Anderson alone ~180.
    n = 30
    A = _affine(n, torch.linspace(0.5, 0.995, n, dtype=F64)).requires_grad_(True)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    z, info = il.fixed_point(lambda z: A @ z + b, torch.zeros(n, dtype=F64), return_info=True)
    z.sum().backward()
    assert info.solver == "Adaptive (Picard, then Anderson)"
    assert bool(info.converged)
    assert int(info.steps) < 300
    assert float(info.contraction) > 0.95
    assert info.backward.solver == "GMRES"
    I = torch.eye(n, dtype=F64)
    z_ref = torch.linalg.solve(I - A.detach(), b)
    # condition number 200: a residual of 1e-10 leaves ~2e-8 in the solution
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=0)
    # d Σz / dA = u z*ᵀ with (I - A)ᵀ u = 1
    u = torch.linalg.solve((I - A.detach()).T, torch.ones(n, dtype=F64))
    torch.testing.assert_close(A.grad, torch.outer(u, z_ref), rtol=1e-6, atol=1e-10)


def test_budget_plain_iteration_cannot_meet_switches():
    # Contraction 0.8: plain iteration needs ~110 steps for 1e-10, more than max_steps = 60.
    n = 20
    A = _affine(n, torch.linspace(0.2, 0.8, n, dtype=F64))
    b = torch.ones(n, dtype=F64)
    z, info = il.fixed_point(lambda z: A @ z + b, torch.zeros(n, dtype=F64),
                             solver=il.solvers.Adaptive(max_steps=60), return_info=True)
    assert info.solver == "Adaptive (Picard, then Anderson)"
    assert bool(info.converged)
    torch.testing.assert_close(z, torch.linalg.solve(torch.eye(n, dtype=F64) - A, b),
                               rtol=1e-8, atol=0)
    # With the budget to spare it stays plain.
    _, info = il.fixed_point(lambda z: A @ z + b, torch.zeros(n, dtype=F64), return_info=True)
    assert info.solver == "Adaptive (Picard)"


def test_growing_residual_switches_at_once_and_failure_is_loud():
    # Expansive in one sample: plain iteration diverges, Anderson finds the repelling point.
    scale = torch.tensor([[0.5], [2.0]], dtype=F64)
    z, info = il.fixed_point(lambda z: scale * z + 1, torch.zeros(2, 3, dtype=F64),
                             batched=True, return_info=True)
    assert info.solver == "Adaptive (Picard, then Anderson)"
    assert info.converged.tolist() == [True, True]
    torch.testing.assert_close(z, torch.tensor([[2.0] * 3, [-1.0] * 3], dtype=F64))
    # No fixed point at all: a warning naming the solver, never "converged".
    with pytest.warns(il.ConvergenceWarning, match="Adaptive"):
        _, info = il.fixed_point(lambda z: z + 1, torch.zeros(3, dtype=F64),
                                 solver=il.solvers.Adaptive(max_steps=50), return_info=True)
    assert not bool(info.converged)


def test_root_problem():
    # F(z) = z - 0.5 cos z: plain Richardson steps contract; the solution satisfies F = 0.
    z, info = il.root(lambda z: z - 0.5 * torch.cos(z), torch.zeros(4, dtype=F64),
                      solver=il.solvers.Adaptive(), return_info=True)
    assert bool(info.converged)
    torch.testing.assert_close(z - 0.5 * torch.cos(z), torch.zeros(4, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("contraction", [0.5, 0.999])
def test_unrolled_backward_through_both_phases(contraction):
    n = 8
    A = _affine(n, torch.linspace(0.1, contraction, n, dtype=F64))
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    z = il.fixed_point(lambda z, b: A @ z + b, torch.zeros(n, dtype=F64), b,
                       backward=il.backward.Unrolled())
    (g,) = torch.autograd.grad(z.sum(), b)
    expected = torch.linalg.solve((torch.eye(n, dtype=F64) - A).T, torch.ones(n, dtype=F64))
    # The derivative of the iterations approaches the implicit one as they converge; slower
    # after Anderson's weights (which depend on the iterates) enter it.
    torch.testing.assert_close(g, expected, rtol=1e-6 if contraction < 0.9 else 1e-3, atol=0)


def _op(M: torch.Tensor) -> FunctionOperator:
    B, n, _ = M.shape
    return FunctionOperator(lambda v: torch.bmm(M, v.unsqueeze(-1)).squeeze(-1), B, n, F64,
                            torch.device("cpu"), symmetric=False)


def test_neumann_then_gmres_finishes_what_the_series_leaves():
    # Sample 0 contracts well (‖I - A‖ = 0.3), sample 1 slowly (0.97), sample 2 not at all
    # (an eigenvalue of I - A at -1.5: the series diverges there).
    n = 10
    eigs = [torch.linspace(0.7, 1.3, n), torch.linspace(0.03, 1.0, n), torch.linspace(0.5, 2.5, n)]
    M = torch.stack([_affine(n, e.to(F64), seed=i) for i, e in enumerate(eigs)])
    b = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(3))
    x, info = NeumannThenGMRES(40, rtol=1e-10).solve(_op(M), b)
    ref = torch.linalg.solve(M, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-12)
    assert info.solver == "Neumann+GMRES"
    assert bool(info.converged.all())
    assert int(info.steps[0]) < 40  # the series alone
    assert int(info.steps[1]) > 40  # the series' budget, then GMRES
    # The series alone, when it suffices.
    x, info = NeumannThenGMRES(200, rtol=1e-10).solve(_op(M[:1]), b[:1])
    assert info.solver == "Neumann"
    torch.testing.assert_close(x, ref[:1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"switch_ratio": 0.0}, ValueError, "switch_ratio must lie in"),
    ({"switch_ratio": 1.5}, ValueError, "switch_ratio must lie in"),
    ({"switch_ratio": "high"}, TypeError, "switch_ratio must be a float"),
    ({"memory": 0}, ValueError, "memory must be >= 1"),
    ({"window": 1.5}, TypeError, "window must be an int"),
])
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        il.solvers.Adaptive(**kwargs)


def test_argmin_is_refused():
    with pytest.raises(ValueError, match="solver Adaptive does not solve argmin"):
        il.argmin(lambda w: (w**2).sum(), torch.ones(2, dtype=F64), solver=il.solvers.Adaptive())


@pytest.mark.parametrize("kind", ["fixed_point", "root"])
@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_plain_phase_is_picard_for_every_check_interval(kind, check_every):
    # Samples of different contraction converge at different steps: the windowed bookkeeping
    # must give each its own step count and iterate, as Picard does.
    W, x = _deq(0.6, B=5)
    W = W.detach()
    scale = torch.linspace(0.3, 1.0, 5, dtype=F64)[:, None]

    def f(z):
        return scale * torch.tanh(z @ W.T + x.detach())

    def solve(solver):
        z0 = torch.zeros(5, 12, dtype=F64)
        if kind == "fixed_point":
            return il.fixed_point(f, z0, solver=solver, batched=True, return_info=True)
        return il.root(lambda z: z - f(z), z0, solver=solver, batched=True, return_info=True)

    z, info = solve(il.solvers.Adaptive(check_every=check_every))
    zp, pinfo = solve(il.solvers.Picard(check_every=check_every))
    assert info.solver == "Adaptive (Picard)"
    assert len(set(pinfo.steps.tolist())) > 1
    assert info.steps.tolist() == pinfo.steps.tolist()
    torch.testing.assert_close(z, zp, rtol=0, atol=0)
    # the contraction estimate: (final residual / initial residual)^(1 / steps), per sample
    res0 = torch.linalg.vector_norm(f(torch.zeros(5, 12, dtype=F64)), dim=-1)
    expected = (pinfo.residual / res0) ** (1 / pinfo.steps.to(F64))
    torch.testing.assert_close(info.contraction, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("check_every", [1, 8])
def test_anderson_phase_is_anderson_from_the_switch(check_every):
    # A tiny switch_ratio switches at the first look at the contraction (after `window` plain
    # steps, at a check); from there on the iterates are Anderson's from the switch point.
    n, B = 16, 3
    eigs = torch.linspace(-0.5, 0.99, n, dtype=F64)
    A = _affine(n, eigs)
    b = 5 + torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=F64)

    def f(z):
        return z @ A + b

    z0 = torch.zeros(B, n, dtype=F64)
    adaptive = il.solvers.Adaptive(1e-6, window=4, check_every=check_every)
    z, info = il.fixed_point(f, z0, solver=adaptive, batched=True, return_info=True)
    assert info.solver == "Adaptive (Picard, then Anderson)"
    plain_steps = 4 if check_every == 1 else 8  # the first check after `window` steps
    zk = il.fixed_point(f, z0, solver=il.solvers.Picard(max_steps=plain_steps,
                                                         check_every=check_every,
                                                         on_failure="ignore"), batched=True)
    za, ainfo = il.fixed_point(f, zk, solver=il.solvers.Anderson(5, check_every=check_every),
                               batched=True, return_info=True)
    assert (info.steps - plain_steps).tolist() == ainfo.steps.tolist()
    # Equal up to rounding: Anderson's ring buffer holds the history in another order, and
    # near convergence the mixing solve amplifies that rounding (both meet rtol = 1e-10).
    torch.testing.assert_close(z, za, rtol=1e-9, atol=0)
    dense = torch.linalg.solve(torch.eye(n, dtype=F64) - A.T, b.T).T
    # residual 1e-10 relative, times the condition number 1 / (1 - 0.99) of I - A
    err = torch.linalg.vector_norm(z - dense, dim=-1) / torch.linalg.vector_norm(dense, dim=-1)
    assert float(err.max()) < 1e-7
