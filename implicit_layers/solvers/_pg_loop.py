"""The proximal-gradient solve as one compiled graph (``ProximalGradient(compile=True)``).

The eager solver (:class:`~implicit_layers.solvers.ProximalGradient`) runs a Python loop of
small operations, with a host synchronisation per backtracking test: about half a
millisecond per iteration on a small lasso, most of it dispatch. Here the same algorithm is
written over fixed-shape tensors, its loops ``torch._higher_order_ops.while_loop``: the FISTA
iterations, the backtracking of each iteration (a nested loop that runs while a sample fails
the decrease test), and the power iterations of the initial step and of its later estimates
(a loop that runs zero times where the eager solver estimates nothing). The per-sample
bookkeeping is the eager :class:`~implicit_layers.solvers.base.Monitor`'s. Traced by
``torch.compile(fullgraph=True)``, a solve is one call of one compiled function with a single
host synchronisation at its end.

Gradients come from ``torch.func.grad`` and Hessian-vector products from ``torch.func.jvp``
of it. Run eagerly (``run_while`` is then a Python loop) the function takes the eager
solver's iterates bit for bit; compiled, inductor's fused kernels round differently, and the
iterates agree to rounding.
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
from .proximal_gradient import _extrapolated

__all__ = ["LoopSettings", "compiled_loop", "pg_loop", "run_compiled"]

#: As in the eager solver: power-iteration products of a later estimate of the cap on the
#: step, and iterations between the measurements of whether the step may grow.
_REESTIMATE_STEPS = 3
_GROWTH_EVERY = 8


@dataclass(frozen=True)
class LoopSettings:
    """The constants of one compiled solve (plain numbers: a change recompiles).

    Attributes:
        rtol, atol: the resolved tolerances of the proximal-gradient step's norm.
        max_steps: the iteration limit.
        accelerated, restart, shrink, max_backtracks, power_steps: the solver's settings.
        step_size: the given initial step, or ``None`` (estimated by power iteration).
    """

    rtol: float
    atol: float
    max_steps: int
    accelerated: bool
    restart: bool
    shrink: float
    max_backtracks: int
    power_steps: int
    step_size: float | None

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(rtol: float, atol: float, max_steps: int, accelerated: bool, restart: bool, shrink: float,
           max_backtracks: int, power_steps: int, step_size: float | None) -> LoopSettings:
        """The settings with these values, one object per distinct values (built once, not
        on every solve)."""
        return LoopSettings(rtol, atol, max_steps, accelerated, restart, shrink, max_backtracks,
                            power_steps, step_size)


Objective = Callable[[Tensor], Tensor]
GradientStep = Callable[[Tensor, Tensor, Tensor], Tensor]


def _value_and_grad(objective: Objective, z: Tensor) -> tuple[Tensor, Tensor]:
    """Objective values ``(B,)`` and gradients ``(B, n)`` at ``z``."""

    def total(zz: Tensor) -> tuple[Tensor, Tensor]:
        value = objective(zz)
        return value.sum(), value

    grad, value = torch.func.grad(total, has_aux=True)(z)
    return value, grad


def _lipschitz(objective: Objective, z: Tensor, v: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """The eager solver's estimate of the largest Hessian eigenvalue per sample at ``z``,
    ``1.1 |λ|`` from ``steps`` (an int64 0-d tensor: zero runs none) power iterations from
    the vectors ``v`` (``(B, n)``), and the last iterates."""

    def hvp(u: Tensor) -> Tensor:
        return torch.func.jvp(lambda zz: _value_and_grad(objective, zz)[1], (z,), (u,))[1]

    tiny = torch.finfo(z.dtype).tiny

    def cond(i: Tensor, lam: Tensor, v: Tensor) -> Tensor:
        return i < steps

    def body(i: Tensor, lam: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)
        hv = hvp(v)
        # In the state's dtype: under autocast the product is in the narrow dtype, and a
        # loop's state keeps its dtypes.
        return i + 1, torch.linalg.vecdot(v, hv).abs().to(lam.dtype), hv

    start = (torch.zeros((), dtype=torch.int64, device=z.device),
             torch.ones(z.shape[0], dtype=z.dtype, device=z.device), v)
    _, lam, v = run_while(cond, body, start)
    return (1.1 * lam).clamp_min(torch.finfo(z.dtype).eps), v


def _prox_step(
    objective: Objective, gradient_step: GradientStep, y: Tensor, fy: Tensor, gy: Tensor,
    step: Tensor, measure: Tensor, s: LoopSettings,
) -> tuple[Tensor, Tensor, Tensor]:
    """The eager solver's ``_prox_step``: the proximal-gradient point from ``y``, its step
    after backtracking, and where the step may grow (bool ``(B, 1)``, all False unless
    ``measure``)."""
    slack = 64 * torch.finfo(y.dtype).eps * (fy.abs() + 1)

    def test(x: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        fx = objective(x)
        d = x - y
        linear = fy + (gy * d).sum(-1)
        sq = d.square().sum(-1)
        return fx <= linear + sq / (2 * step.squeeze(-1)) + slack, fx, linear, sq

    def shrunk(ok: Tensor, step: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        ok = ok.unsqueeze(-1)
        step = torch.where(ok, step, step * s.shrink)
        return step, torch.where(ok, x, gradient_step(y, gy, step))

    x = gradient_step(y, gy, step)
    ok, fx, linear, sq = test(x, step)
    curvature = 2 * (fx - linear) / sq.clamp_min(torch.finfo(sq.dtype).tiny)
    grow = (measure & ok.all() & (4 * curvature * step.squeeze(-1) < 1)
            & (fy - fx > 1024 * slack)).unsqueeze(-1)

    def cond(tests: Tensor, step: Tensor, x: Tensor, ok: Tensor) -> Tensor:
        return (tests < s.max_backtracks) & ~ok.all()

    def body(tests: Tensor, step: Tensor, x: Tensor, ok: Tensor) -> tuple[Tensor, ...]:
        step, x = shrunk(ok, step, x)
        return tests + 1, step, x, test(x, step)[0]

    one = torch.ones((), dtype=torch.int64, device=y.device)
    _, step, x, ok = run_while(cond, body, (one, step, x, ok))
    # The eager loop shrinks once more after its last failed test (a no-op where all passed).
    step, x = shrunk(ok, step, x)
    return x, step, grow


def pg_loop(objective: Objective, gradient_step: GradientStep, z0: Tensor, start: Tensor,
            s: LoopSettings) -> tuple[Tensor, ...]:
    """Proximal gradient from ``z0`` (``(B, n)``) with the eager solver's steps, restarts and
    per-sample stopping, as one loop.

    Args:
        objective: ``L(z)``, ``(B,)``.
        gradient_step: ``(y, g, step) ↦ prox(y - step·g, step)`` on flat ``(B, n)`` tensors,
            ``step`` ``(B, 1)``.
        z0: the initial iterate ``(B, n)``.
        start: the power iteration's start vectors ``(B, n)`` (unused with a given step).
        s: the settings.

    Returns:
        ``(z, best_res, tol, steps, converged, finite, flags)``: each sample's best iterate
        ``(B, n)``; the norm of its proximal-gradient step and its tolerance (in ``z0``'s
        dtype), the iterations it took (int64), whether the best iterate meets the tolerance
        and whether the latest norm is finite (NaN or Inf there is the eager solver's
        non-finite error), each ``(B,)``; and ``flags``, bool ``(2,)``: every sample finite,
        every sample converged.
    """
    batch, dtype, device = z0.shape[0], z0.dtype, z0.device
    no = torch.zeros((), dtype=torch.bool, device=device)
    if s.step_size is None:
        steps = torch.full((), s.power_steps, dtype=torch.int64, device=device)
        L, vectors = _lipschitz(objective, z0, start, steps)
        # A NaN or Inf Hessian at z0 is the eager solver's non-finite error: such a sample
        # starts with a NaN norm, which stops the loop before its first iteration, and a
        # step of 1 meanwhile (the prox checks that its step is positive).
        started = torch.isfinite(L).unsqueeze(-1)
        step, have_vectors = torch.where(started, 1.0 / L.unsqueeze(-1), 1.0), ~no
    else:
        step = torch.full((batch, 1), s.step_size, dtype=dtype, device=device)
        vectors, have_vectors, started = start, no, torch.ones_like(step, dtype=torch.bool)
    cap = step
    fy, gy = _value_and_grad(objective, z0)
    x_new, step, grow = _prox_step(objective, gradient_step, z0, fy, gy, step, ~no, s)
    # The Monitor's initial state (relative to the iterate): the step's norm, the tolerance's
    # floor from the first proximal-gradient point, the best iterate z0 with its tolerance.
    res = torch.where(started.squeeze(-1), _norm(z0 - x_new), torch.nan)
    tol0 = torch.clamp(s.rtol * _norm(x_new), min=s.atol)
    best_tol = torch.clamp(_norm(z0) * s.rtol, min=tol0)
    done = res <= best_tol
    momentum = torch.ones(batch, 1, dtype=dtype, device=device)
    it = torch.ones((), dtype=torch.int64, device=device)
    taken = torch.zeros(batch, dtype=torch.int64, device=device)

    def cond(it: Tensor, x: Tensor, y: Tensor, x_new: Tensor, momentum: Tensor, step: Tensor,
             cap: Tensor, vectors: Tensor, have_vectors: Tensor, grow: Tensor, best_z: Tensor,
             best_res: Tensor, best_tol: Tensor, res: Tensor, done: Tensor, taken: Tensor) -> Tensor:
        # The eager monitor's check before each iteration: the budget, every sample done, and
        # a norm that is NaN or Inf (an error, raised by the caller).
        return (it <= s.max_steps) & ~done.all() & torch.isfinite(res).all()

    def body(it: Tensor, x: Tensor, y: Tensor, x_new: Tensor, momentum: Tensor, step: Tensor,
             cap: Tensor, vectors: Tensor, have_vectors: Tensor, grow: Tensor, best_z: Tensor,
             best_res: Tensor, best_tol: Tensor, res: Tensor, done: Tensor,
             taken: Tensor) -> tuple[Tensor, ...]:
        active = ~done.unsqueeze(-1)
        # The step grows where measured; where the cap stops it, the cap is estimated again
        # from the last power-iteration vectors (the eager solver's `_grown`).
        grow = grow & active
        wanted = step / s.shrink
        blocked = grow & (wanted > cap)
        again = have_vectors & blocked.any()
        count = torch.where(again, _REESTIMATE_STEPS, 0)
        L, fresh_vectors = _lipschitz(objective, x_new, vectors, count)
        fresh = 1.0 / L.unsqueeze(-1)
        keep = again & (blocked & (fresh > 1.5 * cap)).any()
        vectors = torch.where(keep, fresh_vectors, vectors)
        have_vectors = torch.where(again, keep, have_vectors)
        cap = torch.where(again & blocked, fresh, cap)
        step = torch.where(grow, torch.minimum(wanted, cap), step)
        x, y, momentum = _extrapolated(x, y, x_new, momentum, active, s.accelerated, s.restart)
        fy, gy = _value_and_grad(objective, y)
        x_new, step, grow = _prox_step(objective, gradient_step, y, fy, gy, step,
                                       it % _GROWTH_EVERY == 0, s)
        # Monitor.record of the samples that stepped.
        stepped = active.squeeze(-1)
        new = _norm(y - x_new)
        tol = torch.clamp(_norm(x_new) * s.rtol, min=tol0)
        met = new <= tol
        better = stepped & ((new <= best_res) | met)
        best_z = torch.where(better.unsqueeze(-1), x_new, best_z)
        best_res = torch.where(better, new, best_res)
        best_tol = torch.where(better, tol, best_tol)
        res = torch.where(stepped, new, res)
        return (it + 1, x, y, x_new, momentum, step, cap, vectors, have_vectors, grow, best_z,
                best_res, best_tol, res, done | (stepped & met), taken + stepped.long())

    # No two loop inputs may alias (inductor refuses them): copies where values repeat.
    state = (it, z0, z0.clone(), x_new, momentum, step, cap.clone(), vectors.clone(), have_vectors,
             grow, z0.clone(), res.clone(), best_tol, res, done, taken)
    out = run_while(cond, body, state)
    best_z, best_res, best_tol, res, taken = out[10], out[11], out[12], out[13], out[15]
    finite, converged = torch.isfinite(res), best_res <= best_tol
    # What the caller must know on the host, read in one synchronisation.
    flags = torch.stack([finite.all(), converged.all()])
    return best_z, best_res.to(dtype), best_tol.to(dtype), taken, converged, finite, flags


def run_compiled(objective: Objective, gradient_step: GradientStep, z0: Tensor, start: Tensor,
                 s: LoopSettings, traced: str) -> tuple[Tensor, ...]:
    """:func:`pg_loop` through :func:`compiled_loop`, with the errors of
    :func:`~implicit_layers.solvers._compiled_loop.run_loop` (``traced``: the user's functions
    as messages name them)."""
    return run_loop(compiled_loop(), (objective, gradient_step, z0, start, s),
                    "ProximalGradient(compile=True)", traced)


@functools.cache
def compiled_loop() -> GuardedCall:
    """:func:`pg_loop` compiled with ``fullgraph=True``, once per process (its graphs are cached
    per user function, shapes, dtype and settings)."""
    # Not inductor's C++ wrapper: in torch 2.13 a nested while_loop that runs no pass (the
    # backtracking where every sample passes its first test) leaves wrong values in it (a
    # lasso stopped after 3 of its 44 iterations, far from the solution), where the Python
    # wrapper and the "eager" and "aot_eager" backends agree with the eager loop. The Python
    # wrapper costs little here: 5.2 ms per solve of that lasso, against 4.5 ms with the C++
    # wrapper made to run every backtracking loop once at least.
    return compile_loop(pg_loop)
