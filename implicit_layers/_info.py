"""Solver statistics, warnings and errors shared by every solver in the library."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal, cast

import torch
from torch import Tensor

__all__ = [
    "SolveInfo",
    "ConvergenceWarning",
    "ConvergenceError",
    "NonFiniteError",
    "StructureWarning",
    "OnFailure",
]

OnFailure = Literal["warn", "raise", "ignore"]
_ON_FAILURE_CHOICES = ("warn", "raise", "ignore")


class ConvergenceWarning(UserWarning):
    """A forward or backward solve stopped at ``max_steps`` before reaching its tolerance.

    Emitted by every solver with ``on_failure="warn"`` (the default). The message names the
    solver, the solve (forward, backward (adjoint), tangent, or a plain linear solve), how many
    batch samples failed, the residual reached against the tolerance, and what to change. The
    result is still returned, with ``info.converged`` ``False`` for those samples.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     z = il.fixed_point(torch.cos, torch.zeros(2, dtype=torch.float64),
        ...                        solver=il.solvers.Picard(max_steps=3))
        >>> caught[0].category is il.ConvergenceWarning
        True
        >>> print(caught[0].message)
        Picard did not converge in the forward solve of fixed_point: 1 of 1 problem(s) stopped
        after 3 steps with residual ... > tolerance ... Raise max_steps (now 3) or loosen
        rtol/atol; a map that is not contractive may need damping, Anderson or Broyden.
    """


class StructureWarning(UserWarning):
    """An operator lacks the structure its linear solver assumes (CG on a non-symmetric one).

    Choosing :class:`~implicit_layers.linear.CG` or :class:`~implicit_layers.linear.MINRES`
    declares the operator symmetric. When the operator is untagged (``symmetric=None``: a
    callable given to :func:`~implicit_layers.linear.solve`, or the Jacobian of a root), two
    operator products with random vectors probe it, and this warning is emitted when
    ``<u, A v>`` and ``<A u, v>`` clearly differ. The solve still runs, but its result is
    unreliable: use GMRES, BiCGStab or Dense, or tag the operator ``symmetric=True`` if it is
    symmetric after all.

    Examples:
        >>> import warnings
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x, info = il.linear.solve(lambda v: A @ v, torch.tensor([1.0, 0.0]).double(),
        ...                               il.linear.CG(on_failure="ignore"))
        >>> caught[0].category is il.StructureWarning
        True
        >>> x, info = il.linear.solve(lambda v: A @ v, torch.tensor([1.0, 0.0]).double(),
        ...                           il.linear.GMRES())             # the fix
        >>> bool(info.converged)
        True
    """


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when a solver has ``on_failure="raise"``.

    Its message is the warning's. Forward and linear solvers alike take ``on_failure``; to turn
    every warning into this error without changing the solvers, use
    ``warnings.simplefilter("error", il.ConvergenceWarning)`` (which raises the warning class).

    Examples:
        >>> try:
        ...     il.fixed_point(torch.cos, torch.zeros(2, dtype=torch.float64),
        ...                    solver=il.solvers.Picard(max_steps=3, on_failure="raise"))
        ... except il.ConvergenceError as err:
        ...     print(str(err)[:42])
        Picard did not converge in the forward sol
    """


class NonFiniteError(FloatingPointError):
    """An iterate or residual became NaN or Inf; the solve cannot produce a usable result.

    Raised by forward solvers (the whole batch fails, and the message lists the bad samples),
    by linear solvers (including the adjoint solve of a backward pass, so that no NaN gradient
    is handed back), and by :class:`~implicit_layers.linear.Dense` for a singular matrix. It
    subclasses :class:`FloatingPointError`.

    Examples:
        >>> x = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
        >>> try:
        ...     il.fixed_point(lambda z, x: 0.5 * torch.cos(z) + x,
        ...                    torch.zeros(2, dtype=torch.float64), x)
        ... except il.NonFiniteError as err:
        ...     print(str(err)[:67])
        Adaptive: the residual of the fixed_point problem became NaN or Inf
    """


@dataclass
class SolveInfo:
    """Statistics of one solve.

    For batched problems every field holds one entry per batch element (shape ``(B,)``);
    for unbatched problems the fields are 0-d tensors. Layers return it with
    ``return_info=True``; :func:`~implicit_layers.linear.solve` and the solvers' ``solve``
    methods return it with the solution.

    Args:
        converged: bool tensor, ``(B,)`` or ``()``.
        steps: int64 tensor, ``(B,)`` or ``()``.
        residual: float tensor, ``(B,)`` or ``()``.
        solver: name of the solver (default ``""``).
        tolerance: float tensor, ``(B,)`` or ``()``, or ``None`` (default).
        backward: the :class:`SolveInfo` of the backward solve, or ``None`` (default).

    Attributes:
        converged: bool tensor, whether the residual reached the tolerance.
        steps: int64 tensor, iterations used (per sample: the step at which it converged).
        residual: float tensor, final residual norm.
        solver: name of the solver that produced these figures.
        tolerance: float tensor, the threshold ``max(atol, rtol * scale)`` the residual was held to.
        backward: for a forward solve, the :class:`SolveInfo` of the backward (adjoint) linear
            solve once ``backward()`` has run through this layer; ``None`` before that, and for
            backward modes that solve no linear system.
        contraction: float tensor, the contraction factor the forward solver observed (ratio of
            successive residual norms; :class:`~implicit_layers.solvers.Adaptive` fills it and
            picks the backward from it), else ``None``.
        accelerated: whether the forward solver left plain iteration for an accelerated method
            (:class:`~implicit_layers.solvers.Adaptive` after its switch to Anderson; its
            backward then takes GMRES rather than a Neumann series). Default ``False``.

    Examples:
        >>> z, info = il.fixed_point(lambda z: torch.cos(z), torch.zeros(3, dtype=torch.float64),
        ...                          return_info=True)
        >>> bool(info.converged), info.solver, info.backward is None
        (True, 'Adaptive (Picard)', True)
        >>> z, info = il.fixed_point(lambda z: torch.cos(z), torch.zeros(2, 3, dtype=torch.float64),
        ...                          batched=True, return_info=True)
        >>> info.steps.shape                           # one entry per batch element
        torch.Size([2])
    """

    converged: Tensor
    steps: Tensor
    residual: Tensor
    solver: str = ""
    tolerance: Tensor | None = None
    backward: SolveInfo | None = field(default=None, repr=False)
    contraction: Tensor | None = field(default=None, repr=False)
    accelerated: bool = field(default=False, repr=False)
    # Set by a solver that already knows every element converged (its last check found them
    # all done): report_failure then reads no flag from the device.
    _known_converged: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def all_converged(self) -> bool:
        """Whether every batch element converged (synchronises with the device).

        Examples:
            >>> info = il.SolveInfo(converged=torch.tensor([True, False]),
            ...                     steps=torch.tensor([3, 10]), residual=torch.tensor([0.0, 1.0]))
            >>> info.all_converged
            False
        """
        return bool(self.converged.all())

    def squeeze_batch(self) -> SolveInfo:
        """Remove the batch dimension (of size 1) from every field, in place.

        Returns:
            ``self``, with 0-d tensor fields (``backward`` is left as it is).

        Raises:
            RuntimeError: if a field has more than one element (a batch of ``B > 1``).

        Examples:
            >>> info = il.SolveInfo(converged=torch.tensor([True]), steps=torch.tensor([3]),
            ...                     residual=torch.tensor([1e-12]))
            >>> info.squeeze_batch().steps
            tensor(3)
        """
        for name in ("converged", "steps", "residual", "tolerance", "contraction"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.reshape(()))
        return self


def check_on_failure(value: object) -> OnFailure:
    if value not in _ON_FAILURE_CHOICES:
        raise ValueError(
            f"on_failure must be one of {_ON_FAILURE_CHOICES}, got {value!r}."
        )
    return cast(OnFailure, value)


def compiled_loop_info(flags: Tensor, *, converged: Tensor, steps: Tensor, residual: Tensor,
                       tolerance: Tensor, solver: str) -> tuple[SolveInfo, bool]:
    """The :class:`SolveInfo` of a compiled loop's per-sample statistics, and whether every
    norm stayed finite. ``flags`` is the loop's bool ``(2,)`` ``[every norm finite, every
    sample converged]``, read here in the one host synchronisation of the call; the second
    is kept in the info, so that its verdict reads nothing more from the device."""
    all_finite, all_converged = flags.tolist()
    info = SolveInfo(converged=converged, steps=steps, residual=residual, solver=solver,
                     tolerance=tolerance)
    info._known_converged = all_converged
    return info, all_finite


def report_failure(info: SolveInfo, on_failure: OnFailure, what: str, advice: str) -> None:
    """Warn or raise when some batch element of ``info`` did not converge.

    Args:
        info: statistics of the finished solve.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        what: which solve this was, e.g. ``"forward solve of fixed_point"``.
        advice: what the user can change.
    """
    if on_failure == "ignore" or info._known_converged or bool(info.converged.all()):
        return
    failed = ~info.converged
    n_failed = int(failed.sum())
    n_total = info.converged.numel()
    worst = float(info.residual[failed].max()) if info.residual.dim() else float(info.residual)
    tol = info.tolerance
    if tol is not None and tol.dim():
        tol_txt = f"{float(tol[failed].max()):.3e}"
    elif tol is not None:
        tol_txt = f"{float(tol):.3e}"
    else:
        tol_txt = "?"
    steps = int(info.steps.max())
    msg = (
        f"{info.solver} did not converge in the {what}: {n_failed} of {n_total} problem(s) "
        f"stopped after {steps} steps with residual {worst:.3e} > tolerance {tol_txt}. "
        f"{advice}"
    )
    if on_failure == "raise":
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())


# Frames in these directories are not the user's: the library itself and torch (whose
# nn.Module.__call__ and autograd engine sit between a user's call and the library).
_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the first frame
    outside this package and torch: the user's line (``z = deq(x)``, ``loss.backward()``).

    ``warnings.warn(..., skip_file_prefixes=...)`` does this from Python 3.12 on; walking the
    stack works on every supported version.
    """
    frame: FrameType | None = sys._getframe(1)  # the caller of warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level

