"""Accelerated proximal gradient (FISTA) with backtracking and adaptive restarts."""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import cast

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._compile_failures import note_compile_failure
from .._composite import CompositeProblem
from .._config import SolverKeywords, check_bool, check_positive_int
from .._info import SolveInfo, compiled_loop_info
from .._problem import Problem
from ..linear._power import seeded_start
from ._base import ForwardSolver, Monitor, non_finite_error
from ._compiled_loop import CompileFailed, loop_serves
from .gradient_descent import lipschitz_estimate_from

__all__ = ["ProximalGradient"]

#: Power-iteration products of a later estimate of the cap on the step, from the last vectors.
_REESTIMATE_STEPS = 3
#: Iterations between the measurements of whether the step may grow.
_GROWTH_EVERY = 8


def _extrapolated(x: Tensor, y: Tensor, x_new: Tensor, momentum: Tensor, active: Tensor,
                 accelerated: bool, restart: bool) -> tuple[Tensor, Tensor, Tensor]:
    """FISTA's move to the new point ``x_new`` (from ``y``, after ``x``): ``(x, y, momentum)``
    for the next iteration, ``y`` extrapolated along ``x_new - x`` by Nesterov's momentum
    (``x_new`` itself without ``accelerated``), the momentum reset where it points against
    the step just taken (with ``restart``). Samples not ``active`` (bool ``(B, 1)``) keep
    their ``x``, ``y`` and momentum ``(B, 1)``."""
    if accelerated:
        following = (1 + torch.sqrt(1 + 4 * momentum.square())) / 2
        beta = (momentum - 1) / following
        if restart:
            # O'Donoghue and Candès' gradient scheme.
            against = ((y - x_new) * (x_new - x)).sum(-1, keepdim=True) > 0
            following = torch.where(against, torch.ones_like(following), following)
            beta = torch.where(against, torch.zeros_like(beta), beta)
        y_next = x_new + beta * (x_new - x)
        momentum = torch.where(active, following, momentum)
    else:
        y_next = x_new
    return torch.where(active, x_new, x), torch.where(active, y_next, y), momentum


class ProximalGradient(ForwardSolver):
    """FISTA on ``min_w L(w) + g(w)``: ``x ← prox_{s g}(y - s ∇L(y))``, ``y`` extrapolated.

    The solver of :func:`~implicit_layers.argmin` with ``prox=`` or ``constraint=``. Every
    sample of a batch has its own step size ``s``, momentum and convergence test:

    * **step**: starts at ``1 / L`` with ``L`` a power-iteration estimate of the largest
      Hessian eigenvalue at ``w0`` (or ``step_size``), and is multiplied by ``shrink`` until
      the sufficient-decrease test ``L(x) <= L(y) + ⟨∇L(y), x - y⟩ + ‖x - y‖² / (2s)`` holds.
      Every 8 iterations, where the curvature along the step just taken allows four times
      the step, it grows by ``1 / shrink``, up to ``1 / L`` (with ``L`` estimated again, from
      the last power-iteration vectors, where that stops it): a start of high curvature no
      longer leaves the step, and the convergence test that scales with it, small for good;
    * **restart**: the momentum is reset when it points against the last step
      (``⟨y - x_new, x_new - x⟩ > 0``, O'Donoghue and Candès' gradient scheme), which keeps the
      linear rate of proximal gradient on strongly convex problems;
    * **convergence**: a sample is done when the proximal-gradient step ``‖y - x_new‖`` is at
      most ``max(atol, rtol · max(‖x_new‖, ‖x_1‖))``. This bounds the residual
      ``‖x - prox(x - s∇L(x))‖`` of the returned ``x`` (the map is non-expansive for
      ``s <= 2 / L``).

    Args:
        step_size: the initial step size (a float > 0); ``None`` (default) estimates ``1 / L``
            at ``w0`` by ``power_steps`` Hessian-vector products. The one positional argument.
        accelerated: use Nesterov momentum (FISTA, default ``True``); ``False`` is plain
            proximal gradient (ISTA).
        restart: reset the momentum adaptively (default ``True``).
        shrink: factor in ``(0, 1)`` applied to a step that fails the decrease test
            (default 0.5).
        max_backtracks: decrease tests per iteration at most (default 30).
        power_steps: power iterations for the initial step (default 20).
        compile: run the whole solve as one ``torch.compile``'d function, its loops
            ``while_loop`` calls with ``fun`` and the prox traced into them (default ``False``):
            the same algorithm (iterates equal to rounding, the same steps and verdicts),
            without the eager loop's dispatch and per-iteration host synchronisations (a
            lasso of 10 unknowns on a 2-core CPU: about 0.55 ms per iteration eagerly,
            0.12 ms compiled). Every new ``fun`` or prox, batch size, dtype or setting compiles
            (seconds, a C++ compiler needed as for any ``torch.compile`` on the CPU); both
            must be traceable by ``torch.compile`` without a graph break (else a
            ``ValueError`` says so; a ``RuntimeError`` where the compiler itself fails on a
            traced loop). Unrolled backward modes (which differentiate the iterations),
            ``inference_mode``, forward-mode AD and ``torch.func`` transforms run the eager
            loop.
        rtol, atol, max_steps, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`); ``max_steps`` defaults to 5000.

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: a setting out of range (``step_size <= 0``, ``shrink`` outside ``(0, 1)``).

    Examples:
        >>> X, y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
        >>> p = il.prox.bind(il.prox.l1, 0.5)
        >>> w = il.argmin(lambda w: 0.5 * (X @ w - y).square().sum(), torch.zeros(5, dtype=torch.float64),
        ...               prox=p, solver=il.solvers.ProximalGradient(rtol=1e-12))
        >>> w.shape
        torch.Size([5])
    """

    name = "ProximalGradient"
    problems = (CompositeProblem,)
    default_max_steps = 5000

    def __init__(
        self,
        step_size: float | None = None,
        *,
        accelerated: bool = True,
        restart: bool = True,
        shrink: float = 0.5,
        max_backtracks: int = 30,
        power_steps: int = 20,
        compile: bool = False,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {type(compile).__name__}.")
        self.compile = compile
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
                raise TypeError(f"step_size must be a float or None, got {type(step_size).__name__}.")
            if not 0 < step_size < math.inf:
                raise ValueError(f"step_size must be a finite number > 0, got {step_size}.")
            step_size = float(step_size)
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)):
            raise TypeError(f"shrink must be a float, got {type(shrink).__name__}.")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}.")
        self.step_size = step_size
        self.accelerated = check_bool(accelerated, "accelerated")
        self.restart = check_bool(restart, "restart")
        self.shrink = float(shrink)
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")
        self.power_steps = check_positive_int(power_steps, "power_steps")

    def gradient_step_size(self) -> float | None:
        """The ``step_size`` given (``None`` when it is estimated at ``w0``), borrowed by the
        step backward modes (``Truncated``, ``JacobianFree``, ``Phantom``) on composite
        problems.

        Examples:
            >>> il.solvers.ProximalGradient(0.05).gradient_step_size()
            0.05
        """
        return self.step_size

    def _initial_step(self, problem: Problem, z0: Tensor) -> tuple[Tensor, Tensor | None]:
        """The first step per sample ``(B, 1)``, and the power iteration's last iterates
        (``None`` where the step is given), from which later estimates start."""
        if self.step_size is not None:
            return torch.full((z0.shape[0], 1), self.step_size, dtype=z0.dtype, device=z0.device), None
        L, v = lipschitz_estimate_from(problem, z0, self.power_steps, None)
        bad = ~torch.isfinite(L)
        if bool(bad.any()):
            # A NaN or Inf Hessian at w0: the NaN step would first surface as the prox's
            # complaint about its step, not as what it is.
            raise non_finite_error(self, problem, bad)
        return 1.0 / L.unsqueeze(-1), v

    def _prox_step(
        self, problem: CompositeProblem, y: Tensor, fy: Tensor, gy: Tensor, step: Tensor,
        differentiable: bool, measure: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The proximal-gradient point from ``y``, the step that passed the decrease test,
        and (with ``measure``; else ``None``) where the step could grow (bool ``(B, 1)``): it
        passed at once, the curvature of ``L`` along it allows four times it, and it
        decreased ``L`` by more than rounding."""
        x = problem.gradient_step(y, gy, step)
        # Rounding slack of the test: a step at the solution must not shrink forever.
        slack = 64 * torch.finfo(y.dtype).eps * (fy.abs() + 1)
        grow = None
        for attempt in range(self.max_backtracks):
            fx = problem.objective(x) if differentiable else problem.objective(x).detach()
            d = x - y
            linear = fy + (gy * d).sum(-1)
            sq = d.square().sum(-1)
            ok = (fx <= linear + sq / (2 * step.squeeze(-1)) + slack).detach()
            if bool(ok.all()):
                if measure and attempt == 0:
                    with torch.no_grad():
                        curvature = 2 * (fx - linear) / sq.clamp_min(torch.finfo(sq.dtype).tiny)
                        grow = ((4 * curvature * step.squeeze(-1) < 1)
                                & (fy - fx > 1024 * slack)).unsqueeze(-1)
                break
            step = torch.where(ok.unsqueeze(-1), step, step * self.shrink)
            x = torch.where(ok.unsqueeze(-1), x, problem.gradient_step(y, gy, step))
        return x, step, grow

    def _grown(
        self, problem: Problem, y: Tensor, step: Tensor, grow: Tensor, cap: Tensor,
        vectors: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(step, cap, vectors)`` for the next iteration. The step grows (by ``1 / shrink``)
        where ``grow`` says so, up to ``cap``, the step of the largest Hessian eigenvalue: a
        start of high curvature leaves the step small, and a small step moves little, so
        that the convergence test would be met far from the solution. The curvature along
        the step just taken does not show the largest eigenvalue (a step above ``1 / L``
        stalls the accelerated iteration), hence the cap; where it stops the growth and the
        step size is estimated (``vectors``, the power iteration's last iterates), it is
        estimated again at ``y``, from those vectors: a few products where the Hessian has
        not changed (``None`` for the vectors: not again)."""
        wanted = step / self.shrink
        blocked = grow & (wanted > cap)
        if vectors is not None and bool(blocked.any()):
            L, fresh_vectors = lipschitz_estimate_from(problem, y, _REESTIMATE_STEPS, vectors)
            fresh = 1.0 / L.unsqueeze(-1)
            # Estimate again only while the curvature keeps falling (a quadratic: once).
            vectors = fresh_vectors if bool((blocked & (fresh > 1.5 * cap)).any()) else None
            cap = torch.where(blocked, fresh, cap)
        return torch.where(grow, torch.minimum(wanted, cap), step), cap, vectors

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        if self.compile and not differentiable and isinstance(problem, CompositeProblem) \
                and loop_serves(problem):
            try:
                return self._compiled_solve(problem, z0)
            except CompileFailed as failure:
                note_compile_failure(problem.fn, f"ProximalGradient(compile=True) on {problem.name}",
                                     "its solves run the eager steps", failure.error)
        # A CompositeProblem (check_kind), or its fold under vmap, which has the same methods.
        composite = cast(CompositeProblem, problem)
        step, vectors = self._initial_step(problem, z0)
        cap = step
        x = y = z0
        momentum = torch.ones(z0.shape[0], 1, dtype=z0.dtype, device=z0.device)
        fy, gy = problem.value_and_grad(y, create_graph=differentiable)
        x_new, step, grow = self._prox_step(composite, y, fy, gy, step, differentiable, True)
        mon = Monitor(self, problem, z0, y - x_new)
        for it in range(1, self.max_steps + 1):
            if mon.stop():
                break
            active = mon.active.unsqueeze(-1)
            if grow is not None and bool(grow.any()):
                step, cap, vectors = self._grown(problem, x_new, step, grow & active, cap, vectors)
            x, y, momentum = _extrapolated(x, y, x_new, momentum, active, self.accelerated,
                                          self.restart)
            fy, gy = problem.value_and_grad(y, create_graph=differentiable)
            # Whether the step may grow is measured every few iterations: a few small
            # operations and a host read, which would add a tenth to a small problem's steps.
            x_new, step, grow = self._prox_step(composite, y, fy, gy, step, differentiable,
                                                it % _GROWTH_EVERY == 0)
            mon.record(x_new, y - x_new, mon.active)
        return mon.finish()

    def _compiled_solve(self, problem: CompositeProblem, z0: Tensor) -> tuple[Tensor, SolveInfo]:
        """The whole solve as one compiled loop (:mod:`._pg_loop`), with the verdicts of the
        eager loop: the same info, and the same error for a NaN or Inf step."""
        loop = _compiled_loop_module()
        settings = loop.LoopSettings.of(
            self.resolved_rtol(z0.dtype), float(self.atol), self.max_steps, self.accelerated,
            self.restart, self.shrink, self.max_backtracks, self.power_steps, self.step_size)
        # The power iteration's start, drawn outside the loop (a generator is not traced);
        # contiguous, as no two loop inputs may alias.
        start = seeded_start(z0).contiguous()
        z, best, tol, steps, converged, finite, flags = loop.run_compiled(
            problem.objective, problem.gradient_step, z0, start, settings,
            f"{problem.name} and {problem.prox_name}")
        info, all_finite = compiled_loop_info(flags, converged=converged, steps=steps,
                                              residual=best, tolerance=tol, solver=self.name)
        if not all_finite:
            raise non_finite_error(self, problem, ~finite)
        return z, info


@functools.cache
def _compiled_loop_module() -> ModuleType:
    """:mod:`._pg_loop`, imported on the first compiled solve (importing torch's compiler
    costs time a program that never compiles should not pay), then from the cache."""
    from . import _pg_loop

    return _pg_loop
