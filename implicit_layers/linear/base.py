"""The public extension API for linear solvers: what a new solver needs, nothing private.

A linear solver subclasses :class:`LinearSolver`, sets ``name`` (and ``needs_symmetric`` /
``needs_positive_definite`` if choosing it declares that structure), takes its settings in
``__init__`` as forward solvers do, and implements
``_solve(op, b, x0) -> (x, info)`` on ``(B, n)`` right-hand sides. A :class:`LinearLoop` holds
the per-sample tolerance, done/bad flags, step counts, the ``check_every`` synchronisation with
its NaN test, and the in-place decision; solvers that restart from the true residual run their
rounds with :func:`run_in_rounds`. See ``docs/extending.md`` for a complete example.

Names:
    LinearSolver: the base class (settings, ``solve``, structure checks, failure reporting).
    LinearOperator, MatrixOperator, FunctionOperator: operators on ``(B, n)`` vectors.
    LinearLoop: the shared loop bookkeeping; ``check_done`` its one synchronisation.
    Bookkeeping: the base LinearLoop shares with the forward solvers' monitors (the solver's
        name, the check schedule, the result).
    run_in_rounds: the outer loop of solvers that track their residual by a recurrence.
    initial_residual: ``x0`` and ``b - A x0`` as fresh tensors.
    batched_dot: per-sample dot products.
    power_iteration: a seeded estimate of the largest eigenvalue magnitude.
    symmetry_gap: the probe behind the ``needs_symmetric`` warning.
    SolverSettings, Settings: the settings bases (``replace``, ``repr``, ``==``).
    SolveInfo: the result statistics; OnFailure the literal of ``on_failure``.
"""

from .._config import Settings, SolverSettings
from .._info import OnFailure, SolveInfo
from ._base import LinearSolver, batched_dot, initial_residual, symmetry_gap
from ._loop import Bookkeeping, LinearLoop, check_done
from ._operator import FunctionOperator, LinearOperator, MatrixOperator
from ._power import power_iteration
from ._restart import Inner, run_in_rounds

__all__ = [
    "LinearSolver",
    "LinearOperator",
    "MatrixOperator",
    "FunctionOperator",
    "LinearLoop",
    "Bookkeeping",
    "check_done",
    "run_in_rounds",
    "Inner",
    "initial_residual",
    "batched_dot",
    "power_iteration",
    "symmetry_gap",
    "Settings",
    "SolverSettings",
    "SolveInfo",
    "OnFailure",
]
