"""The public extension API for forward solvers: what a new solver needs, nothing private.

A forward solver subclasses :class:`ForwardSolver`, sets ``name`` and ``problems`` (the problem
classes it solves, e.g. ``(FixedPointProblem, RootProblem)``), takes its
settings in ``__init__`` (keyword-only apart from at most one obvious algorithm parameter;
validated, stored under the parameter's name, frozen afterwards) and implements
``_solve(problem, z0, differentiable) -> (z, info)``. It reads the problem through
:class:`Problem` (flat ``(B, n)`` iterates: ``residual``, ``fixed_point_map``,
``value_and_grad``) and keeps its per-sample bookkeeping in a :class:`Monitor`. See
``docs/extending.md`` for a complete example.

Names:
    ForwardSolver: the base class (settings, ``solve``, failure reporting).
    Monitor: per-sample tolerance, done flags, step counts and the best iterate.
    WindowMonitor: the same bookkeeping done only at the convergence checks (no ops between
        them), for solvers that step every sample of the batch without masks. Both share
        their tolerance rule, best iterate, verdict and loop (``iterate``) with each other,
        and the check schedule with the linear solvers' ``LinearLoop``.
    Problem: the problem as a solver sees it, the base of the kinds; ``Kind`` the literal of
        the kind names.
    FixedPointProblem, RootProblem, MinimiseProblem: the kinds (each owns its residual,
        output checks, tolerance scale, adjoint structure, default adjoint and forward solvers
        and failure advice); a new kind subclasses one of them or ``Problem`` (see "A new kind
        of problem" in ``docs/extending.md``).
    CompositeProblem, LeastSquaresProblem: ``min L + g`` with ``g`` given by its proximal
        operator (``gradient_step``), and ``min ½‖r‖²`` (``residuals``), a minimisation kind.
    SolverSettings, Settings: the settings bases (``replace``, ``repr``, ``==``).
    SolveInfo: the result statistics; OnFailure the literal of ``on_failure``.
    power_iteration: a seeded estimate of the largest eigenvalue, e.g. for a step size.
"""

from .._composite import CompositeProblem
from .._config import Settings, SolverSettings
from .._info import OnFailure, SolveInfo
from .._least_squares import LeastSquaresProblem
from .._problem import FixedPointProblem, Kind, MinimiseProblem, Problem, RootProblem
from ..linear._power import power_iteration
from ._base import ForwardSolver, Monitor
from ._window import WindowMonitor

__all__ = [
    "ForwardSolver",
    "Monitor",
    "WindowMonitor",
    "Problem",
    "FixedPointProblem",
    "RootProblem",
    "MinimiseProblem",
    "CompositeProblem",
    "LeastSquaresProblem",
    "Kind",
    "Settings",
    "SolverSettings",
    "SolveInfo",
    "OnFailure",
    "power_iteration",
]
