"""The default fixed-point solver: plain iteration, Anderson once the contraction is slow.

The rule, in one place (``docs/choosing.md``, "How to choose", describes it for users):

* **Forward.** Start with plain (Picard) iteration: one map evaluation per step and nothing
  else. Every ``window`` steps measure the contraction factor ``ρ``, the geometric mean of the
  ratios of successive residual norms of the worst active sample. Switch to Anderson
  acceleration when ``ρ > switch_ratio`` (default 0.95: plain iteration would need more than
  ~450 steps per 10 decades there, and Anderson's Krylov-like mixing pays for its extra work per
  step), when plain iteration at the observed rate would not reach the tolerance within what
  is left of ``max_steps``, or at once when some residual grows (a map that is not
  contractive, where plain iteration diverges). The switch restarts from the best iterate seen.
* **Trial.** A contraction below ``switch_ratio`` can still be slow: plain iteration predicted
  to need more than ``TRY_ANDERSON_AFTER`` further steps tries Anderson for ``TRIAL_STEPS``
  steps, once, and keeps it if Anderson's observed contraction per unit of work beats plain
  iteration's (an Anderson step costing about ``ANDERSON_COST`` plain steps); otherwise it goes
  back to plain iteration from the best iterate. An (almost) affine map with a real spectrum,
  such as a proximal-gradient map once the support is found, gains several times from
  Anderson; a map whose Jacobian is near-orthogonal (a "hard" DEQ) gains nothing, and the
  trial costs it a few percent.
* **Backward.** When the forward finished with plain iteration, the adjoint system
  ``(I - J)ᵀ u = g`` contracts with the same factor (the spectrum of ``Jᵀ`` is that of ``J``),
  so the Neumann series solves it with about ``log(rtol) / log ρ`` products and no
  orthogonalisation. It gets twice that budget; samples it leaves unconverged are finished by
  GMRES started from the Neumann iterate (never silently). After a switch to Anderson the
  backward is GMRES.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import GraphedSolverKeywords, check_nonnegative, check_positive_int
from .._cuda_graph import graph_runner
from .._info import SolveInfo
from .._problem import FixedPointProblem, Problem, RootProblem
from ..linear._base import LinearSolver
from ..linear.combinators import NeumannThenGMRES
from ..linear.gmres import GMRES
from ._base import ForwardSolver
from ._window import ChunkAdvance, WindowMonitor, _norm
from .anderson import _ListHistory
from .picard import damped_step, map_and_residual, picard_chunks, picard_step

__all__ = ["Adaptive"]

#: Predicted further plain steps above which Anderson is tried (once per solve).
TRY_ANDERSON_AFTER = 128
#: Anderson steps the trial runs before its contraction is compared with plain iteration's.
TRIAL_STEPS = 8
#: Work of one Anderson step in plain steps (one map evaluation plus the mixing).
ANDERSON_COST = 2.0


class Adaptive(ForwardSolver):
    """Picard iteration that switches to Anderson acceleration when the contraction is slow,
    and picks the backward from the contraction it observed (the default of
    :func:`~implicit_layers.fixed_point` and :class:`~implicit_layers.nn.DEQ`).

    Forward: plain iteration ``z ← f(z)`` (``z ← z - F(z)`` for roots) while the observed
    contraction factor ``ρ`` (geometric mean over ``window`` steps of the ratio of successive
    residual norms, worst active sample) stays at most ``switch_ratio`` and predicts convergence
    within ``max_steps``; then Anderson acceleration with ``memory`` iterates, from the best
    iterate so far. A residual that grows switches at once (a map that is not contractive).
    When plain iteration would still need more than 128 steps at the observed ``ρ``, Anderson
    is tried for 8 steps (once) and kept only if it contracts faster per unit of work
    (``info.solver`` then reads ``"Adaptive (Picard; Anderson tried)"`` if it was not kept).
    Both phases share one convergence monitor and the ``max_steps`` budget.

    Backward (when the backward mode has no linear solver of its own): Neumann series when the
    forward stayed with plain iteration, with about ``2 log(rtol) / log ρ`` terms, finished by
    GMRES from the Neumann iterate for samples it leaves unconverged; GMRES after a switch.

    The returned :class:`~implicit_layers.SolveInfo` has ``contraction``: per sample, the
    observed ``ρ`` of the plain iteration (``(residual / initial residual)^(1/steps)``), or the
    ``ρ`` that triggered the switch to Anderson, for every sample, after a switch.

    Args:
        switch_ratio: contraction factor above which plain iteration gives way to Anderson, in
            ``(0, 1]`` (default 0.95).
        memory: Anderson's history length after a switch (default 5).
        window: steps over which ``ρ`` is measured (default 4).
        rtol, atol, max_steps, check_every, on_failure: see :class:`ForwardSolver`.
        cuda_graph: record each chunk of ``check_every`` plain steps as a CUDA graph once and
            replay it (default ``False``; the Anderson phase after a switch runs eagerly); the
            backward it picks gets the same setting. See :class:`Picard` and
            ``docs/guides/deq.md``, "CUDA graphs".

    Example:
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> z, info = il.fixed_point(lambda z: torch.tanh(W @ z + 1), torch.zeros(3, dtype=torch.float64),
        ...                          solver=il.solvers.Adaptive(), return_info=True)
        >>> info.solver, float(info.contraction) < 0.5
        ('Adaptive (Picard)', True)
    """

    name = "Adaptive"
    supports_cuda_graph = True
    problems = (FixedPointProblem, RootProblem)

    def __init__(
        self,
        switch_ratio: float = 0.95,
        *,
        memory: int = 5,
        window: int = 4,
        **settings: Unpack[GraphedSolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.switch_ratio = check_nonnegative(switch_ratio, "switch_ratio", allow_none=False)
        if not 0 < self.switch_ratio <= 1:
            raise ValueError(
                f"switch_ratio must lie in (0, 1], got {switch_ratio}; 1 keeps plain iteration "
                "unless a residual grows."
            )
        self.memory = check_positive_int(memory, "memory")
        self.window = check_positive_int(window, "window")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        plain = problem.has_fixed_point_map

        def residual(v: Tensor) -> Tensor:
            return problem.residual(v, create_graph=differentiable)

        z = z0
        if plain:
            fmap = problem.fixed_point_map
            fz, r = map_and_residual(fmap, z)
        else:
            r = residual(z)
        # Bookkeeping at the checks only, as in Picard and Anderson: samples keep stepping
        # after they converge, and the monitor never returns those later iterates.
        mon = WindowMonitor(self, problem, z, r)
        tiny = torch.finfo(z.dtype).tiny
        res0 = mon.res  # (B, 1)
        # the reference residual norms, floored once where they are set (not at every check)
        ref_res, ref_k = res0.clamp_min(tiny), 0
        # The same reference on the host, where a check judged on the host read the norms it
        # comes from (then the contraction test runs there, with no op on the device).
        ref_host: np.ndarray | None = None
        k = 0  # plain steps taken
        switched_at: float | None = None
        # Anderson on trial: (steps taken at the switch, residual norms there, plain rho).
        trial: tuple[int, Tensor, float] | None = None
        tried = False
        history = _ListHistory(self.memory, 1.0)  # Anderson's, after a switch
        ones = torch.ones(z.shape[0], 1, self.memory, dtype=z.dtype, device=z.device)
        reg = 100 * torch.finfo(z.dtype).eps
        # cuda_graph: the plain phase runs in chunks of check_every steps (window buffers
        # Z, R), each a replayed CUDA graph.
        graphs = graph_runner(self.name, self.cuda_graph, z, recording=differentiable)
        if graphs is not None:
            Z = z.new_empty(z.shape[0], mon.check_every, z.shape[1])
            state: tuple[Tensor, ...] = (
                (fz, Z, torch.empty_like(Z)) if plain else (z, r, Z, torch.empty_like(Z))
            )
            chunk_of = picard_chunks(fmap if plain else residual, plain, 1.0, mon.check_every)
            chunks = ChunkAdvance(mon, graphs, self.max_steps, chunk_of, state)
        taken = 0
        while taken < self.max_steps:
            # At a check while plain iteration runs, the contraction test rides on the check's
            # synchronisation (WindowMonitor.extra): no second one.
            look = switched_at is None and mon.k % mon.check_every == 0 and k > ref_k
            if look:
                span = k - ref_k
                mon.extra = _contraction_test(mon, z, r, ref_res, span >= self.window, span, tiny)
                if ref_host is not None:
                    mon.host_extra = _host_contraction_test(ref_host, span >= self.window, span)
            stop = mon.stop()
            mon.extra = mon.host_extra = None
            if stop:
                break
            if k == ref_k == 0 and ref_host is None and mon.host_res is not None:
                # the first check read the initial norms (ref_res is res0, floored)
                ref_host = np.maximum(mon.host_res, tiny)
            if look:
                res = mon.last_res if mon.last_res is not None else _norm(r).unsqueeze(-1)
                if span >= self.window:
                    worst, needed = mon.extra_values
                else:
                    # Within a window only growth counts (it switches whatever the budget).
                    worst, needed = mon.extra_values[0], math.nan
                if worst > 1.0 or span >= self.window:
                    rho = worst ** (1.0 / span)
                    switch = self._switch(worst, rho, needed, self.max_steps - k)
                    if not switch and not tried and graphs is None and self._try(needed):
                        tried = True
                        trial = (taken, res, rho)
                    if switch or trial is not None:
                        switched_at = rho
                        # Restart from the best iterate: after growth the current one is worse.
                        if mon.best_z is not z:
                            z = mon.best_z
                            r = residual(z)
                        # With a check every step, the check also tells whether the residual
                        # norms lie where Anderson's Gram matrix needs no rescaling.
                        finfo = torch.finfo(z.dtype)
                        mon.safe = (finfo.tiny**0.25, finfo.max**0.25)
                    ref_res, ref_k = res.clamp_min(tiny), k
                    host_res = mon.host_res if mon.last_res is not None else None
                    ref_host = None if host_res is None else np.maximum(host_res, tiny)
            if trial is not None and taken - trial[0] >= TRIAL_STEPS and mon.k % mon.check_every == 0:
                if not self._keep_anderson(mon, r, trial, taken, tiny):
                    # Back to plain iteration, from the best iterate, for the rest of the solve.
                    switched_at = None
                    history.clear()
                    mon.safe = None
                    z = mon.best_z
                    if plain:
                        fz, r = map_and_residual(fmap, z)
                    else:
                        r = residual(z)
                    k = taken
                    ref_res, ref_k = _norm(r).unsqueeze(-1).clamp_min(tiny), k
                    ref_host = None
                trial = None
            if switched_at is None and graphs is not None:
                w = chunks(taken)
                # views of the window buffers: read at the next check, before the next chunk
                z, r = chunks.latest
                k += w
                taken += w
                continue
            if switched_at is None:
                if plain:
                    z, fz, r = picard_step(fmap, fz)
                else:
                    z, r = damped_step(residual, z, r, 1.0)
                k += 1
            else:
                rescale = mon.check_every != 1 or not mon.res_in_safe_range
                z = history.step(z, r, ones, reg, rescale)
                r = residual(z)
            mon.record(z, r)
            taken += 1
        z, info = mon.finish()
        if switched_at is None:
            info.solver = "Adaptive (Picard; Anderson tried)" if tried else "Adaptive (Picard)"
            steps = info.steps.clamp_min(1).to(info.residual.dtype)
            ratio = info.residual / res0.squeeze(-1).clamp_min(tiny)
            info.contraction = torch.where(info.steps > 0, ratio ** (1 / steps), 0.0)
        else:
            info.solver = "Adaptive (Picard, then Anderson)"
            info.accelerated = True
            info.contraction = torch.full_like(info.residual, switched_at)
        return z, info

    def _switch(self, worst: float, rho: float, needed: float, left: int) -> bool:
        """The switch rule, asked at the checks: a residual grew (``worst``, the largest ratio
        of residual norms since the last look, above 1), the contraction ``rho`` is slow, or
        plain iteration at that rate would need more steps (``needed``) than the ``left``
        steps of the budget."""
        return worst > 1.0 or rho > self.switch_ratio or needed > left

    @staticmethod
    def _try(needed: float) -> bool:
        """Whether plain iteration, not switched, tries Anderson for ``TRIAL_STEPS`` steps:
        when it would need more than ``TRY_ANDERSON_AFTER`` further steps (``needed``, NaN
        when unknown)."""
        return needed > TRY_ANDERSON_AFTER

    @staticmethod
    def _keep_anderson(
        mon: WindowMonitor, r: Tensor, trial: tuple[int, Tensor, float], taken: int, tiny: float
    ) -> bool:
        """Whether Anderson on trial contracted faster per unit of work than plain iteration:
        ``rho_A^(1 / ANDERSON_COST) < rho_plain`` for the worst sample not done."""
        start, res_start, rho_plain = trial
        ratio = (_norm(r).unsqueeze(-1) / res_start.clamp_min(tiny)).masked_fill(mon.done, 0.0)
        rho_anderson = float(ratio.max()) ** (1.0 / max(taken - start, 1))
        return rho_anderson ** (1.0 / ANDERSON_COST) < rho_plain

    def adjoint_solver(self, info: SolveInfo | None) -> LinearSolver | None:
        """The linear solver of the adjoint system chosen from what the forward observed
        (``None``: no observation, the caller's default applies)."""
        rho_t = getattr(info, "contraction", None)
        if rho_t is None or rho_t.numel() == 0:
            return None
        rho = float(rho_t.max())
        if not rho <= self.switch_ratio or info is None or info.accelerated:
            return GMRES(cuda_graph=self.cuda_graph)
        terms = _neumann_terms(rho, self.resolved_rtol(info.residual.dtype))
        return NeumannThenGMRES(terms, cuda_graph=self.cuda_graph)


def _neumann_terms(rho: float, rtol: float) -> int:
    """Twice the terms a series contracting by ``rho`` needs to gain ``rtol``, plus slack for
    the transient."""
    if rho <= 0.0:
        return 10
    return 2 * math.ceil(math.log(max(rtol, 1e-300)) / math.log(min(rho, 1 - 1e-12))) + 10


def _contraction_test(
    mon: WindowMonitor, z: Tensor, r: Tensor, ref_res: Tensor, budget: bool, span: int,
    tiny: float,
) -> Callable[[], list[Tensor]]:
    """The values Adaptive's switch rule reads at a check, as a :attr:`WindowMonitor.extra`
    callback (it runs after the check's bookkeeping, so ``mon.done`` is current): the largest
    ratio of residual norms over ``span`` plain steps among the samples not done, and, with
    ``budget``, the most steps plain iteration would still need at that rate to reach the
    tolerances. The norms and tolerances of the iterate ``z`` (residual ``r``) are the ones
    the check just computed, when it judged that iterate."""

    def values() -> list[Tensor]:
        res = mon.last_res if mon.last_res is not None else _norm(r).unsqueeze(-1)
        tol = None
        if budget:
            tol = mon.last_tol if mon.last_tol is not None else (
                mon._tol(_norm(z).unsqueeze(-1)) if mon.relative_to_z else mon.tol0
            )
        ratio = (res / ref_res).masked_fill(mon.done, 0.0)
        if tol is None:
            return [ratio.max()]
        need = torch.log(tol / res) / torch.log(ratio) * span
        return [ratio.max(), need.masked_fill(mon.done, 0.0).max()]

    return values


def _host_contraction_test(
    ref: np.ndarray, budget: bool, span: int
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], list[float]]:
    """:func:`_contraction_test` for a check judged on the host (a
    :attr:`WindowMonitor.host_extra`): the same values by the same float operations, from the
    ``(B,)`` residual norms, tolerances and done flags the check formed there, and the
    reference norms ``ref`` ``(B,)`` (floored)."""

    def values(res: np.ndarray, tol: np.ndarray, done: np.ndarray) -> list[float]:
        with np.errstate(all="ignore"):  # as on the device: log(0), 0 / 0 give -inf, NaN
            ratio = np.where(done, 0.0, res / ref)
            if not budget:
                return [float(ratio.max())]
            need = np.log(tol / res) / np.log(ratio) * span
        return [float(ratio.max()), float(np.where(done, 0.0, need).max())]

    return values
