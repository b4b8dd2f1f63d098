"""The base class of forward solvers and the per-sample convergence monitor."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._config import SolverSettings
from .._info import NonFiniteError, SolveInfo, report_failure
from .._problem import KINDS, FixedPointProblem, MinimiseProblem, Problem, RootProblem
from ..linear._loop import Bookkeeping, sync_flags, wide_dtype

if TYPE_CHECKING:
    from ..linear._base import LinearSolver

__all__ = ["ForwardSolver"]

# Where a running forward solve leaves what its backward can reuse: a list while the implicit
# layer that runs the solve will differentiate it, else None (the state is then dropped at
# once, so that inference keeps no memory). A context variable: two threads, two slots.
_ADJOINT_SLOT: contextvars.ContextVar[list[object] | None] = contextvars.ContextVar(
    "adjoint_slot", default=None
)


@contextmanager
def adjoint_slot(wanted: bool) -> Iterator[list[object]]:
    """Collect what the forward solves run inside keep for the backward (if ``wanted``)."""
    slot: list[object] = []
    token = _ADJOINT_SLOT.set(slot if wanted else None)
    try:
        yield slot
    finally:
        _ADJOINT_SLOT.reset(token)


class ForwardSolver(SolverSettings):
    """Base class of the algorithms that find ``z*`` in the forward pass.

    What the tolerance means: a sample has converged when its residual norm ``‖F(z)‖``
    (``‖z - f(z)‖`` for a fixed point, ``‖∇L(z)‖`` for argmin) is at most
    ``max(atol, rtol * scale)``, with residual and scale taken at the same iterate ``z``:

    * fixed points: ``scale = max(‖z‖, ‖f(z0)‖)``. Far from 0 this is the relative test
      ``‖z - f(z)‖ <= rtol ‖z‖``; the floor ``‖f(z0)‖`` (the size of the map's output at the
      start) turns it into an absolute test when the fixed point is at or near 0 (``z = θ z``,
      ``z = 0.5 sin z``), where no relative accuracy can be reached;
    * roots and argmin: ``scale = ‖F(z0)‖``, the initial residual norm.

    Every sample of a batch is monitored on its own; converged samples stop changing, and the
    solver returns for each sample the iterate with the lowest residual it has seen (or the
    first that met its tolerance). A sample is reported converged only if that returned
    iterate meets the tolerance computed at that iterate, so a diverging map is never reported
    converged.

    Solvers iterate on flat ``(B, n)`` states (``B = 1`` for an unbatched problem); the
    functional entry points (:func:`~implicit_layers.fixed_point`,
    :func:`~implicit_layers.root`, :func:`~implicit_layers.argmin`) flatten ``z0`` and shape the
    solution back. Settings are keyword-only and immutable (``replace(**changes)`` returns a
    validated copy); a subclass may take one algorithm parameter positionally.

    Args:
        rtol: relative tolerance; ``None`` (default) means ``1e-10`` in float64, ``1e-5`` in
            float32, ``1e-3`` in float16 and ``1e-2`` in bfloat16.
        atol: absolute tolerance (default ``0.0``).
        max_steps: iteration limit; ``None`` (default) picks the class's ``default_max_steps``
            (500 unless the solver says otherwise).
        check_every: test for convergence (a device synchronisation) every this many steps;
            ``None`` (default) means every step on the CPU and every 8 steps on accelerators.
        on_failure: ``"warn"`` (default) emits a :class:`~implicit_layers.ConvergenceWarning`
            when a sample does not converge, ``"raise"`` raises
            :class:`~implicit_layers.ConvergenceError`, ``"ignore"`` only reports it in the info.

    Raises:
        TypeError: if a setting has the wrong type, is passed positionally where it is
            keyword-only, or (in :meth:`replace`) is unknown.
        ValueError: if a setting is out of range (``rtol < 0``, ``max_steps < 1``, an
            ``on_failure`` other than the three above).

    Class attributes:
        name: the name used in messages and in :attr:`SolveInfo.solver`.
        problems: the problem classes it solves (subclasses of
            :class:`~implicit_layers.solvers.base.Problem`, e.g. ``FixedPointProblem``); a
            subclass of one of them is solved too.
        kinds: the names of those kinds (``"fixed_point"``, ``"root"``, ``"argmin"``), derived
            from ``problems``; a subclass that sets ``kinds`` instead gets ``problems`` from it.
        default_max_steps: the ``max_steps`` of ``max_steps=None``.
        supports_unrolled: whether ``backward=Unrolled()`` can differentiate its iterations.

    Examples:
        >>> solver = il.solvers.Anderson(rtol=1e-8)
        >>> solver.replace(max_steps=50)
        Anderson(rtol=1e-08, max_steps=50)
        >>> solver.kinds
        ('fixed_point', 'root')
    """

    name: ClassVar[str] = "ForwardSolver"
    problems: ClassVar[tuple[type[Problem], ...]] = (FixedPointProblem, RootProblem, MinimiseProblem)
    kinds: ClassVar[tuple[str, ...]] = ("fixed_point", "root", "argmin")
    default_max_steps: ClassVar[int] = 500
    supports_unrolled: ClassVar[bool] = True

    def gradient_step_size(self) -> float | Tensor | None:
        """The fixed step ``η`` of this solver's iteration ``z ← z - η F(z)``, or ``None``.

        Backward modes that differentiate a few such steps from the solution (``Truncated``,
        ``JacobianFree``, ``Phantom`` on argmin problems) borrow it when they are given no
        step size of their own. A float, or a tensor (a scalar, or one value per sample of
        shape ``(B,)``; a tensor that requires grad then receives a gradient). ``None`` (the
        default) when the solver has no fixed step.
        """
        return None

    def adjoint_solver(self, info: SolveInfo | None) -> LinearSolver | None:
        """The linear solver this solver recommends for the implicit backward, from what its
        forward solve observed (``info``), or ``None`` (the default) to leave the choice to the
        layer. Used only when the backward's linear solver was not given.

        Args:
            info: the statistics of the forward solve that just ran.

        Returns:
            A linear solver (its ``rtol=None`` inherits the forward tolerance), or ``None``.
        """
        return None

    def keep_for_adjoint(self, state: object) -> None:
        """Offer ``state`` (what this forward solve learned, e.g. secant factors) to the
        backward of the implicit layer running the solve, which passes it to
        :meth:`adjoint_guess`.

        Kept only when such a backward can use it: inside a layer with an implicit backward,
        called with autograd recording and outside ``torch.func`` transforms. Elsewhere
        (``no_grad``, ``inference_mode``, a direct call of :meth:`solve`) it is dropped at
        once. Kept state lives as long as the layer's autograd graph; store detached tensors.

        Args:
            state: any object; only this solver's :meth:`adjoint_guess` reads it.
        """
        slot = _ADJOINT_SLOT.get()
        if slot is not None:
            slot.append(state)

    @staticmethod
    def adjoint_state_wanted() -> bool:
        """Whether :meth:`keep_for_adjoint` would keep a state now (so that a solver can skip
        preparing one that would be dropped)."""
        return _ADJOINT_SLOT.get() is not None

    def adjoint_guess(self, state: object, rhs: Tensor, transpose: bool) -> Tensor | None:
        """An initial guess for a linear solve with ``A = ∂F/∂z`` at the solution, from the
        ``state`` this solver kept with :meth:`keep_for_adjoint`, or ``None`` (the default:
        start from zero).

        The implicit backward asks for it before each adjoint solve ``Aᵀ u = rhs``
        (``transpose=True``) and each non-transposed solve ``A w = rhs`` (the tangent solves of
        forward mode and the second solves of a double backward). The guess is only a start
        point: the linear solver still iterates until its own tolerance, relative to
        ``‖rhs‖``, is met, so the gradient is as accurate as without it; a good guess saves
        iterations, a poor one costs some. Not asked under ``torch.func`` transforms.

        Args:
            state: what this solver kept during the forward.
            rhs: the right-hand sides, ``(B, n)``.
            transpose: whether the system is ``Aᵀ u = rhs`` (else ``A w = rhs``).

        Returns:
            A ``(B, n)`` tensor like ``rhs``, or ``None``.
        """
        return None

    def check_kind(self, kind: str) -> None:
        """Check that this solver solves problems of kind ``kind``.

        Args:
            kind: ``"fixed_point"``, ``"root"`` or ``"argmin"``.

        Raises:
            ValueError: if ``kind`` is not in :attr:`kinds`; the message names the solvers
                that do solve it.

        Examples:
            >>> il.solvers.LBFGS().check_kind("fixed_point")
            Traceback (most recent call last):
                ...
            ValueError: solver LBFGS does not solve fixed_point problems; use Anderson, Picard or Broyden.
        """
        if not self.solves(kind):
            raise ValueError(
                f"solver {self.name} does not solve {kind} problems; use {KINDS[kind].solvers_hint}."
            )

    @classmethod
    def solves(cls, kind: str) -> bool:
        """Whether this solver solves problems of kind ``kind`` (a key of the problem registry):
        its class is one of :attr:`problems` or a subclass of one."""
        return issubclass(KINDS[kind], cls.problems)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # One declaration, two views: the classes (``problems``) and their names (``kinds``).
        if "problems" in cls.__dict__:
            cls.kinds = tuple(p.kind for p in cls.problems)
        elif "kinds" in cls.__dict__:
            cls.problems = tuple(KINDS[k] for k in cls.kinds)

    def solve(self, problem: Problem, z0: Tensor, differentiable: bool = False) -> tuple[Tensor, SolveInfo]:
        """Find the solution for the flat initial guess ``z0`` of shape ``(B, n)``.

        With ``differentiable=False`` the caller runs this under :func:`torch.no_grad`; with
        ``True`` the iterations are recorded by autograd (the ``Unrolled`` backward). Most
        users call :func:`~implicit_layers.fixed_point` and friends instead, which flatten the
        state and attach the gradient.

        Args:
            problem: the problem as a solver sees it
                (:class:`~implicit_layers.solvers.base.Problem`).
            z0: flat initial guess, shape ``(B, n)``.
            differentiable: record the iterations for autograd (default ``False``).

        Returns:
            ``(z, info)``: for each sample the lowest-residual iterate seen, shape ``(B, n)``,
                and a :class:`~implicit_layers.SolveInfo` with fields of shape ``(B,)``.

        Raises:
            implicit_layers.ConvergenceError: if a sample does not converge and
                ``on_failure="raise"``.
            implicit_layers.NonFiniteError: if the residual becomes NaN or Inf.

        Warns:
            implicit_layers.ConvergenceWarning: if a sample does not converge and
                ``on_failure="warn"``.

        Examples:
            >>> from implicit_layers.solvers.base import Problem
            >>> z0 = torch.zeros(3, dtype=torch.float64)
            >>> problem = Problem("fixed_point", torch.cos, (), z0, batched=False, name="f")
            >>> z, info = il.solvers.Picard().solve(problem, problem.flatten(z0))
            >>> z.shape, info.converged
            (torch.Size([1, 3]), tensor([True]))
        """
        z, info = self._solve(problem, z0, differentiable)
        self._conclude(problem, z, info)
        return z, info

    def solve_unbound(self, problem: Problem, z0: Tensor) -> tuple[Tensor, SolveInfo] | None:
        """:meth:`solve` for a problem whose tensors carrying derivatives have not been looked
        for, where the solve itself shows that its functions read none (then the problem has
        no parameters) and that their outputs fit it (:meth:`Problem.check_output`). ``None``
        where this solver cannot show it (the default): the caller then looks for them first.
        Run under :func:`torch.no_grad`, with ``z0`` ``(B, n)`` detached."""
        return None

    def _conclude(self, problem: Problem, z: Tensor, info: SolveInfo) -> None:
        """The verdict of a solve: the warning or error of ``on_failure`` for samples that did
        not converge, with the problem's diagnosis."""
        if self.on_failure == "ignore" or info._known_converged or bool(info.converged.all()):
            return  # nothing to report: no advice to compose (this runs on every solve)
        advice = self._advice(problem) + problem.diagnose(z, ~info.converged.reshape(-1))
        report_failure(info, self.on_failure, f"forward solve of {problem.kind}", advice)

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        raise NotImplementedError

    def _advice(self, problem: Problem) -> str:
        return problem.failure_advice(f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol")


def _norm(x: Tensor, keepdim: bool = False) -> Tensor:
    """Per-sample Euclidean norm of the last dimension, for the convergence test only
    (detached: an unrolled solve does not save the residuals for it), in float64 (float32 on
    MPS, which has no float64) whatever ``x``'s dtype. The squares of float32 entries above
    ~1e19 overflow float32 (a fixed point at 2e30 would read as Inf), so the sum runs wide;
    the norms stay wide through the bookkeeping (no cast back per check), and the info casts
    them to the iterate's dtype once."""
    if x.requires_grad:
        x = x.detach()
    return torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim, dtype=wide_dtype(x))


def _detached(x: Tensor) -> Tensor:
    """``x`` out of autograd's graph (no op when it is not in one)."""
    return x.detach() if x.requires_grad else x


class ForwardBookkeeping(Bookkeeping):
    """The state both forward monitors share: the tolerance rule of the problem's kind, the
    latest residual norms, the done flags and each sample's best iterate.

    The tolerance of an iterate ``z`` is ``max(atol, rtol · scale)`` with ``scale =
    max(‖z‖, ‖f(z0)‖)`` for fixed points and ``‖F(z0)‖`` otherwise (see
    :class:`ForwardSolver`), computed as ``max(rtol ‖z‖, tol0)`` with ``tol0 = max(atol, rtol
    · scale0)``: exactly the same value (rounding is monotone), one multiply and one clamp per
    iterate.

    Args:
        solver: the solver (its tolerances, ``check_every`` and name).
        problem: the problem (its kind decides the tolerance's scale).
        z0: the initial iterate ``(B, n)``.
        r0: its residual ``(B, n)``.
        keepdim: per-sample state as ``(B, 1)`` columns (else ``(B,)``).
    """

    steps: Tensor  # the steps each sample took (int64)
    tol: Tensor  # the latest tolerances (Monitor)
    done: Tensor  # the samples done, bool
    _best_tol: Tensor | None
    _best_znorm: Tensor

    def __init__(
        self, solver: ForwardSolver, problem: Problem, z0: Tensor, r0: Tensor, keepdim: bool
    ) -> None:
        super().__init__(solver.name, solver.check_every, z0.device)
        self.solver = solver
        self.problem = problem
        self.rtol = solver.resolved_rtol(z0.dtype)
        self.atol = solver.atol
        self.relative_to_z = problem.relative_to_z
        self._keepdim = keepdim
        self._dtype = z0.dtype  # the info's norms come back in the iterate's dtype
        res = _norm(r0, keepdim)
        # Fixed points: the floor of the scale is ‖f(z0)‖ (f(z0) = z0 - r0), so that a fixed
        # point at 0 meets an absolute tolerance instead of chasing ‖z‖ down to underflow.
        scale0 = _norm(z0 - r0, keepdim) if self.relative_to_z else res
        self.tol0 = torch.clamp(self.rtol * scale0, min=self.atol)
        self.res = res
        self.best_z = z0
        self.best_res = res
        # The tolerance of the best iterate itself: the convergence verdict must compare the
        # residual and the tolerance of one and the same iterate. Formed when read, from the
        # initial iterate's norms (a monitor that judges on the host may never read it).
        self._znorm0 = _norm(z0, keepdim) if self.relative_to_z else None
        self._best_tol_from(self._znorm0)

    def _initial_verdict(self) -> None:
        """The initial iterate's tolerances :attr:`tol` and done flags :attr:`done` on the
        device."""
        self.tol = self.best_tol
        self.done = self.res <= self.tol

    def stop(self, force: bool = False) -> bool:
        raise NotImplementedError

    def iterate(self, max_steps: int, advance: Callable[[int], int]) -> None:
        """The loop of a forward solve: a check (:meth:`stop`) before each advance, until
        ``max_steps`` steps are taken or a check finds every sample done.

        Args:
            max_steps: the step budget.
            advance: ``advance(taken) -> steps``: takes one step (or a chunk of steps, at most
                ``max_steps - taken``) after ``taken`` steps, registers the iterates with this
                monitor and returns how many steps it took. A solver's eager, in-place and
                graphed variants differ only in the ``advance`` they pass.
        """
        taken = 0
        while taken < max_steps:
            if self.stop():
                break
            taken += advance(taken)

    def _tol(self, znorm: Tensor) -> Tensor:
        """The tolerances of iterates of norms ``znorm`` (fixed points)."""
        return torch.clamp(znorm * self.rtol, min=self.tol0)

    @property
    def best_tol(self) -> Tensor:
        """The tolerances of each sample's best iterate. A check that judged the tolerance on
        the host keeps only the iterate's norm (:meth:`_best_tol_from`); the tolerance is
        formed from it when read (at the end, or at a masked update), by the same ops."""
        if self._best_tol is None:
            self._best_tol = self._tol(self._best_znorm)
        return self._best_tol

    @best_tol.setter
    def best_tol(self, value: Tensor) -> None:
        self._best_tol = value

    def _best_tol_from(self, znorm: Tensor | None) -> None:
        """The best iterates' tolerances, to be formed from their norms ``znorm`` when read
        (``None``: not relative to the iterate, the tolerances are :attr:`tol0`)."""
        if znorm is None:
            self._best_tol = self.tol0
        else:
            self._best_tol, self._best_znorm = None, znorm

    def _best(self, known_converged: bool) -> tuple[Tensor, SolveInfo]:
        """Each sample's best iterate and the info: converged where that iterate meets its
        own tolerance."""
        best_res, best_tol, steps = self.best_res, self.best_tol, self.steps
        if self._keepdim:
            best_res, best_tol, steps = best_res.squeeze(-1), best_tol.squeeze(-1), steps.squeeze(-1)
        info = self.result(
            best_res <= best_tol, steps, _detached(best_res).to(self._dtype),
            _detached(best_tol).to(self._dtype),
        )
        info._known_converged = known_converged
        return self.best_z, info

    def _raise_non_finite(self, bad: Tensor) -> None:
        raise non_finite_error(self.solver, self.problem, bad)


class Monitor(ForwardBookkeeping):
    """Per-sample bookkeeping shared by the forward solvers, updated at every step.

    Tracks the tolerance, which samples are done, the steps each used and the lowest-residual
    iterate of each sample, without synchronising with the device except in :meth:`stop`. A
    solver builds one from its initial iterate, then per step calls :meth:`stop` (before) and
    :meth:`record` (after), and returns :meth:`finish`.

    Args:
        solver: the solver whose ``rtol``, ``atol``, ``check_every`` and ``name`` apply.
        problem: the problem being solved (its kind sets the tolerance's scale).
        z0: the initial iterate, shape ``(B, n)``.
        r0: its residual ``F(z0)``, shape ``(B, n)``.

    Attributes:
        tol: per-sample tolerance ``max(atol, rtol · scale)``, shape ``(B,)``.
        done: samples that met their tolerance, shape ``(B,)``.
        steps: steps each sample took, int64 ``(B,)``.
        res: latest residual norms, shape ``(B,)``.

    Examples:
        >>> from implicit_layers.solvers.base import Monitor, Problem
        >>> z0 = torch.zeros(1, 3, dtype=torch.float64)
        >>> problem = Problem("fixed_point", torch.cos, (), z0, batched=True, name="f")
        >>> z = z0
        >>> mon = Monitor(il.solvers.Picard(), problem, z, problem.residual(z))
        >>> while not mon.stop():
        ...     z = torch.cos(z)
        ...     mon.record(z, problem.residual(z), mon.active)
        >>> z, info = mon.finish()
        >>> bool(info.converged), int(info.steps) > 10
        (True, True)
    """

    def __init__(self, solver: ForwardSolver, problem: Problem, z0: Tensor, r0: Tensor) -> None:
        super().__init__(solver, problem, z0, r0, keepdim=False)
        self._initial_verdict()
        self.steps = torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device)

    @property
    def active(self) -> Tensor:
        """Samples still iterating, shape ``(B,)`` (``~done``)."""
        return ~self.done

    def record(self, z: Tensor, r: Tensor, stepped: Tensor) -> None:
        """Register the new iterate ``z`` with residual ``r``.

        Args:
            z: the new iterate, shape ``(B, n)``.
            r: its residual ``F(z)``, shape ``(B, n)``.
            stepped: bool ``(B,)``, the samples that moved this step (usually :attr:`active`).
        """
        res = _norm(r)
        if self.relative_to_z:
            self.tol = self._tol(_norm(z))
        met = res <= self.tol
        if self.all_active:
            # Every sample stepped: the same updates without the masks.
            self.all_active = False
            self.steps = self.steps + 1
            # An iterate that meets its tolerance is kept even if an earlier one had a lower
            # residual (possible when the tolerance moves with ‖z‖).
            better = (res <= self.best_res) | met
            # On the CPU (a check every step) a synchronisation is cheaper than a masked copy
            # of the iterate, and the residual usually decreases for every sample.
            if self.check_every == 1 and bool(better.all()):
                self.best_z = z
                self.best_res = res
                self.best_tol = self.tol
            else:
                self.best_z = torch.where(better.unsqueeze(-1), z, self.best_z)
                self.best_res = torch.where(better, res, self.best_res)
                self.best_tol = torch.where(better, self.tol, self.best_tol)
            self.res = res
            self.done = met
            return
        self.steps = self.steps + stepped.long()
        better = stepped & ((res <= self.best_res) | met)
        self.best_z = torch.where(better.unsqueeze(-1), z, self.best_z)
        self.best_res = torch.where(better, res, self.best_res)
        self.best_tol = torch.where(better, self.tol, self.best_tol)
        self.res = torch.where(stepped, res, self.res)
        self.done = self.done | (stepped & met)

    def stop(self, force: bool = False) -> bool:
        """Count a step; every ``check_every`` steps (or if ``force``) check the batch.

        Args:
            force: check now, whatever the step count (default ``False``).

        Returns:
            ``True`` when a check finds every sample done, else ``False``.

        Raises:
            implicit_layers.NonFiniteError: if a check finds a residual NaN or Inf.
        """
        due = force or self.check_due()
        self.k += 1
        if not due:
            return False
        all_done, finite, any_done = sync_flags(self.done, self.res)
        self.all_active = not any_done
        if not finite:
            self._raise_non_finite(~torch.isfinite(self.res))
        return all_done

    def finish(self) -> tuple[Tensor, SolveInfo]:
        """The result: each sample's best iterate and its statistics (one final check).

        Returns:
            ``(z, info)``: ``z`` of shape ``(B, n)``, ``info`` with fields of shape ``(B,)``;
                a sample is converged when its best iterate meets its own tolerance.

        Raises:
            implicit_layers.NonFiniteError: if a residual is NaN or Inf.
        """
        self.stop(force=True)
        return self._best(False)


def non_finite_error(solver: ForwardSolver, problem: Problem, bad: Tensor) -> NonFiniteError:
    """The error of a forward solve whose residual became NaN or Inf, naming the batch samples
    flagged in ``bad`` (bool, ``(B,)``) when the problem is batched."""
    which = ""
    if problem.batched:
        listed = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, listed[:10])) + (", ..." if len(listed) > 10 else "")
        # One bad sample fails the whole batch: a batch is one call, and returning the other
        # samples while one holds garbage would be silent.
        which = f" (batch sample(s) {shown} of {bad.numel()}; the whole batch fails)"
    return NonFiniteError(
        f"{solver.name}: the residual of the {problem.kind} problem became NaN or Inf during "
        f"the forward solve{which}. " + solver._advice(problem)
        + " Also check the inputs and parameters for NaN."
    )
