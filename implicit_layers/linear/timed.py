"""The default adjoint solver of argmin and root problems between "clearly Dense" and
"clearly iterative".

Whether materialising the Jacobian (``Dense``) beats an iterative solver depends on numbers no
static rule sees: how many iterations the problem needs (about 45 CG steps on ridge regression
at rtol 1e-10, 15 on a well-conditioned softmax regression) and how much cheaper one column of
a vectorised product is than one lone product (5 µs against 47 µs on ridge at n = 200, 70 µs
against 175 µs on softmax regression at n = 128). At n = 200 Dense is 4x faster than CG on
ridge; at n = 256 it is 11x slower on softmax regression (``python -m
benchmarks.dense_crossover``).

:class:`DenseOrCG` (symmetric problems) and :class:`DenseOrGMRES` (roots) measure instead of
guessing ("or": one of the two, chosen by timing; compare the "then" combinators of
:mod:`~implicit_layers.linear.combinators`, which fall back on failure). The first two
ordinary backwards of a problem run the iterative solver (the choice that is never far off)
and time it; the second then times a vectorised product of up to 64 basis vectors and one
dense solve to predict what ``Dense`` would have cost. The cheaper of
the two is remembered for that problem (its residual function, size, batch, dtype and device)
in a :class:`TimedChoices` cache (:data:`timed_choices`, which a user can inspect and clear)
and used from then on; a problem on which the iterative solver did not converge keeps it. A
fixed, reproducible choice is one explicit ``backward=`` away; under
``torch.use_deterministic_algorithms(True)`` nothing is measured and the iterative solver is
used (a choice made by timing may differ between runs and machines).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import Self

from .._capture import is_wrapped, transforms_active
from .._info import SolveInfo
from ._base import LinearSolver
from ._operator import LinearOperator
from .cg import CG
from .combinators import DenseThenGMRES
from .dense import Dense
from .gmres import GMRES

__all__ = [
    "DenseOrCG", "DenseOrGMRES", "TimedChoices", "timed_choices", "timed_default",
    "prefer_dense", "probe_columns", "problem_key",
]

#: Bounds on the basis vectors of the timed vectorised product (:func:`probe_columns`). Its
#: time per column includes the fixed cost of a call, which a short product overstates
#: several-fold (ridge at n = 200: 15.5 µs per column with 16 columns, 6 µs with 200).
PROBE_MIN_COLUMNS = 16
PROBE_MAX_COLUMNS = 64
#: Remembered choices; the oldest is forgotten beyond this many.
MAX_REMEMBERED = 256



class TimedChoices:
    """The choices made by timing, keyed by problem (its kind, residual function, batch, size,
    dtype and device), with the first timings that await their second.

    Attributes:
        choices: ``key -> "Dense" | "CG" | "GMRES"``, the solver chosen for each problem
            (oldest first; the oldest is forgotten beyond :data:`MAX_REMEMBERED`).
        first_times: seconds of the first timed iterative solve of the problems that have run
            one backward so far.
        delegates: the solver objects made for each settings, reused across calls.

    Examples:
        >>> cache = il.linear.timed.TimedChoices()
        >>> len(cache), cache.choices
        (0, {})
    """

    def __init__(self) -> None:
        self.choices: dict[Hashable, str] = {}
        self.first_times: dict[Hashable, float] = {}
        self.delegates: dict[tuple, LinearSolver] = {}
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.choices)

    def __repr__(self) -> str:
        return f"TimedChoices({len(self.choices)} choices, {len(self.first_times)} pending)"

    def clear(self) -> None:
        """Drop every remembered choice (the next backward of each problem measures again)."""
        with self.lock:
            self.choices.clear()
            self.first_times.clear()

    def remember(self, key: Hashable, choice: str) -> None:
        """Store ``choice`` for ``key``, forgetting the oldest beyond the bound."""
        with self.lock:
            if len(self.choices) >= MAX_REMEMBERED:
                self.choices.pop(next(iter(self.choices)))
            self.choices[key] = choice


#: The cache of the default adjoint solvers (inspect ``timed_choices.choices``; clear it with
#: ``timed_choices.clear()``).
timed_choices = TimedChoices()


def problem_key(fn: Any) -> Hashable:
    """What identifies a residual function across calls: its code (a closure created anew on
    every call shares it), else its type."""
    target = getattr(fn, "func", fn)  # functools.partial
    target = getattr(target, "__func__", target)  # bound methods
    code = getattr(target, "__code__", None)
    return code if code is not None else type(target).__qualname__ + "@" + type(target).__module__


def prefer_dense(
    n: int, iterative_seconds: float, probe_seconds: float, solve_seconds: float, columns: int,
) -> bool:
    """Whether ``Dense`` is predicted to beat the measured iterative solve.

    Args:
        n: system size (columns of the Jacobian).
        iterative_seconds: time of the iterative (CG or GMRES) solve.
        probe_seconds: time of one vectorised product of ``columns`` basis vectors.
        solve_seconds: time of one dense solve of the ``(B, n, n)`` system.
        columns: see ``probe_seconds``.

    Returns:
        ``True`` when ``n / columns`` such products (the whole build, counting the fixed cost
        of a call each time, which errs towards the iterative solver) and the solve take less
        time than the iterative solver did.
    """
    return probe_seconds * n / columns + solve_seconds < iterative_seconds


def timed_default(problem: Any) -> LinearSolver:
    """The remembered choice for ``problem`` (a plain ``Dense()``, ``CG()`` or ``GMRES()``, as
    cheap to set up as one given explicitly), or a :class:`DenseOrCG` (symmetric) or
    :class:`DenseOrGMRES` that will measure it.

    Args:
        problem: the problem (its ``kind``, ``fn``, ``symmetric``, ``batch``, ``size``,
            ``dtype`` and ``device`` are read).
    """
    key = (problem.kind, problem_key(problem.fn))
    measured = DenseOrCG if problem.symmetric else DenseOrGMRES
    if torch.are_deterministic_algorithms_enabled():
        return measured.iterative()
    where = (key, problem.batch, problem.size, problem.dtype, problem.device)
    chosen = measured.cache.choices.get(where)
    if chosen is not None:
        if chosen == "Dense":
            return Dense() if problem.symmetric else DenseThenGMRES()
        return measured.iterative()
    return measured().keyed(key)


class _DenseOr(LinearSolver):
    """Dense or the iterative solver ``iterative``, whichever the first two timed backwards
    found faster for the same problem (see the module docstring).

    Solves ``(B, n)`` right-hand sides and returns ``(x, info)`` as the chosen solver does
    (``info.solver`` names it). Only an ordinary first-order backward is measured; under
    ``torch.func`` transforms or ``create_graph=True`` it uses the remembered choice, else the
    iterative solver.

    Args:
        rtol, atol, max_steps, check_every, on_failure: as for the iterative solver, passed to
            the chosen one.
    """

    iterative: ClassVar[type[LinearSolver]]
    #: Where the choices are remembered (shared by both classes).
    cache: ClassVar[TimedChoices] = timed_choices
    _key: Hashable = None

    def keyed(self, key: Hashable) -> Self:
        """This solver, remembering its choice under ``key`` (kept by :meth:`replace`)."""
        object.__setattr__(self, "_key", key)
        return self

    def replace(self, **changes: Any) -> Self:
        return super().replace(**changes).keyed(self._key)

    def _delegate(self, choice: str) -> LinearSolver:
        settings = (self.name, choice, self.rtol, self.atol, self.max_steps, self.check_every)
        solver = self.cache.delegates.get(settings)
        if solver is None:
            # Made once per settings: a new layer call makes a new solver object, and building
            # validated settings costs a few µs each time.
            if choice == "Dense":
                dense = Dense if self.needs_symmetric else DenseThenGMRES
                solver = dense(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                               check_every=self.check_every, on_failure="ignore")
            else:
                solver = self.iterative(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                                        check_every=self.check_every, on_failure="ignore")
            if len(self.cache.delegates) < MAX_REMEMBERED:
                self.cache.delegates[settings] = solver
        return solver

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        key = (self._key, op.batch, op.size, b.dtype, b.device)
        cache = self.cache
        chosen = cache.choices.get(key)
        if chosen is not None:
            return self._delegate(chosen)._solve(op, b, x0)
        iterative = self._delegate(self.iterative.name)
        if not _ordinary_backward(op, b) or self._key is None:
            return iterative._solve(op, b, x0)
        clock = _clock(b)
        _sync(b)
        start = clock()
        x, info = iterative._solve(op, b, x0)
        _sync(b)
        seconds = clock() - start
        # A problem the iterative solver fails on keeps it (and its warnings): Dense would
        # raise on a singular Jacobian where the iterative solver reports and carries on.
        keep = not bool(info.converged.all())
        with cache.lock:
            first = cache.first_times.pop(key, None)
            if first is None and not keep:
                # The first solve of a shape pays one-off costs (allocations, first calls into
                # a kernel library) that made GMRES look 1.6x slower than it is at n = 500:
                # decide on the second backward, from the faster of the two.
                if len(cache.first_times) >= MAX_REMEMBERED:
                    cache.first_times.pop(next(iter(cache.first_times)))
                cache.first_times[key] = seconds
                return x, info
        seconds = min(seconds, first if first is not None else seconds)
        faster = not keep and self._dense_is_faster(op, b, seconds)
        choice = "Dense" if faster else self.iterative.name
        cache.remember(key, choice)
        return x, info

    @staticmethod
    def _dense_is_faster(op: LinearOperator, b: Tensor, iterative_seconds: float) -> bool:
        B, n = b.shape
        k = probe_columns(n)
        if k >= n:
            return True  # the probe would cost a Dense build already
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        basis = eye[:k].unsqueeze(1).expand(k, B, n)
        try:
            torch.func.vmap(op.mv)(basis[:1])  # one-off set-up costs of the vectorised product
            probe = _timed(lambda: torch.func.vmap(op.mv)(basis), b)
        except RuntimeError:
            return False  # no batching rule: Dense would take n lone products
        # A well-conditioned stand-in of the same shape: LU costs the same flops on any matrix.
        matrix = (eye * 2.0 + 1.0 / n).expand(B, n, n)
        solve = _timed(lambda: torch.linalg.solve_ex(matrix, b), b, repeats=2)
        return prefer_dense(n, iterative_seconds, probe, solve, k)


def probe_columns(n: int) -> int:
    """Basis vectors in the timed vectorised product: enough that its fixed cost is small
    against the columns (and the kernels are those of the full build: at n = 500, 8 columns
    took longer than 16), at most a quarter of ``n`` and 64."""
    return min(PROBE_MAX_COLUMNS, max(PROBE_MIN_COLUMNS, n // 4))


def _ordinary_backward(op: LinearOperator, b: Tensor) -> bool:
    """Whether this is a first-order backward through the recorded graph: the only products
    measured (those of ``torch.func`` transforms and graphs of the backward cost differently)."""
    return (op.recorded and not torch.is_grad_enabled() and not transforms_active()
            and not is_wrapped(b))


def _clock(b: Tensor) -> Any:
    """Process CPU time on the CPU (a process kept waiting by others' load is not charged for
    it), wall time between synchronisations on accelerators."""
    return time.process_time if b.device.type == "cpu" else time.perf_counter


def _sync(b: Tensor) -> None:
    if b.device.type == "cuda":
        torch.cuda.synchronize(b.device)


def _timed(fn: Any, b: Tensor, repeats: int = 1) -> float:
    """The shortest of ``repeats`` timed calls (the first may pay one-off set-up costs)."""
    clock = _clock(b)
    best = float("inf")
    for _ in range(repeats):
        _sync(b)
        start = clock()
        fn()
        _sync(b)
        best = min(best, clock() - start)
    return best


class DenseOrCG(_DenseOr):
    """The default adjoint solver of a mid-sized symmetric problem: CG or Dense, measured."""

    name = "DenseOrCG"
    iterative = CG
    needs_symmetric = True
    needs_positive_definite = True


class DenseOrGMRES(_DenseOr):
    """The default adjoint solver of a mid-sized root: GMRES or Dense, measured."""

    name = "DenseOrGMRES"
    iterative = GMRES
