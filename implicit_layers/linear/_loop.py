"""The bookkeeping of solver loops: :class:`Bookkeeping`, the base shared by the forward
solvers' monitors (:class:`~implicit_layers.solvers.base.Monitor`,
:class:`~implicit_layers.solvers.base.WindowMonitor`) and the linear solvers'
:class:`LinearLoop`, and its one host synchronisation per check."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .._config import default_check_every
from .._info import NonFiniteError, SolveInfo

if TYPE_CHECKING:
    from ._base import LinearSolver

__all__ = [
    "Bookkeeping", "sync_flags", "to_host", "from_host", "wide_dtype",
    "LinearLoop", "check_done", "check_active", "first_product", "autograd_records", "records",
]


class Bookkeeping:
    """What every solver loop keeps besides its iterates, forward and linear: the solver's
    name, the check schedule and the result.

    A loop counts its steps in :attr:`k` and checks convergence (one host synchronisation, e.g.
    :func:`sync_flags`) before a step when :meth:`check_due`: every ``check_every`` steps,
    starting with the first, so that a GPU runs ``check_every`` steps ahead of the host. The
    subclasses hold the per-sample state (tolerances, done flags, step counts) and the stopping
    rule: :class:`LinearLoop` for the linear solvers, :class:`~implicit_layers.solvers.base.Monitor`
    (step by step) and :class:`~implicit_layers.solvers.base.WindowMonitor` (at the checks
    only) for the forward solvers.

    Args:
        name: the solver's name, for messages and :attr:`SolveInfo.solver`.
        check_every: steps between two checks; ``None``: every step on the CPU, every 8 on
            accelerators.
        device: the device of the iterates.

    Attributes:
        name: as given.
        check_every: the resolved ``check_every``.
        k: steps the batch has taken.
        all_active: ``True`` when the last check found no sample done (until the loop's next
            per-sample update): a step may then skip its per-sample masks.
    """

    def __init__(self, name: str, check_every: int | None, device: torch.device) -> None:
        self.name = name
        self.check_every = check_every or default_check_every(device)
        self.k = 0
        self.all_active = False

    def check_due(self) -> bool:
        """Whether a check comes before the step numbered :attr:`k` (counting from 0)."""
        return self.k % self.check_every == 0

    def result(
        self, converged: Tensor, steps: Tensor, residual: Tensor, tolerance: Tensor
    ) -> SolveInfo:
        """The :class:`~implicit_layers.SolveInfo` of the solve, fields of shape ``(B,)``."""
        return SolveInfo(
            converged=converged, steps=steps, residual=residual, solver=self.name,
            tolerance=tolerance,
        )


def wide_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the bookkeeping's norms, counts and tolerances for tensors like ``x``:
    float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def to_host(t: Tensor) -> np.ndarray:
    """``t``'s values on the host, as a NumPy array: a check's one synchronisation (a copy on
    an accelerator, none on the CPU). A check that reads per-sample columns and forms its
    flags on the host runs no reduction on the device; reading a few thousand values costs
    less than launching the ops (and on the CPU, less than running them)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return np.array(t.tolist())  # a torch.func wrapper has no storage of its own to read
    if t.requires_grad:
        t = t.detach()
    if t.is_floating_point() and t.dtype not in _NUMPY_FLOATS:
        t = t.float()  # bfloat16, float8: NumPy has no such dtype (float32 holds them exactly)
    return t.cpu().numpy()


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def from_host(a: np.ndarray, like: Tensor) -> Tensor:
    """A host array (flags or counts a check formed there) as a tensor on ``like``'s device
    (a copy on an accelerator, none on the CPU)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)


def sync_flags(done: Tensor, watch: Tensor) -> list[bool]:
    """One synchronisation: ``[all samples done, every watched value finite, any sample
    done]``.

    Args:
        done: per-sample flags, bool ``(B,)``.
        watch: per-sample values tested for NaN and Inf (any shape).

    Returns:
        The three answers as Python bools.
    """
    n = _count_if_finite(done, watch)
    if math.isnan(n):
        return [False, False, False]
    return [n == done.numel(), True, n > 0]


def _count_if_finite(flags: Tensor, watch: Tensor) -> float:
    """The number of nonzero ``flags`` (bool or a 0/1 float mask), or NaN when some entry of
    ``watch`` is NaN or Inf, in one synchronisation instead of a reduction per answer. With a
    ``watch`` of the flags' shape, both are read at once and counted and tested on the host;
    otherwise the count and the largest watched magnitude travel together."""
    wide = wide_dtype(watch)
    if watch.shape == flags.shape:
        # one read of both, counted and tested on the host
        host = to_host(torch.stack((flags, watch)))
        return float(np.count_nonzero(host[0])) if np.isfinite(host[1]).all() else math.nan
    count = torch.count_nonzero(flags).to(wide)
    if watch.numel() == 0:  # nothing to test (an infinity norm has no empty value)
        return count.item()
    # the infinity norm is NaN or Inf exactly when some entry is
    top = torch.linalg.vector_norm(watch, ord=float("inf"), dtype=wide)
    n, top_v = torch.stack([count, top]).tolist()
    return n if math.isfinite(top_v) else math.nan


class LinearLoop(Bookkeeping):
    """Per-sample tolerance, flags and step counts of one linear solve, and its stopping rule.

    A solver builds one from its settings and the right-hand side, then calls
    :meth:`proceed` before every step: it counts the batch's steps against ``max_steps`` and,
    every ``check_every`` steps, synchronises with the device once to learn whether every
    sample is ``done`` (and whether the watched residual is finite). The solver updates
    :attr:`done`, :attr:`bad` and :attr:`steps` as its samples progress and ends with
    :meth:`info`. Nothing else synchronises, so a GPU runs ``check_every`` steps ahead.

    Args:
        solver: the solver whose ``rtol``, ``atol``, ``max_steps``, ``check_every`` and
            ``name`` apply.
        b: the right-hand side, shape ``(B, n)``.
        residual: the initial residual norms ``(B,)``; samples already within tolerance start
            ``done``. ``None``: no sample starts done.

    Attributes:
        tol: per-sample tolerance ``max(atol, rtol ‖b‖)``, shape ``(B,)``.
        done: samples that take no more steps, shape ``(B,)`` (the solver keeps it current).
        bad: samples stopped without converging (breakdown, stagnation, negative curvature).
        steps: steps each sample took, int64 ``(B,)``.
        k: steps the batch has taken (calls of :meth:`proceed` that returned ``True``).
        all_active: ``True`` during a step that directly follows a check that found no sample
            done: the step may then skip its per-sample masks.

    Examples:
        Richardson iteration ``x ← x + r / 4`` on ``2 x = b``, one loop step per iteration:

        >>> from implicit_layers.linear.base import LinearLoop
        >>> b = torch.ones(3, 2, dtype=torch.float64)
        >>> x, r = torch.zeros_like(b), b.clone()
        >>> res = torch.linalg.vector_norm(r, dim=-1)
        >>> loop = LinearLoop(il.linear.Neumann(rtol=1e-8), b, res)
        >>> while loop.proceed(res):
        ...     active = ~loop.done
        ...     x = torch.where(active.unsqueeze(-1), x + r / 4, x)  # done samples stay put
        ...     r = b - 2 * x
        ...     loop.steps = loop.steps + active.long()
        ...     res = torch.linalg.vector_norm(r, dim=-1)
        ...     loop.done = loop.done | (res <= loop.tol)
        >>> info = loop.info(res)
        >>> info.converged, info.steps
        (tensor([True, True, True]), tensor([27, 27, 27]))
    """

    def __init__(self, solver: LinearSolver, b: Tensor, residual: Tensor | None = None) -> None:
        super().__init__(solver.name, solver.check_every, b.device)
        self.max_steps = solver.max_steps
        bnorm = torch.linalg.vector_norm(b, dim=-1)
        self.tol = torch.clamp(solver.resolved_rtol(b.dtype) * bnorm, min=solver.atol)
        batch = b.shape[0]
        self.done = (
            torch.zeros(batch, dtype=torch.bool, device=b.device) if residual is None
            else residual <= self.tol
        )
        self._bad: Tensor | None = None  # made when first read (no sample stopped till then)
        self.steps = torch.zeros(batch, dtype=torch.int64, device=b.device)
        self._inplace: bool | None = None
        self._stopped_at_check = False
        self._host_tol: np.ndarray | None = None  # read by proceed_above's first check

    def proceed(
        self, watch: Tensor, *, done: Tensor | None = None, active: Tensor | None = None,
        check: bool = True, finite: bool = True,
    ) -> bool:
        """Whether the batch takes another step; call it once before each step.

        Args:
            watch: the per-sample residual (or its square) tested for NaN and Inf at a check.
            done: the flags tested instead of :attr:`done` (an inner loop's own).
            active: the complement of ``done`` (nonzero: still stepping; bool or a float
                mask), tested instead; costs nothing at the steps without a check.
            check: ``False`` skips the check this step (the caller has just made one).
            finite: ``False`` skips the finiteness test at the checks (for a solver whose
                samples stop by themselves on NaN); :meth:`info` still makes it once.

        Returns:
            ``False`` once ``max_steps`` steps were taken, or when a check finds every sample
                done; else ``True``.

        Raises:
            implicit_layers.NonFiniteError: when a check finds ``watch`` not finite.
        """
        self.all_active = False
        if self.k >= self.max_steps:
            return False
        if check and self.check_due():
            if active is not None:
                all_done, any_done = check_active(active, watch if finite else None, self.name)
            else:
                flags = self.done if done is None else done
                if finite:
                    all_done, any_done = check_done(flags, watch, self.name)
                else:
                    # One synchronisation for both answers (count_nonzero is cheaper than a sum).
                    n_done = int(torch.count_nonzero(flags))
                    all_done, any_done = n_done == flags.numel(), n_done > 0
            if all_done:
                self._stopped_at_check = finite
                return False
            self.all_active = not any_done
        self.k += 1
        return True

    @property
    def bad(self) -> Tensor:
        """Samples stopped without converging, bool ``(B,)``."""
        if self._bad is None:
            self._bad = torch.zeros_like(self.done)
        return self._bad

    @bad.setter
    def bad(self, value: Tensor) -> None:
        self._bad = value

    @property
    def bad_if_any(self) -> Tensor | None:
        """:attr:`bad`, or ``None`` while no sample was stopped (and nothing read it)."""
        return self._bad

    def proceed_above(self, res: Tensor, tol: Tensor) -> bool:
        """:meth:`proceed` for a loop whose samples step while their residual norm is above
        the tolerance (active exactly where ``res > tol``), judged on the host: a check reads
        the norms (the tolerances too, at the first check) and counts there, with no op on
        the device besides the read.

        Args:
            res: the residual norms ``(B, 1)``.
            tol: the tolerances ``(B, 1)``, the same at every call.

        Returns:
            As :meth:`proceed`.

        Raises:
            implicit_layers.NonFiniteError: when a check finds a norm NaN or Inf.
        """
        self.all_active = False
        if self.k >= self.max_steps:
            return False
        if self.check_due():
            if self._host_tol is None:
                both = to_host(torch.cat((res, tol), dim=-1))
                res_h, self._host_tol = both[:, 0], both[:, 1]
            else:
                res_h = to_host(res)[:, 0]
            if not np.isfinite(res_h).all():
                _raise_non_finite(self.name)
            active = int(np.count_nonzero(res_h > self._host_tol))
            if active == 0:
                self._stopped_at_check = True
                return False
            self.all_active = active == res_h.shape[0]
        self.k += 1
        return True

    def next_round(self, watch: Tensor) -> bool:
        """For solvers that run in rounds: a check now.

        Args:
            watch: the per-sample residual ``(B,)`` tested for NaN and Inf.

        Returns:
            ``False`` when every sample is done or the step budget is spent, else ``True``.

        Raises:
            implicit_layers.NonFiniteError: if ``watch`` is not finite.
        """
        all_done, _ = check_done(self.done, watch, self.name)
        self._stopped_at_check = all_done or self.k >= self.max_steps
        return not self._stopped_at_check

    def next_round_judged(self, all_done: bool, watch: np.ndarray) -> bool:
        """:meth:`next_round` when the check was made on the host (the flags ``all_done``
        and the values ``watch`` read there).

        Raises:
            implicit_layers.NonFiniteError: if ``watch`` is not finite.
        """
        if not np.isfinite(watch).all():
            _raise_non_finite(self.name)
        self._stopped_at_check = all_done or self.k >= self.max_steps
        return not self._stopped_at_check

    def inplace(self, *tensors: Tensor) -> bool:
        """Whether the solver may update its vectors in place, decided once per solve: yes
        unless autograd records the solve (a differentiable operator or right-hand side, e.g.
        in a double backward), whose graph must keep every saved tensor intact.

        Args:
            *tensors: tensors of the solve (right-hand side, a first product, the iterate);
                only looked at on the first call.

        Returns:
            The decision of the first call.
        """
        if self._inplace is None:
            self._inplace = not (
                torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            )
        return self._inplace

    def info(self, residual: Tensor, watch: Tensor | None = None) -> SolveInfo:
        """The result: converged where ``residual <= tol`` and not ``bad``.

        Args:
            residual: final residual norms, shape ``(B,)``.
            watch: tested for NaN and Inf unless the last check did (default ``residual``).

        Returns:
            The :class:`~implicit_layers.SolveInfo`, fields of shape ``(B,)``.

        Raises:
            implicit_layers.NonFiniteError: if ``watch`` is not finite.
        """
        if not self._stopped_at_check:
            check_done(self.done, residual if watch is None else watch, self.name)
        converged = residual <= self.tol
        if self._bad is not None:
            converged = converged & ~self._bad
        return self.result(converged, self.steps, residual, self.tol)


def check_done(done: Tensor, watch: Tensor, solver: str) -> tuple[bool, bool]:
    """One synchronisation: whether all samples and whether any sample is done.

    Args:
        done: per-sample flags, bool ``(B,)``.
        watch: per-sample values tested for NaN and Inf, ``(B,)``.
        solver: the solver's name, for the error message.

    Returns:
        ``(all done, any done)`` as Python bools.

    Raises:
        implicit_layers.NonFiniteError: if ``watch`` is not finite.

    Examples:
        >>> from implicit_layers.linear.base import check_done
        >>> check_done(torch.tensor([True, False]), torch.tensor([0.0, 1.0]), "CG")
        (False, True)
    """
    all_done, finite, any_done = sync_flags(done, watch)
    if not finite:
        _raise_non_finite(solver)
    return all_done, any_done


def check_active(active: Tensor, watch: Tensor | None, solver: str) -> tuple[bool, bool]:
    """One synchronisation: ``(no sample active, some sample not active)``; raises
    :class:`~implicit_layers.NonFiniteError` if ``watch`` (non-negative norms; ``None``: not
    tested) is not finite.

    Without ``watch``, a batch of up to 4096 samples costs one copy of its flags; with a
    ``watch`` of the flags' shape, one op: flags and values are stacked and read at once, and
    counted and tested on the host.
    """
    n: float
    if watch is None or watch.numel() == 0:
        if active.numel() <= _COPY_FLAGS_UP_TO:
            # A small batch's flags cross to the host in one copy (no count kernel first).
            n = sum(1 for f in _flat(active.tolist()) if f)
        else:
            n = int(torch.count_nonzero(active))
    else:
        n = _count_if_finite(active, watch)
        if math.isnan(n):
            _raise_non_finite(solver)
    return n == 0, n < active.numel()


# Up to this many per-sample flags, a check copies them to the host rather than counting
# them on the device first.
_COPY_FLAGS_UP_TO = 4096


def _flat(nested: object) -> list:
    """The leaves of the nested lists ``Tensor.tolist`` returns."""
    while isinstance(nested, list) and nested and isinstance(nested[0], list):
        nested = [x for row in nested for x in row]
    return nested if isinstance(nested, list) else [nested]


def _raise_non_finite(solver: str) -> None:
    raise NonFiniteError(
        f"{solver}: the residual became NaN or Inf. Check the operator and right-hand side "
        "for NaN, and that the operator suits the solver (e.g. Neumann needs the step size "
        "times the largest eigenvalue below 2)."
    )


class first_product:  # noqa: N801 (used like a function)
    """The operator product ``mv`` whose first call returns ``first`` (computed ahead, e.g. to
    learn whether autograd records the products) instead of computing it again."""

    def __init__(self, mv: Callable[[Tensor], Tensor], first: Tensor) -> None:
        self.mv = mv
        self.first: Tensor | None = first
        self._pending: Tensor | None = first

    def __call__(self, v: Tensor) -> Tensor:
        out, self._pending = self._pending, None
        return self.mv(v) if out is None else out


def autograd_records(*tensors: Tensor | None) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then no in-place updates)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: The former name of :func:`autograd_records`.
records = autograd_records
