"""The default adjoint solver of symmetric problems between "clearly Dense" and "clearly CG".

Whether materialising the Jacobian (``Dense``) beats conjugate gradients depends on numbers no
static rule sees: how many CG steps the problem needs (about 45 on ridge regression at rtol
1e-10, 15 on a well-conditioned softmax regression) and how much cheaper one column of a
vectorised product is than one lone product (5 µs against 47 µs on ridge at n = 200, 70 µs
against 175 µs on softmax regression at n = 128). At n = 200 Dense is 3.7x faster than CG on
ridge; at n = 128 it is 4x slower on softmax regression (``python -m benchmarks.dense_crossover``).

:class:`DenseOrCG` measures instead of guessing. The first ordinary backward of a problem runs
CG (the choice that is never far off) and times it, then times two vectorised products of a
few basis vectors and one dense solve to predict what ``Dense`` would have cost. The cheaper
of the two is remembered for that problem (its residual function, size, batch, dtype and
device) and used from then on. A fixed, reproducible choice is one explicit
``backward=il.linear.CG()`` or ``il.linear.Dense()`` away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from ._capture import is_wrapped, transforms_active
from ._info import SolveInfo
from ._linearize import RecordedLinearization
from .linear._base import LinearSolver
from .linear._operator import LinearOperator
from .linear.cg import CG
from .linear.dense import Dense

__all__ = ["DenseOrCG", "measured_default", "prefer_dense", "problem_key"]

#: Basis vectors of the first timed vectorised product (the second takes twice as many). Their
#: difference is the cost of a column without the fixed cost of a call, which a short product
#: would overstate several-fold (16 columns of ridge at n = 200: 15.5 µs per column, 4.9 µs at
#: the margin).
PROBE_COLUMNS = 8
#: Remembered choices; the oldest is forgotten beyond this many.
MAX_REMEMBERED = 256

_choices: dict[Hashable, str] = {}
_delegates: dict[tuple, LinearSolver] = {}
_lock = threading.Lock()


def problem_key(fn: Any) -> Hashable:
    """What identifies a residual function across calls: its code (a closure created anew on
    every call shares it), else its type."""
    target = getattr(fn, "func", fn)  # functools.partial
    target = getattr(target, "__func__", target)  # bound methods
    return getattr(target, "__code__", None) or type(target)


def prefer_dense(
    n: int, cg_seconds: float, short_seconds: float, long_seconds: float, solve_seconds: float,
    columns: int = PROBE_COLUMNS,
) -> bool:
    """Whether ``Dense`` is predicted to beat the measured CG solve.

    Args:
        n: system size (columns of the Jacobian).
        cg_seconds: time of the CG solve.
        short_seconds: time of a vectorised product of ``columns`` basis vectors.
        long_seconds: time of one of ``2 * columns`` basis vectors.
        solve_seconds: time of one dense solve of the ``(B, n, n)`` system.
        columns: see ``short_seconds``.

    Returns:
        ``True`` when ``n`` columns (the fixed cost of one call plus ``n`` times the marginal
        cost of a column) and the solve take less time than CG did.
    """
    per_column = max(long_seconds - short_seconds, 0.0) / columns
    fixed = max(short_seconds - columns * per_column, 0.0)
    return fixed + n * per_column + solve_seconds < cg_seconds


def measured_default(problem: Any) -> LinearSolver:
    """The remembered choice for ``problem`` (a plain ``Dense()`` or ``CG()``, as cheap to set
    up as either given explicitly), or a :class:`DenseOrCG` that will measure it."""
    key = (problem.kind, problem_key(problem.fn))
    chosen = _choices.get((key, problem.batch, problem.size, problem.dtype, problem.device))
    if chosen is not None:
        return Dense() if chosen == "Dense" else CG()
    return DenseOrCG().keyed(key)


def forget() -> None:
    """Drop every remembered choice (the next backward of each problem measures again)."""
    with _lock:
        _choices.clear()


class DenseOrCG(LinearSolver):
    """CG or Dense for a symmetric positive-definite adjoint, whichever a timed first backward
    found faster for the same problem (see the module docstring).

    Solves ``(B, n)`` right-hand sides and returns ``(x, info)`` as the chosen solver does
    (``info.solver`` names it). Only an ordinary first-order backward is measured; under
    ``torch.func`` transforms or ``create_graph=True`` it uses the remembered choice, else CG.

    Args:
        rtol, atol, max_steps, check_every, on_failure: as for
            :class:`~implicit_layers.linear.CG`, passed to the chosen solver.
    """

    name = "DenseOrCG"
    needs_symmetric = True
    needs_positive_definite = True

    _key: Hashable = None

    def keyed(self, key: Hashable) -> DenseOrCG:
        """This solver, remembering its choice under ``key`` (kept by :meth:`replace`)."""
        object.__setattr__(self, "_key", key)
        return self

    def replace(self, **changes: Any) -> DenseOrCG:
        return super().replace(**changes).keyed(self._key)

    def _delegate(self, kind: str) -> LinearSolver:
        settings = (kind, self.rtol, self.atol, self.max_steps, self.check_every)
        solver = _delegates.get(settings)
        if solver is None:
            # Made once per settings: a new layer call makes a new DenseOrCG, and building
            # validated settings costs a few µs each time.
            if kind == "Dense":
                solver = Dense(rtol=self.rtol, atol=self.atol, on_failure="ignore")
            else:
                solver = CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                            check_every=self.check_every, on_failure="ignore")
            if len(_delegates) < MAX_REMEMBERED:
                _delegates[settings] = solver
        return solver

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        key = (self._key, op.batch, op.size, b.dtype, b.device)
        chosen = _choices.get(key)
        if chosen is not None:
            return self._delegate(chosen)._solve(op, b, x0)
        cg = self._delegate("CG")
        if not _ordinary_backward(op, b) or self._key is None:
            return cg._solve(op, b, x0)
        clock = _clock(b)
        _sync(b)
        start = clock()
        x, info = cg._solve(op, b, x0)
        _sync(b)
        cg_seconds = clock() - start
        choice = "Dense" if self._dense_is_faster(op, b, cg_seconds) else "CG"
        with _lock:
            if len(_choices) >= MAX_REMEMBERED:
                _choices.pop(next(iter(_choices)))
            _choices[key] = choice
        return x, info

    @staticmethod
    def _dense_is_faster(op: LinearOperator, b: Tensor, cg_seconds: float) -> bool:
        B, n = b.shape
        k = PROBE_COLUMNS
        if 2 * k >= n:
            return True  # the probe would cost a Dense build already
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        basis = eye[: 2 * k].unsqueeze(1).expand(2 * k, B, n)
        try:
            short = _timed(lambda: torch.func.vmap(op.mv)(basis[:k]), b, repeats=2)
            long = _timed(lambda: torch.func.vmap(op.mv)(basis), b)
        except RuntimeError:
            return False  # no batching rule: Dense would take n lone products
        # A well-conditioned stand-in of the same shape: LU costs the same flops on any matrix.
        matrix = (eye * 2.0 + 1.0 / n).expand(B, n, n)
        solve = _timed(lambda: torch.linalg.solve_ex(matrix, b), b)
        return prefer_dense(n, cg_seconds, short, long, solve, k)


def _ordinary_backward(op: LinearOperator, b: Tensor) -> bool:
    """Whether this is a first-order backward through the recorded graph: the only products
    measured (those of ``torch.func`` transforms and graphs of the backward cost differently)."""
    owner = getattr(getattr(op, "_mv", None), "__self__", None)
    return (isinstance(owner, RecordedLinearization) and not torch.is_grad_enabled()
            and not transforms_active() and not is_wrapped(b))


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
