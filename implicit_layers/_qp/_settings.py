"""Settings of the QP layer's forward solver and the per-sample result it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .._config import Settings, check_nonnegative, check_positive_int
from .._info import OnFailure, SolveInfo, check_on_failure
from ._ipm import STATUS_NAMES

__all__ = ["InteriorPoint", "QPInfo", "Infeasible"]

Infeasible = Literal["flag", "closest"]


class InteriorPoint(Settings):
    """The batched primal-dual interior-point method behind :func:`~implicit_layers.qp`.

    Mehrotra's predictor-corrector on the slack form ``Gz + s = h``, one batched Cholesky
    factorisation per iteration for the whole batch (on the CPU, for the samples still
    running, and in float32 for the first iterations, far from the solution, while the
    residuals stay float64), regularised so that LPs, singular ``Q`` and rank-deficient or
    duplicated constraints converge; near the solution an
    equality-constrained solve on the guessed active set refines ``z`` to rounding. Samples
    stop independently; infeasible and unbounded samples are detected by certificates on
    their diverging iterates.

    Args:
        tol: relative KKT tolerance (stationarity, feasibility, complementarity, each scaled by
            the problem's data). ``None`` (default): ``1e-9`` in float64, ``1e-5`` in float32.
        max_steps: iteration limit (default 50).
        check_every: iterations between convergence checks, each one host synchronisation
            (default 2; on the CPU, where a check costs nothing, 2 still measured faster than
            1: a check also tries the polish and gathers the running samples).
        on_failure: ``"warn"`` (default) emits one
            :class:`~implicit_layers.ConvergenceWarning` naming the failed samples, ``"raise"``
            raises :class:`~implicit_layers.ConvergenceError`, ``"ignore"`` does neither (the
            per-sample status is in the returned :class:`QPInfo`).
        infeasible: ``"flag"`` (default) returns the last iterate of an infeasible sample
            (meaningless, flagged by ``info.status``); ``"closest"`` returns instead the
            solution of the closest feasible problem: ``h`` and ``b`` shifted by the smallest
            (least-squares) amount that makes the constraints feasible, with a gradient
            through both solves. Unbounded samples are only flagged.

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: a setting out of range.

    Examples:
        >>> il.InteriorPoint(tol=1e-8)
        InteriorPoint(tol=1e-08)
    """

    def __init__(
        self,
        *,
        tol: float | None = None,
        max_steps: int = 50,
        check_every: int = 2,
        on_failure: OnFailure = "warn",
        infeasible: Infeasible = "flag",
    ) -> None:
        self.tol = check_nonnegative(tol, "tol")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}. Pass None for the dtype's default.")
        self.max_steps = check_positive_int(max_steps, "max_steps")
        self.check_every = check_positive_int(check_every, "check_every")
        self.on_failure = check_on_failure(on_failure)
        if infeasible not in ("flag", "closest"):
            raise ValueError(f"infeasible must be 'flag' or 'closest', got {infeasible!r}.")
        self.infeasible = infeasible

    def resolved_tol(self, dtype: torch.dtype) -> float:
        """``tol``, or the default of ``dtype`` when it is ``None``."""
        if self.tol is not None:
            return self.tol
        return 1e-9 if dtype == torch.float64 else 1e-5


@dataclass
class QPInfo(SolveInfo):
    """:class:`~implicit_layers.SolveInfo` of a QP solve, with a per-sample status.

    Attributes:
        status: int64 tensor, ``(B,)`` or ``()``: 0 solved, 1 primal infeasible, 2 dual
            infeasible (unbounded), 3 max steps, 4 inaccurate (called solved, but the answer
            fails the check in the original units made for data of very different scales; see
            the troubleshooting guide) (see :attr:`status_names`).
        duals: ``(λ, ν)``, the multipliers of ``Gz <= h`` and ``Az = b`` (detached).
    """

    status: Tensor | None = None
    duals: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def status_names(self) -> list[str]:
        """The status of every sample in words ("solved", "primal infeasible", ...)."""
        assert self.status is not None
        return [STATUS_NAMES[int(c)] for c in self.status.reshape(-1)]
