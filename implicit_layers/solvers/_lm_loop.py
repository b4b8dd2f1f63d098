"""Levenberg-Marquardt's whole solve as one compiled graph (``LevenbergMarquardt(compile=True)``).

The loop is ``torch._higher_order_ops.while_loop`` over fixed-shape tensors: the iterate, the
residuals and their Jacobian, the damping, and the per-sample bookkeeping of the eager
:class:`~implicit_layers.solvers.base.Monitor` (residual norms, done flags, step counts, the best
iterate). Traced by ``torch.compile(fullgraph=True)``, one call of the solve is one compiled
function with a single host synchronisation at its end, instead of one compiled call (guards,
dispatch, a synchronisation) per step. The step itself is the eager solver's compiled step
(:func:`~implicit_layers.solvers.least_squares._lm_step`), so the iterates are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._compiled_solve import run_while
from .._guarded_call import GuardedCall, compile_loop
from ._base import _norm
from ._compiled_loop import run_loop
from .least_squares import _lm_step, _value_and_jt

__all__ = ["LoopSettings", "compiled_loop", "lm_loop", "run_compiled"]


@dataclass(frozen=True)
class LoopSettings:
    """The constants of one compiled solve (plain numbers: a change recompiles).

    Attributes:
        rtol, atol: the resolved tolerances of the gradient norm ``‖Jᵀr‖``.
        max_steps: the step limit.
        damping: the initial ``μ`` relative to the largest diagonal entry of ``JᵀJ``.
    """

    rtol: float
    atol: float
    max_steps: int
    damping: float

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(rtol: float, atol: float, max_steps: int, damping: float) -> LoopSettings:
        """The settings with these values, one object per distinct values (built once, not
        on every solve)."""
        return LoopSettings(rtol, atol, max_steps, damping)


def lm_loop(
    residuals: Callable[[Tensor], Tensor], z0: Tensor, s: LoopSettings,
    probe: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Levenberg-Marquardt from ``z0`` (``(B, n)``) with the eager solver's damping rule and
    per-sample stopping, as one loop.

    Args:
        residuals: ``r(z)``, ``(B, m)``.
        z0: the initial iterate ``(B, n)``.
        s: the settings.
        probe: the user's function at ``z0`` as it returns its residuals (any shape and
            dtype), returned for the checks of its output; ``None``: not called.

    Returns:
        ``(z, best_res, tol, steps, converged, finite, flags)``: each sample's best iterate
        ``(B, n)``; its gradient norm and the tolerance (in ``z0``'s dtype), the steps it took
        (int64), whether the best iterate meets the tolerance and whether the latest gradient
        norm is finite (NaN or Inf there is the eager solver's non-finite error), each
        ``(B,)``; and ``flags``, bool ``(2,)``: every sample finite, every sample converged.
        With a ``probe``, its output at ``z0`` follows.
    """
    r, jt = _value_and_jt(residuals, z0)
    jt = jt.contiguous()
    g = (jt @ r.unsqueeze(-1)).squeeze(-1)
    res = _norm(g, keepdim=True)  # float64, as the eager monitor keeps its norms
    tol = torch.clamp(s.rtol * res, min=s.atol)
    # diag(JᵀJ) as row sums of squares: no n x n product for the start alone (and no
    # `diagonal`, whose inductor lowering warns with a deprecation of torch's own)
    diag = jt.square().sum(-1).amax(-1, keepdim=True)
    mu = s.damping * diag.clamp_min(torch.finfo(z0.dtype).tiny)
    # As in the eager loop: refused steps at rounding level grow μ no further than this.
    mu_max = mu / (s.damping * torch.finfo(z0.dtype).eps ** 2)
    nu = torch.full_like(mu, 2.0)
    done = res <= tol
    steps = torch.zeros_like(res, dtype=torch.int64)
    k = torch.zeros((), dtype=torch.int64, device=z0.device)

    def cond(k: Tensor, z: Tensor, r: Tensor, jt: Tensor, g: Tensor, mu: Tensor, nu: Tensor,
             best_z: Tensor, best_res: Tensor, res: Tensor, done: Tensor, steps: Tensor) -> Tensor:
        # The eager monitor's checks before each step: the step budget, every sample done, and
        # a residual norm that is NaN or Inf (an error, raised by the caller).
        return (k < s.max_steps) & ~done.all() & torch.isfinite(res).all()

    def body(k: Tensor, z: Tensor, r: Tensor, jt: Tensor, g: Tensor, mu: Tensor, nu: Tensor,
             best_z: Tensor, best_res: Tensor, res: Tensor, done: Tensor,
             steps: Tensor) -> tuple[Tensor, ...]:
        active = ~done
        z, r, jt, g, mu, nu = _lm_step(residuals, z, r, jt, g, mu, nu, mu_max, active)
        new = _norm(g, keepdim=True)
        met = new <= tol
        # Monitor.record: the best iterate, the latest norm and the flags of the samples that
        # stepped.
        better = active & ((new <= best_res) | met)
        best_z = torch.where(better, z, best_z)
        best_res = torch.where(better, new, best_res)
        res = torch.where(active, new, res)
        return (k + 1, z, r, jt, g, mu, nu, best_z, best_res, res, done | (active & met),
                steps + active.long())

    # No two loop inputs may alias (inductor refuses them): the best iterate and norm are copies.
    state = (k, z0, r, jt, g, mu, nu, z0.clone(), res.clone(), res, done, steps)
    out = run_while(cond, body, state)
    _, _, _, _, _, _, _, best_z, best_res, res, _, steps = out
    best_res, tol, steps = best_res.squeeze(-1), tol.squeeze(-1), steps.squeeze(-1)
    finite, converged = torch.isfinite(res).squeeze(-1), best_res <= tol
    # What the caller must know on the host, read in one synchronisation.
    flags = torch.stack([finite.all(), converged.all()])
    # The norms in the state's dtype, as the eager solver's info holds them (converted here,
    # not by two more eager calls after the loop).
    out = best_z, best_res.to(z0.dtype), tol.to(z0.dtype), steps, converged, finite, flags
    return out if probe is None else (*out, probe(z0))


def run_compiled(
    residuals: Callable[[Tensor], Tensor], z0: Tensor, s: LoopSettings, name: str,
    probe: Callable[[Tensor], Tensor],
) -> tuple[Tensor, ...]:
    """:func:`lm_loop` (with its ``probe``) through :func:`compiled_loop`, with the errors of
    :func:`~implicit_layers.solvers._compiled_loop.run_loop` (``name``: the residual
    function's name in messages). Its backend reports the tensors carrying derivatives that
    the loop read (see :func:`~implicit_layers._compiled_reads.with_reads`)."""
    return run_loop(compiled_loop(), (residuals, z0, s, probe), "LevenbergMarquardt(compile=True)",
                    name)


@functools.cache
def compiled_loop() -> GuardedCall:
    """:func:`lm_loop` compiled with ``fullgraph=True``, once per process (its graphs are cached
    per residual function, shapes, dtype and settings). Static shapes: a batch size is a
    constant of the loop."""
    # On the CPU, the C++ wrapper runs the loop without returning to Python between steps:
    # half the time of the Python wrapper on a few-step solve of a small batch (measured at
    # B = 1); elsewhere the Python wrapper.
    return compile_loop(lm_loop, cpu_config_patches={"cpp_wrapper": True})
