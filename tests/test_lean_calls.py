"""The lean checks of the window monitor keep the verdicts: a converged solve reports no
failure, a short one warns, a NaN in one sample raises, and the one-sum flags agree with the
reference fixed point."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il


def _problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=gen, dtype=dtype)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(8, 16, generator=gen, dtype=dtype)
    return W, x


@pytest.mark.parametrize("solver", [il.solvers.Picard, il.solvers.Anderson, il.solvers.Adaptive])
def test_converged_solve_matches_reference_and_reports_no_failure(solver):
    W, x = _problem()
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    z, info = il.fixed_point(f, torch.zeros_like(x), solver=solver(rtol=1e-10), batched=True,
                             return_info=True)
    ref = torch.zeros_like(x)
    for _ in range(200):  # contraction 0.5: far below 1e-10 relative
        ref = f(ref)
    assert bool(info.converged.all())
    assert torch.allclose(z, ref, atol=1e-9, rtol=0)
    assert bool((info.residual <= info.tolerance).all())


@pytest.mark.parametrize("solver", [il.solvers.Picard, il.solvers.Adaptive])
def test_short_solve_still_warns(solver):
    W, x = _problem()
    with pytest.warns(il.ConvergenceWarning):
        _, info = il.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x),
                                 solver=solver(max_steps=3, rtol=1e-12), batched=True,
                                 return_info=True)
    assert not bool(info.converged.any())
    assert info.steps.tolist() == [3] * 8


def test_nan_in_one_sample_raises():
    W, x = _problem()
    x = x.clone()
    x[3, 0] = float("nan")
    with pytest.raises(il.NonFiniteError):
        il.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x),
                       solver=il.solvers.Picard(), batched=True)


def test_partly_converged_batch_counts_steps_per_sample():
    """Samples converging at different steps: the masked check path and the step counts kept
    on the host agree with a per-sample count."""
    W, x = _problem()
    scale = torch.linspace(0.05, 1.0, 8, dtype=x.dtype).unsqueeze(-1)
    f = lambda z: scale * torch.tanh(z @ W.T + x)  # noqa: E731
    z, info = il.fixed_point(f, torch.zeros_like(x), solver=il.solvers.Picard(rtol=1e-8),
                             batched=True, return_info=True)
    assert bool(info.converged.all())
    for i in range(8):
        zi = torch.zeros(1, 16, dtype=x.dtype)
        steps = 0
        while True:
            fz = scale[i] * torch.tanh(zi @ W.T + x[i])
            steps += 1
            if torch.linalg.vector_norm(fz - zi) <= 1e-8 * torch.linalg.vector_norm(fz):
                break
            zi = fz
        assert abs(int(info.steps[i]) - steps) <= 1, (i, info.steps.tolist(), steps)
    assert len(set(info.steps.tolist())) > 1
