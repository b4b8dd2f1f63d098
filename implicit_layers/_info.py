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
    """A forward or backward solve stopped at ``max_steps`` before reaching its tolerance."""


class StructureWarning(UserWarning):
    """An operator lacks the structure its linear solver assumes (CG on a non-symmetric one)."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when a solver has ``on_failure="raise"``."""


class NonFiniteError(FloatingPointError):
    """An iterate or residual became NaN or Inf; the solve cannot produce a usable result."""


@dataclass
class SolveInfo:
    """Statistics of one solve.

    For batched problems every field holds one entry per batch element (shape ``(B,)``);
    for unbatched problems the fields are 0-d tensors.

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

    @property
    def all_converged(self) -> bool:
        """Whether every batch element converged (synchronises with the device)."""
        return bool(self.converged.all())

    def squeeze_batch(self) -> SolveInfo:
        """Remove the batch dimension (of size 1) from every field, in place; returns ``self``."""
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


def report_failure(info: SolveInfo, on_failure: OnFailure, what: str, advice: str) -> None:
    """Warn or raise when some batch element of ``info`` did not converge.

    Args:
        info: statistics of the finished solve.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        what: which solve this was, e.g. ``"forward solve of fixed_point"``.
        advice: what the user can change.
    """
    if on_failure == "ignore" or bool(info.converged.all()):
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

