"""One loop per solver: its variants (recorded by autograd, in place, and the two forward
monitors) take the same steps and agree with independent references."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from implicit_layers.solvers.base import Monitor, Problem, WindowMonitor

B, N = 4, 10


def _systems():
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(B, N, N, generator=gen, dtype=torch.float64)
    spd = M @ M.mT / N + 0.5 * torch.eye(N, dtype=torch.float64)
    contraction = torch.eye(N, dtype=torch.float64) - 0.4 * M / N**0.5
    # sample 0 converges in a few steps: the others step on while it is masked
    u = M[0, :, :1]
    spd[0] = torch.eye(N, dtype=torch.float64) + u @ u.mT
    contraction[0] = torch.eye(N, dtype=torch.float64) - 0.02 * M[0] / N**0.5
    b = torch.randn(B, N, generator=gen, dtype=torch.float64)
    return spd, contraction, b


CASES = {
    "CG": (0, lambda: il.linear.CG(rtol=1e-11)),
    "Neumann": (1, lambda: il.linear.Neumann(400, alpha=1.0, rtol=1e-11)),
    "GMRES": (1, lambda: il.linear.GMRES(4, rtol=1e-11)),
}


def _solve(name, mode):
    which, make = CASES[name]
    A = _systems()[which]
    b = _systems()[2].clone().requires_grad_(mode == "recorded")
    op = il.linear.MatrixOperator(A, batch=B)
    with torch.set_grad_enabled(mode != "in place"):
        x, info = make().solve(op, b, None)
    return A, b, x, info


@pytest.mark.parametrize("name", list(CASES))
def test_recorded_and_in_place_variants_take_the_same_steps(name):
    modes = ["in place", "grad mode", "recorded"]
    runs = {m: _solve(name, m) for m in modes}
    A, b, x_ref, info_ref = runs["in place"]
    assert int(info_ref.steps[0]) < int(info_ref.steps[1:].min())
    exact = torch.linalg.solve(A, b.detach())
    for mode, (_, _, x, info) in runs.items():
        assert bool(info.converged.all()), mode
        torch.testing.assert_close(x.detach(), exact, rtol=0, atol=1e-9)
        # every variant stops each sample at the same step
        assert torch.equal(info.steps, info_ref.steps), mode
    if name == "Neumann":  # masks by `where` or by a 0/1 factor: the same arithmetic
        assert torch.equal(runs["recorded"][2].detach(), x_ref)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_through_the_recorded_loop_matches_the_dense_solve(name):
    A, b, x, _ = _solve(name, "recorded")
    g = torch.linspace(-1.0, 1.0, N, dtype=torch.float64).expand(B, N)
    (grad,) = torch.autograd.grad((x * g).sum(), b)
    # d(gᵀ A⁻¹ b)/db = A⁻ᵀ g
    torch.testing.assert_close(grad, torch.linalg.solve(A.mT, g), rtol=0, atol=1e-8)


@pytest.mark.parametrize("restart", [20, 3])
def test_gmres_differentiates_through_its_iterations_in_the_matrix_too(restart):
    # il.linear.solve's default solver for a general matrix: a backward through the recorded
    # cycles (restarted or not) reaches A and b, as the dense solve's does
    gen = torch.Generator().manual_seed(7)
    A = (3 * torch.eye(6, dtype=torch.float64)
         + 0.5 * torch.randn(6, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(B, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x, info = il.linear.solve(A, b, il.linear.GMRES(restart, rtol=1e-13, max_steps=200))
    assert bool(info.converged.all())
    g = torch.randn(B, 6, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(x, (A, b), g)
    ref = torch.autograd.grad(torch.linalg.solve(A, b.mT).mT, (A, b), g)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def _picard_iterates(steps):
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(N, N, generator=gen, dtype=torch.float64)
    # per-sample contraction factors: the samples converge at different steps
    scale = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64).view(B, 1, 1)
    Ws = scale * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, N, generator=gen, dtype=torch.float64)

    def f(z):
        return torch.tanh((Ws @ z.unsqueeze(-1)).squeeze(-1) + x)

    zs = [torch.zeros(B, N, dtype=torch.float64)]
    for _ in range(steps):
        zs.append(f(zs[-1]))
    return f, zs


@pytest.mark.parametrize("check_every", [1, 3])
def test_both_forward_monitors_give_the_step_by_step_verdicts(check_every):
    steps = 40
    f, zs = _picard_iterates(steps + 1)
    z0 = zs[0]
    problem = Problem("fixed_point", f, (), z0, batched=True, name="f")
    solver = il.solvers.Picard(rtol=1e-6, check_every=check_every, max_steps=steps)
    res = [torch.linalg.vector_norm(z - f(z), dim=-1) for z in zs]
    # Reference, sample by sample: the first iterate whose residual meets
    # max(atol, rtol · max(‖z‖, ‖f(z0)‖)) (atol = 0).
    floor = torch.linalg.vector_norm(f(z0), dim=-1)
    tol = [1e-6 * torch.maximum(torch.linalg.vector_norm(z, dim=-1), floor) for z in zs]
    expected_steps = [next(k for k in range(steps + 1) if res[k][i] <= tol[k][i]) for i in range(B)]
    assert len(set(expected_steps)) > 1  # the samples finish apart

    results = {}
    for cls in (Monitor, WindowMonitor):
        mon = cls(solver, problem, z0, z0 - f(z0))

        def advance(taken, mon=mon):
            z = zs[taken + 1]
            if isinstance(mon, Monitor):
                mon.record(z, z - f(z), mon.active)
            else:
                mon.record(z, z - f(z))
            return 1

        mon.iterate(steps, advance)
        results[cls.__name__] = mon.finish()
    for name, (z, info) in results.items():
        assert info.steps.tolist() == expected_steps, name
        assert bool(info.converged.all()), name
        for i, k in enumerate(expected_steps):
            assert torch.equal(z[i], zs[k][i]), name


# The checks: one sum tells the counts and finiteness; a wrong count or a missed NaN would
# stop a loop early or let a NaN through.

_WATCHES = {
    "finite": [0.5, 2.0, 0.0, 3.0],
    "nan": [0.5, float("nan"), 0.0, 3.0],
    "inf": [0.5, 2.0, float("inf"), 3.0],
}


@pytest.mark.parametrize("watch", list(_WATCHES))
@pytest.mark.parametrize("flags", [[True, False, True, False], [True] * 4, [False] * 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_flags_and_check_active_agree_with_separate_reductions(watch, flags, dtype):
    from implicit_layers.linear._loop import check_active, sync_flags

    w = torch.tensor(_WATCHES[watch], dtype=dtype)
    done = torch.tensor(flags)
    expected = [bool(done.all()), bool(torch.isfinite(w).all()), bool(done.any())]
    # the watch shaped like the flags, and shaped otherwise ((B, 1) columns)
    for watched in (w, w.unsqueeze(-1)):
        got = sync_flags(done, watched)
        assert got[1] == expected[1]
        if expected[1]:
            assert got == expected
    # the float mask of the in-place loops, (B, 1) columns as Neumann keeps them
    active = (~done).to(dtype).unsqueeze(-1)
    if expected[1]:
        assert check_active(active, w.unsqueeze(-1), "Neumann") == (
            not bool(active.any()), not bool(active.all())
        )
    else:
        with pytest.raises(il.NonFiniteError):
            check_active(active, w.unsqueeze(-1), "Neumann")


def test_sync_flags_of_an_empty_batch():
    from implicit_layers.linear._loop import sync_flags

    done = torch.zeros(0, dtype=torch.bool)
    for watch in (torch.empty(0), torch.empty(0, 1)):
        assert sync_flags(done, watch) == [True, True, False]


def test_window_check_reads_huge_finite_norms_as_finite():
    # Norms whose sum overflows float64 are still finite: the exact test decides.
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    problem = Problem("fixed_point", lambda z: z, (), z0, batched=True, name="f")
    mon = WindowMonitor(il.solvers.Picard(), problem, z0, z0)
    met = torch.zeros(3, 1, dtype=torch.bool)
    huge = torch.full((3, 1), 1e308, dtype=torch.float64)
    assert mon._count_flags(met, huge)[1] is True
    assert mon._count_flags(met, torch.tensor([[1.0], [float("nan")], [1.0]]).double())[1] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_info_keeps_the_iterate_dtype(dtype):
    A = 0.5 * torch.eye(3, dtype=dtype)
    c = torch.tensor([[1.0, -2.0, 3.0]], dtype=dtype)
    z, info = il.fixed_point(lambda z: z @ A + c, torch.zeros_like(c), return_info=True,
                             batched=True, solver=il.solvers.Picard(rtol=1e-5))
    assert info.residual.dtype == dtype and info.tolerance.dtype == dtype
    assert bool(info.converged.all())
    torch.testing.assert_close(z, 2 * c, rtol=1e-4, atol=0)
