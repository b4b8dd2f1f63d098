"""A convergence monitor that does its per-sample bookkeeping only at the checks.

:class:`Monitor` updates tolerances, done flags, step counts and the best iterate after every
step (about twenty small ops, each a kernel launch on a GPU). :class:`WindowMonitor` gives the
same answers with no work per step: the solver hands it each new iterate and residual, which it
keeps (references, no copies) until the next check; the check then judges the whole window at
once with :func:`judge_window`. Samples keep iterating after they converge (their map values
are computed anyway, as the map runs on the whole batch); the monitor ignores every iterate of
a sample after its first one that met the tolerance, so the returned iterate, the step counts
and the verdicts equal a loop that froze each sample the moment it converged.

Solvers that use it must treat samples independently (every batched problem does), and accept
that a converged sample's later iterates may be anything (even NaN): they are never returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import numpy as np
import torch
from torch import Tensor

from .._cuda_graph import Chunk, ChunkGraphs
from .._info import SolveInfo
from .._problem import Problem
from ..linear._loop import from_host, to_host
from ._base import ForwardBookkeeping, ForwardSolver, _norm

__all__ = ["WindowMonitor", "judge_window", "ChunkAdvance"]


def judge_window(
    res: Tensor, tol: Tensor, done: Tensor, best_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The per-step bookkeeping of a window of ``W`` steps, replayed at once (no host sync).

    Step ``j`` of a sample counts while the sample is alive (not done before the window, and
    no earlier step of the window met its tolerance). An alive step becomes the sample's best
    iterate when its residual is at most the lowest seen so far, or when it meets its
    tolerance; the last such step wins, as in a step-by-step loop.

    Args:
        res: residual norms of the window's iterates, shape ``(B, W)``.
        tol: their tolerances, ``(B, W)`` (or ``(B, 1)``: the same for every step).
        done: samples done before the window, ``(B, 1)`` bool.
        best_res: lowest residual before the window, ``(B, 1)``.

    Returns:
        ``(pick, met, dead, chosen_any, worst)``: ``pick`` ``(B, 1)`` int64, the index in the
        window of each sample's new best iterate (valid where ``chosen_any``, ``(B, 1)``
        bool); ``met`` and ``dead`` (the steps that do not count) ``(B, W)`` bool; ``worst``,
        a 0-dim tensor that is finite exactly when every alive residual is.
    """
    met = res <= tol
    # dead: done before, or an earlier step of the window met the tolerance
    dead = (torch.cumsum(met, dim=-1) + done) > met
    masked = res.masked_fill(dead, torch.inf)
    low = torch.minimum(masked.amin(-1, keepdim=True), best_res)
    chosen = (masked <= low) | (met > dead)
    top = (chosen * _arange(res.shape[-1], res.device, 1)).amax(-1, keepdim=True)
    worst = res.masked_fill(dead, 0.0).amax()
    return (top - 1).clamp_min(0), met, dead, top > 0, worst


_ARANGE: dict[tuple[int, torch.device, int], Tensor] = {}


def _arange(n: int, device: torch.device, start: int = 0) -> Tensor:
    """``arange(start, start + n)`` on ``device``, made once (the loops reuse it)."""
    key = (n, device, start)
    out = _ARANGE.get(key)
    if out is None:
        if len(_ARANGE) > 64:
            _ARANGE.clear()
        out = _ARANGE[key] = torch.arange(start, start + n, device=device)
    return out


class WindowMonitor(ForwardBookkeeping):
    """Per-sample bookkeeping of a forward solve, done only at the convergence checks.

    Same contract as :class:`~implicit_layers.solvers.base.Monitor` (tolerance, per-sample
    verdicts, step counts, the lowest-residual iterate or the first that met its tolerance),
    with no ops between checks: :meth:`record` only keeps references to the iterate and its
    residual. Samples are not frozen when they converge: the solver keeps stepping the whole
    batch (no masks) and the monitor ignores what a sample does after converging.

    Args:
        solver: the solver (its tolerances, ``check_every`` and name).
        problem: the problem (its kind decides the tolerance, see ``ForwardSolver``).
        z0: the initial iterate ``(B, n)``.
        r0: its residual ``(B, n)``.
        safe: ``(low, high)``: with ``check_every=1``, each check also tells (in the same
            synchronisation) whether every residual norm lies in this range, as
            :attr:`res_in_safe_range`.
    """

    def __init__(
        self, solver: ForwardSolver, problem: Problem, z0: Tensor, r0: Tensor,
        safe: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(solver, problem, z0, r0, keepdim=True)
        # Per-sample state as (B, 1) columns: they broadcast against a window's (B, W). The
        # step counts are kept on the host (no op per step) until :attr:`steps` is read:
        # ``_steps`` the device's counts (``None`` before the first read), ``_uniform_steps``
        # the steps since, for every sample (an int) or per sample (an array).
        self._steps: Tensor | None = None
        self._uniform_steps: int | np.ndarray = 0
        # The first check judges the initial iterate on the host; its done flags and
        # tolerances are not formed on the device before.
        self._initial = True
        self._zs: list[Tensor] = []
        self._rs: list[Tensor] = []
        self._dead: Tensor | None = None
        self.safe = safe
        #: From the last one-step check with ``safe`` given: every residual norm in range.
        self.res_in_safe_range = False
        self._window_res: Tensor | None = None
        #: Called at each check after the bookkeeping: 0-dim float tensors that travel to the
        #: host in the check's one synchronisation (a solver's own test of the iterates); their
        #: values land in :attr:`extra_values`.
        self.extra: Callable[[], list[Tensor]] | None = None
        #: The same values computed on the host, for a check judged there: called with the
        #: ``(B,)`` residual norms, tolerances and done flags of the latest iterate (after the
        #: bookkeeping) as NumPy arrays. A check with :attr:`extra` set and no
        #: ``host_extra`` is judged on the device.
        self.host_extra: Callable[[np.ndarray, np.ndarray, np.ndarray], list[float]] | None = None
        self.extra_values: list[float] = []
        #: After a check judged on the host: the ``(B,)`` residual norms it read (of the
        #: latest iterate, or of the initial one at the first check); ``None`` otherwise.
        self.host_res: np.ndarray | None = None
        self._host_norms: np.ndarray | None = None  # the norms column of the last read
        self._stacked: tuple[Tensor, Tensor] | None = None
        # Whether a check has judged every recorded iterate (then finish() needs no check),
        # and whether that check found every sample done (then every sample converged: its
        # best iterate is the first that met its tolerance).
        self._judged = False
        self._all_done = False
        #: At a check with iterates to judge (while :attr:`extra` runs): the ``(B, 1)``
        #: residual norms of the latest iterate; ``None`` otherwise.
        self.last_res: Tensor | None = None
        self._last_tol: Tensor | None = None
        self._last_znorm: Tensor | None = None

    @property
    def steps(self) -> Tensor:
        """Per-sample step counts ``(B, 1)``."""
        pending = self._uniform_steps
        if self._steps is None:
            self._steps = from_host(np.zeros((self.res.shape[0], 1), np.int64) + pending, self.res)
        elif isinstance(pending, np.ndarray):  # counted per sample on the host
            self._steps = self._steps + from_host(pending, self._steps)
        elif pending:
            self._steps = self._steps + pending
        self._uniform_steps = 0
        return self._steps

    @steps.setter
    def steps(self, value: Tensor) -> None:
        self._steps, self._uniform_steps = value, 0

    def record(self, z: Tensor, r: Tensor) -> None:
        """Register the new iterate ``z`` (every sample stepped) and its residual ``r``."""
        self._zs.append(z)
        self._rs.append(r)
        self._judged = False

    def record_window(self, Z: Tensor, R: Tensor) -> None:
        """Register a whole window of ``W`` steps at once (a chunk replayed from a CUDA graph):
        iterates ``Z`` and residuals ``R`` of shape ``(B, W, n)``, judged at the next
        :meth:`stop`, which then is a check (the ``W - 1`` calls of :meth:`stop` between the
        steps are accounted for). The monitor keeps no reference to them past that check."""
        if self._zs:
            raise RuntimeError("record_window after record: a window is one or the other")
        self._stacked = (Z, R)
        self._judged = False
        self.k += Z.shape[1] - 1

    def _judge_one(self) -> list[bool]:
        """A window of one step (``check_every=1``, the CPU default): the step-by-step rule
        with one synchronisation, and no masks while no sample is done."""
        z, r = self._zs[0], self._rs[0]
        self._zs, self._rs = [], []
        res = _norm(r, keepdim=True)
        znorm = _norm(z, keepdim=True) if self.relative_to_z else None
        if self.extra is None or self.host_extra is not None:
            return self._judge_one_on_host(z, res, znorm)
        tol = self._tol(znorm) if znorm is not None else self.tol0
        self.last_res, self.last_tol = res, tol
        met = res <= tol
        if self.all_active:
            self.res, self.done = res, met
            # An iterate that meets its tolerance is kept even if an earlier one had a lower
            # residual: better = lower | met. The check counts ``lower`` alone; only when some
            # sample is not lower does the masked path need the full flag.
            lower = res <= self.best_res
            all_done, finite, any_done, all_lower, *rest = self._count_flags(met, res, lower)
            self._uniform_steps += 1
            if all_lower:
                # On the CPU a synchronisation is cheaper than a masked copy of the iterate.
                self.best_z, self.best_res, self.best_tol = z, res, tol
            else:
                self._take_better(z, res, tol, lower | met)
        else:
            alive = ~self.done
            better = alive & ((res <= self.best_res) | met)
            self.steps = self.steps + alive
            self._take_better(z, res, tol, better)
            self.res = torch.where(alive, res, self.res)
            self.done = self.done | met
            all_done, finite, any_done, *rest = self._count_flags(self.done, self.res)
        self.all_active = not any_done
        self._dead = None
        if rest:
            self.res_in_safe_range = bool(rest[0])
        return [all_done, finite]

    def _judge_initial(self) -> list[bool]:
        """The first check, of the initial iterate, on the host (one read of its residual
        norms, norms and tolerance floors; the done flags formed there)."""
        znorm = self._znorm0
        columns = [self.res] if znorm is None else [self.res, znorm]
        host = to_host(torch.cat(columns + [self.tol0], dim=-1))
        res_h, floor_h = host[:, 0], host[:, -1]
        tol_h = self._tol_host(None if znorm is None else host[:, 1], floor_h)
        done_h = res_h <= tol_h
        self.done = from_host(done_h[:, None], self.res)
        self.all_active = not done_h.any()
        self.host_res = res_h
        return [bool(done_h.all()), bool(np.isfinite(res_h).all())]

    def _tol_host(self, znorm: np.ndarray | None, floor: np.ndarray) -> np.ndarray:
        """:meth:`_tol` on the host, by the same float operations: the tolerances of iterates
        of norms ``znorm`` (``None``: not relative to the iterate) over the floors ``floor``."""
        return floor if znorm is None else np.maximum(znorm * znorm.dtype.type(self.rtol), floor)

    def _take_better(
        self, z: Tensor, res: Tensor, tol: Tensor | None, better: Tensor, znorm: Tensor | None = None
    ) -> None:
        """The new best iterate where ``better`` ``(B, 1)``, with its residual norm and its
        tolerance ``tol`` (``None``: formed from the iterate's norms ``znorm``; while the best
        tolerances are still to be formed from norms, the norms are taken instead)."""
        self.best_z = torch.where(better, z, self.best_z)
        self.best_res = torch.where(better, res, self.best_res)
        if tol is None and znorm is not None and self._best_tol is None:
            self._best_znorm = torch.where(better, znorm, self._best_znorm)
        else:
            tol = self._latest_tol(znorm) if tol is None else tol
            self.best_tol = torch.where(better, tol, self.best_tol)

    def _judge_one_on_host(self, z: Tensor, res: Tensor, znorm: Tensor | None) -> list[bool]:
        """:meth:`_judge_one` on the host: the columns the rule reads (the residual norms, the
        iterate's norms, the tolerance floors, the lowest residuals so far; once some sample
        is done, also the done flags and the norms they froze) travel to the host in the
        check's one synchronisation, where the tolerances, verdicts and flags are formed by
        the same float operations as on the device (IEEE multiply, max and comparisons give
        the same bits). Between the norms and the read the device runs one op (the columns'
        ``cat``) instead of the tolerance's multiply and clamp, the comparisons and the
        counts; the device's per-sample state is updated only where the flags are mixed (a
        check or two per solve), the step counts on the host."""
        masked = not self.all_active
        columns = [res] if znorm is None else [res, znorm]
        columns += [self.tol0, self.best_res]
        if masked:
            columns += [self.done, self.res]
        host = to_host(torch.cat(columns, dim=-1))
        res_h, best_h = host[:, 0], host[:, 3 if znorm is not None else 2]
        floor_h = host[:, 2 if znorm is not None else 1]
        tol_h = self._tol_host(None if znorm is None else host[:, 1], floor_h)
        met_h = res_h <= tol_h
        better_h = (res_h <= best_h) | met_h
        self.last_res, self._last_znorm, self._last_tol = res, znorm, None
        if masked:
            alive_h = host[:, -2] == 0
            better_h &= alive_h
            done_h = ~alive_h | met_h
            self._uniform_steps = self._uniform_steps + alive_h[:, None].astype(np.int64)
            res_h = np.where(alive_h, res_h, host[:, -1])  # the norms that count
            self.res = res if alive_h.all() else torch.where(from_host(alive_h[:, None], res), res, self.res)
        else:
            done_h = met_h
            self._uniform_steps += 1
            self.res = res
        any_done = bool(done_h.any())
        if any_done:  # the device's flags (all False until now)
            self.done = from_host(done_h[:, None], res)
        if better_h.all():
            self.best_z, self.best_res = z, res
            self._best_tol_from(znorm)
        elif better_h.any():
            self._take_better(z, res, None, from_host(better_h[:, None], res), znorm)
        self.all_active = not any_done
        self._dead = None
        self.host_res = res_h
        if self.host_extra is not None:
            self.extra_values = self.host_extra(res_h, tol_h, done_h)
        if self.safe is not None:
            self.res_in_safe_range = bool(((res_h >= self.safe[0]) & (res_h <= self.safe[1])).all())
        return [bool(done_h.all()), bool(np.isfinite(res_h).all())]

    @property
    def last_tol(self) -> Tensor | None:
        """At a check with iterates to judge (while :attr:`extra` runs): the ``(B, 1)``
        tolerances of the latest iterate (formed when read, after a check on the host);
        ``None`` otherwise."""
        if self._last_tol is None and self.last_res is not None:
            return self._latest_tol(self._last_znorm)
        return self._last_tol

    @last_tol.setter
    def last_tol(self, value: Tensor | None) -> None:
        self._last_tol, self._last_znorm = value, None

    def _latest_tol(self, znorm: Tensor | None) -> Tensor:
        """The latest iterate's tolerances from its norms (formed once per check)."""
        if self._last_tol is None:
            self._last_tol = self._tol(znorm) if znorm is not None else self.tol0
        return self._last_tol

    def _count_flags(
        self, met: Tensor, res: Tensor, better: Tensor | None = None, safe: bool = True
    ) -> list[bool]:
        """``[met.all(), res finite, met.any()]`` (then ``better.all()`` if ``better`` is
        given, and, with ``safe``, the range test of :attr:`safe` when it is set), counted on
        the host from one read of the per-sample ``(B, 1)`` columns (with the solver's
        :attr:`extra` values): one ``cat`` and one synchronisation instead of a reduction per
        flag."""
        columns = [met]
        if better is not None:
            columns.append(better)
        if safe and self.safe is not None:
            columns.append((res >= self.safe[0]) & (res <= self.safe[1]))
        columns.append(res)
        stacked = torch.cat(columns, dim=-1)  # promoted to the norms' dtype
        extra = self.extra() if self.extra is not None else []
        batch = met.shape[0]
        if extra:
            flat = to_host(torch.cat((stacked.view(-1), torch.stack(extra).to(stacked.dtype))))
            n = stacked.numel()
            host, self.extra_values = flat[:n].reshape(stacked.shape), flat[n:].tolist()
        else:
            host = to_host(stacked)
        self._host_norms = host[:, -1]
        counts = host[:, :-1].sum(0)
        finite = bool(np.isfinite(self._host_norms).all())
        return [counts[0] == batch, finite, counts[0] > 0] + [c == batch for c in counts[1:]]

    def _flush(self, flags: list[Tensor]) -> list:
        """``flags`` and the solver's :attr:`extra` values in one synchronisation."""
        extra = self.extra() if self.extra is not None else []
        if not extra:
            return torch.stack(flags).tolist()
        wide = extra[0].dtype
        if all(f.dtype == wide for f in flags):
            values = torch.stack(flags + extra).tolist()
        else:
            values = torch.cat((torch.stack(flags).to(wide), torch.stack(extra))).tolist()
        self.extra_values = values[len(flags):]
        return values[: len(flags)]

    def _judge(self) -> list[bool]:
        """Fold the window into the bookkeeping; one synchronisation for
        ``[all samples done, every alive residual finite]``."""
        if self._stacked is not None:
            (Z, R), self._stacked = self._stacked, None
        else:
            zs, rs = self._zs, self._rs
            self._zs, self._rs = [], []
            Z, R = torch.stack(zs, dim=1), torch.stack(rs, dim=1)
        res = _norm(R)
        tol = self._tol(_norm(Z)) if self.relative_to_z else self.tol0
        self.last_res, self.last_tol = res[..., -1:], tol[..., -1:]
        pick, met, dead, chosen, worst = judge_window(res, tol, self.done, self.best_res)
        self.best_res = torch.where(chosen, res.gather(-1, pick), self.best_res)
        self.best_tol = torch.where(
            chosen, tol.gather(-1, pick) if tol.shape[-1] > 1 else tol, self.best_tol
        )
        rows = _arange(Z.shape[0], Z.device)
        self.best_z = torch.where(chosen, Z[rows, pick.squeeze(-1)], self.best_z)
        self.steps = self.steps + (res.shape[-1] - dead.sum(-1, keepdim=True))
        self.done = self.done | met.any(-1, keepdim=True)
        self._dead, self._window_res = dead, res
        self.all_active = False  # not known without another flag; the masked path is exact
        # one synchronisation; a NaN or Inf in `worst` means an alive residual was not finite
        all_done, worst_v = self._flush([self.done.all().to(worst.dtype), worst])
        return [bool(all_done), math.isfinite(worst_v)]

    def stop(self, force: bool = False) -> bool:
        """Every ``check_every`` steps (or if ``force``): True when all samples are done.

        The only host synchronisation of the loop. Raises
        :class:`~implicit_layers.NonFiniteError` when a sample that has not converged has a
        NaN or Inf residual.
        """
        due = force or self.check_due()
        self.k += 1
        if not due:
            return False
        self.last_res = self.last_tol = None
        self.host_res = None
        if self._stacked is not None:
            flags = self._judge()
        elif self._initial and not self._zs and (self.extra is None or self.host_extra is not None):
            flags = self._judge_initial()
        elif not self._zs:
            if self._initial:
                self._initial_verdict()
            flags = self._count_flags(self.done, self.res, safe=False)
            self.all_active = not flags[2]
            self.host_res = self._host_norms
        elif len(self._zs) == 1:
            flags = self._judge_one()
        else:
            flags = self._judge()
        self._initial = False
        if not flags[1]:
            self._raise_non_finite(self._non_finite_samples())
        self._judged, self._all_done = True, bool(flags[0])
        return self._all_done

    def _non_finite_samples(self) -> Tensor:
        """The samples with a NaN or Inf residual that counts (bool ``(B,)``)."""
        if self._dead is not None and self._window_res is not None:
            return (~self._dead & ~torch.isfinite(self._window_res)).any(-1)
        return ~torch.isfinite(self.res).squeeze(-1)

    def finish(self) -> tuple[Tensor, SolveInfo]:
        """Judge the last window (unless the last check judged every iterate) and return the
        best iterate and the info."""
        if not self._judged:
            self.stop(force=True)
        return self._best(self._all_done)


class ChunkAdvance:
    """The ``advance`` of :meth:`~ForwardBookkeeping.iterate` that runs a chunk of
    ``check_every`` steps (``cuda_graph=True``) and hands its window to the monitor.

    The loop checks where the step-by-step loop checks; the last chunk is shorter when
    ``max_steps`` is not a multiple of ``check_every``.

    Args:
        mon: the monitor (its ``check_every`` is the chunk length ``W``).
        graphs: the chunk runner.
        max_steps: the step budget.
        chunk_of: ``chunk_of(w, taken) -> (key, chunk, graph)``: the chunk of the next ``w``
            steps after ``taken`` steps, and whether to record it as a graph.
        state: the loop's initial state; its last two entries are the window buffers ``Z``
            and ``R`` ``(B, W, n)``, where a chunk of ``w`` steps writes its iterates and
            residuals into the first ``w`` columns.
    """

    def __init__(
        self, mon: WindowMonitor, graphs: ChunkGraphs, max_steps: int,
        chunk_of: Callable[[int, int], tuple[Hashable, Chunk, bool]], state: tuple[Tensor, ...],
    ) -> None:
        self.mon, self.graphs, self.max_steps, self.chunk_of = mon, graphs, max_steps, chunk_of
        self.state = state
        self.w = 0

    def __call__(self, taken: int) -> int:
        """Run the chunk that follows ``taken`` steps; returns its length."""
        w = self.w = min(self.mon.check_every, self.max_steps - taken)
        key, chunk, graph = self.chunk_of(w, taken)
        self.state = self.graphs.run(key, chunk, self.state, graph=graph)
        self.mon.record_window(self.state[-2][:, :w], self.state[-1][:, :w])
        return w

    @property
    def latest(self) -> tuple[Tensor, Tensor]:
        """The last chunk's last iterate and residual ``(B, n)``: views of the window
        buffers, valid until the next chunk."""
        return self.state[-2][:, self.w - 1], self.state[-1][:, self.w - 1]
