"""Checks judged on the host give the answers of the device's rules.

The one-step forward check (``check_every=1``), Adaptive's contraction test, Neumann's checks
and the linear checks read their per-sample columns in one synchronisation and form the
tolerances, verdicts and counts on the host. These tests compare them with independent
references: a per-sample loop written here, the window rule (``check_every > 1``, judged on
the device), the device form of the same test, and dense solves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import implicit_layers as il
from implicit_layers.linear._operator import FunctionOperator
from implicit_layers.solvers.adaptive import _contraction_test, _host_contraction_test
from implicit_layers.solvers.base import Problem

F64 = torch.float64


def _mixed_batch(dtype: torch.dtype = F64):
    """``z ← a ⊙ z + c`` per sample: fast, slow and a diverging contraction (its residual
    grows every step, so its best iterate stays the first), and a sample already at its
    fixed point."""
    a = torch.tensor([[0.2], [0.7], [1.3], [0.5]], dtype=dtype)
    c = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0], [1e-3, 0.0, 1e-3], [0.0, 0.0, 0.0]],
                     dtype=dtype)
    return (lambda z: a * z + c), a, c


def _reference(a: torch.Tensor, c: torch.Tensor, rtol: float, max_steps: int):
    """Per sample, in plain Python floats: the iterate the step-by-step rule returns (the
    first that meets its tolerance, else the lowest residual seen), its steps and verdict."""
    out = []
    for ai, ci in zip(a.squeeze(-1).tolist(), c.tolist(), strict=True):
        z = [0.0] * len(ci)

        def f(v, ai=ai, ci=ci):
            return [ai * x + y for x, y in zip(v, ci, strict=True)]

        def norm(v):
            return math.sqrt(sum(x * x for x in v))

        scale0 = norm(f(z))
        best = (z, norm([x - y for x, y in zip(z, f(z), strict=True)]), 0)
        steps, done = 0, False
        zk = z
        for k in range(max_steps + 1):
            res = norm([x - y for x, y in zip(zk, f(zk), strict=True)])
            tol = rtol * max(norm(zk), scale0)
            if res <= tol:
                best, done = (zk, res, k), True
                break
            if res <= best[1]:
                best = (zk, res, k)
            if k < max_steps:
                zk, steps = f(zk), k + 1
        out.append((best[0], done, steps if not done else best[2]))
    return out


@pytest.mark.parametrize("check_every", [1, 3])
def test_forward_checks_match_a_per_sample_loop(check_every):
    f, a, c = _mixed_batch()
    solver = il.solvers.Picard(max_steps=40, rtol=1e-8, check_every=check_every,
                               on_failure="ignore")
    z, info = il.fixed_point(f, torch.zeros_like(c), solver=solver, batched=True,
                             return_info=True)
    for i, (z_ref, done, steps) in enumerate(_reference(a, c, 1e-8, 40)):
        assert bool(info.converged[i]) == done
        assert int(info.steps[i]) == steps
        torch.testing.assert_close(z[i], torch.tensor(z_ref, dtype=F64), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("solver_cls", [il.solvers.Picard, il.solvers.Anderson])
def test_host_checks_equal_the_window_rule_on_the_device(solver_cls, dtype):
    """check_every=1 (judged on the host) and a window of 4 steps (judged on the device by
    the window rule) take the same steps and return the same iterates, norms and
    tolerances. (Adaptive's switch rule looks at the checks, so its steps depend on their
    schedule by design; its host test is compared with the device's below.)"""
    f, _, c = _mixed_batch(dtype)
    results = []
    for check_every in (1, 4):
        solver = solver_cls(max_steps=40, check_every=check_every, on_failure="ignore")
        z, info = il.fixed_point(f, torch.zeros_like(c), solver=solver, batched=True,
                                 return_info=True)
        results.append((z, info))
    (z1, i1), (z4, i4) = results
    assert len(set(i1.steps.tolist())) > 1  # samples done at different checks: masked paths
    assert torch.equal(i1.steps, i4.steps)
    assert torch.equal(i1.converged, i4.converged)
    assert torch.equal(z1, z4)
    assert torch.equal(i1.residual, i4.residual)
    assert torch.equal(i1.tolerance, i4.tolerance)


def test_anderson_residual_in_its_ring_equals_the_copied_one():
    """With a check at least every ``memory`` steps Anderson writes each residual straight
    into its history ring; with checks further apart it copies it there: same results."""
    W = 0.9 * torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4),
                                          dtype=F64))[0]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=F64)

    def f(z):
        return torch.tanh(z @ W.T + x)

    out = []
    # memory 3: in the ring, copied (a check every step also skips the rescaling; here both
    # check less often, so both rescale)
    for check_every in (3, 4):
        solver = il.solvers.Anderson(memory=3, max_steps=60, check_every=check_every)
        out.append(il.fixed_point(f, torch.zeros_like(x), solver=solver, batched=True,
                                  return_info=True))
    (z3, i3), (z4, i4) = out
    assert torch.equal(i3.steps, i4.steps) and i3.converged.all()
    assert torch.equal(z3, z4)
    torch.testing.assert_close(z3, f(z3), rtol=0, atol=1e-9)


def test_host_check_raises_on_a_non_finite_residual():
    def f(z):
        out = 0.5 * z + 1.0
        return torch.where(torch.arange(2).unsqueeze(-1) == 1, out * torch.inf, out)

    with pytest.raises(il.NonFiniteError):
        il.fixed_point(f, torch.zeros(2, 3, dtype=F64), batched=True,
                       solver=il.solvers.Picard(check_every=1))


def test_a_non_finite_residual_after_convergence_is_ignored():
    """A sample done at its start whose later iterates are NaN: the host check tests only
    the norms that count (as the device's masked rule does)."""
    calls = [0]

    def f(z):
        calls[0] += 1
        out = torch.stack([torch.zeros(3, dtype=F64), 0.5 * z[1] + 1.0])
        if calls[0] > 3:
            out[0] = torch.nan
        return out

    z, info = il.fixed_point(f, torch.zeros(2, 3, dtype=F64), batched=True, return_info=True,
                             solver=il.solvers.Picard(check_every=1, max_steps=200))
    assert info.converged.all() and int(info.steps[0]) == 0 and int(info.steps[1]) > 3
    assert torch.isfinite(z).all()


def test_host_contraction_test_equals_the_device_one():
    g = torch.Generator().manual_seed(0)
    B = 6
    res = torch.rand(B, 1, generator=g, dtype=F64) * 1e-3
    res[2] = 0.0  # a zero residual: log(tol / 0) = inf, as on the device
    ref = torch.rand(B, 1, generator=g, dtype=F64).clamp_min(1e-300)
    tol = torch.full((B, 1), 1e-5, dtype=F64)
    done = torch.tensor([[False], [True], [False], [False], [True], [False]])

    class _Mon:  # what the device test reads from the monitor
        last_res, last_tol = res, tol

    _Mon.done = done
    for budget in (False, True):
        device = [float(v) for v in _contraction_test(_Mon, None, None, ref, budget, 7, 1e-300)()]
        host = _host_contraction_test(ref.squeeze(-1).numpy(), budget, 7)(
            res.squeeze(-1).numpy(), tol.squeeze(-1).numpy(), done.squeeze(-1).numpy())
        np.testing.assert_allclose(host, device, rtol=1e-15)


def _op(M: torch.Tensor) -> FunctionOperator:
    B, n, _ = M.shape
    return FunctionOperator(lambda v: torch.bmm(M, v.unsqueeze(-1)).squeeze(-1), B, n, F64,
                            torch.device("cpu"), symmetric=False)


def _contractions(B: int = 3, n: int = 8) -> torch.Tensor:
    """``A = I - K`` with ``‖K‖ = 0.2, 0.5, 0.8``: Neumann converges at three speeds."""
    g = torch.Generator().manual_seed(1)
    K = torch.randn(B, n, n, generator=g, dtype=F64)
    K = K / torch.linalg.matrix_norm(K, 2).view(B, 1, 1)
    return torch.eye(n, dtype=F64) - torch.tensor([0.2, 0.5, 0.8], dtype=F64).view(B, 1, 1) * K


@pytest.mark.parametrize("check_every", [1, 4])
def test_neumann_host_checks_match_a_per_sample_series(check_every):
    M = _contractions()
    b = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        x, info = il.linear.Neumann(200, rtol=1e-10, check_every=check_every).solve(_op(M), b)
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)
    for i in range(3):  # the series x ← x + r, r ← r - A r of each sample alone
        xi, r, steps = torch.zeros(8, dtype=F64), b[i].clone(), 0
        tol = 1e-10 * float(torch.linalg.vector_norm(b[i]))
        while float(torch.linalg.vector_norm(r)) > tol:
            xi, r, steps = xi + r, r - M[i] @ r, steps + 1
        assert int(info.steps[i]) == steps
        assert bool(info.converged[i])
        torch.testing.assert_close(x[i], xi, rtol=1e-14, atol=1e-15)


def test_neumann_host_check_raises_on_nan():
    M = _contractions()
    M[1, 0, 0] = torch.nan
    with torch.no_grad(), pytest.raises(il.NonFiniteError):
        il.linear.Neumann(200, check_every=1).solve(_op(M), torch.ones(3, 8, dtype=F64))


@pytest.mark.parametrize("restart", [3, 20])
def test_gmres_in_place_cycles_match_a_dense_solve_and_the_recorded_cycles(restart):
    """The in-place step works on the whole basis (rows past the step are zeros, zeroed again
    at each restart): with restarts it matches a dense solve and the recorded cycles."""
    g = torch.Generator().manual_seed(3)
    M = torch.eye(10, dtype=F64) + 0.4 * torch.randn(4, 10, 10, generator=g, dtype=F64) / 10**0.5
    b = torch.randn(4, 10, generator=g, dtype=F64)
    solver = il.linear.GMRES(restart, rtol=1e-12, max_steps=200)
    with torch.no_grad():
        x, info = solver.solve(_op(M), b)
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-9, atol=1e-10)
    assert info.converged.all()
    Mg = M.clone().requires_grad_(True)  # autograd records: the recorded cycles
    x_rec, info_rec = solver.solve(_op(Mg), b)
    torch.testing.assert_close(x_rec.detach(), x, rtol=1e-9, atol=1e-11)
    assert torch.equal(info_rec.steps, info.steps)


def test_from_host_and_to_host_round_trip():
    from implicit_layers.linear._loop import from_host, to_host

    t = torch.tensor([[1.5, -2.0], [0.0, 3.0]], dtype=F64, requires_grad=True)
    host = to_host(t)
    assert isinstance(host, np.ndarray) and host.tolist() == t.tolist()
    back = from_host(host > 0, t)
    assert back.dtype == torch.bool and back.tolist() == [[True, False], [False, True]]
    # NumPy has no bfloat16: read through float32, which holds it exactly
    b16 = torch.tensor([1.0078125, -3.0, float("inf")], dtype=torch.bfloat16)
    assert to_host(b16).tolist() == [1.0078125, -3.0, float("inf")]


def test_problem_monitor_doc_example_still_holds():
    z0 = torch.zeros(1, 3, dtype=F64)
    problem = Problem("fixed_point", torch.cos, (), z0, batched=True, name="f")
    z, info = il.solvers.Picard(max_steps=200).solve(problem, z0)
    assert bool(info.converged) and torch.allclose(z, torch.cos(z))


def test_gmres_constants_first_made_in_inference_mode_serve_a_recorded_solve():
    """The cycles' constants are made once per dtype and device; made first inside
    ``inference_mode``, they are normal tensors that a solve autograd records can use."""
    from implicit_layers.linear import gmres

    gmres._CONSTANTS.pop((torch.float64, torch.device("cpu")), None)
    M = torch.eye(5, dtype=F64) + 0.1 * torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(6),
                                                    dtype=F64)
    b = torch.ones(2, 5, dtype=F64)
    with torch.inference_mode():
        x, _ = il.linear.GMRES(rtol=1e-12).solve(_op(M), b)
    assert not gmres._CONSTANTS[(torch.float64, torch.device("cpu"))]["one"].is_inference()
    Mg = M.clone().requires_grad_(True)
    x_rec, _ = il.linear.GMRES(rtol=1e-12).solve(_op(Mg), b)
    x_rec.sum().backward()
    torch.testing.assert_close(x_rec.detach(), torch.linalg.solve(M, b), rtol=1e-10, atol=1e-12)
    assert Mg.grad is not None and torch.isfinite(Mg.grad).all()
