"""The one registry of forward and linear solvers the parametrised tests draw from.

Each entry names a solver class, what it handles and the settings the test problems need by
default; a test selects entries by capability and may override settings for its problem.
A new solver is added here once and every conformance test picks it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pytest

import implicit_layers as il
from implicit_layers._config import SolverSettings

#: The kinds of linear systems of ``tests/test_linear.py``: symmetric positive definite,
#: symmetric indefinite, non-symmetric, and ``I - M`` with ``‖M‖ < 1`` (a fixed point's).
SYSTEMS = ("spd", "indef", "nonsym", "contract")


@dataclass(frozen=True)
class SolverCase:
    """One solver (or one configuration of it) and its capabilities.

    Attributes:
        name: test id.
        cls: the solver class.
        handles: problem kinds (forward solvers) or system kinds (linear solvers) it solves.
        settings: settings the test problems need (overridable in :meth:`make`).
        symmetric_only: a linear solver that needs a symmetric operator.
        iterative: a linear solver that iterates (every one but ``Dense``).
        estimator: a stochastic estimator, not an accurate solver (``LiSSA``).
        unrollable: a forward solver that ``Unrolled()`` can differentiate through.
        variant: a second configuration of a solver listed already (chosen explicitly).
    """

    name: str
    cls: type[SolverSettings]
    handles: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    symmetric_only: bool = False
    iterative: bool = True
    estimator: bool = False
    unrollable: bool = True
    variant: bool = False

    def make(self, **overrides: Any) -> Any:
        return self.cls(**{**self.settings, **overrides})


def _settings(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


FORWARD = (
    SolverCase("Adaptive", il.solvers.Adaptive, ("fixed_point", "root")),
    SolverCase("Picard", il.solvers.Picard, ("fixed_point", "root", "argmin")),
    SolverCase("Anderson", il.solvers.Anderson, ("fixed_point", "root")),
    SolverCase("Broyden", il.solvers.Broyden, ("fixed_point", "root")),
    SolverCase("GradientDescent", il.solvers.GradientDescent, ("argmin",)),
    SolverCase("LBFGS", il.solvers.LBFGS, ("argmin",)),
    SolverCase("Newton", il.solvers.Newton, ("argmin",), unrollable=False),
)

LINEAR = (
    SolverCase("CG", il.linear.CG, ("spd",), symmetric_only=True),
    SolverCase("MINRES", il.linear.MINRES, ("spd", "indef"), symmetric_only=True),
    SolverCase("GMRES", il.linear.GMRES, SYSTEMS),
    SolverCase("GMRES(3)", il.linear.GMRES, ("spd", "nonsym", "contract"),
               settings=_settings(restart=3), variant=True),
    SolverCase("BiCGStab", il.linear.BiCGStab, ("spd", "nonsym", "contract")),
    SolverCase("Broyden", il.linear.Broyden, ("spd", "nonsym", "contract")),
    SolverCase("Broyden(4)", il.linear.Broyden, ("nonsym", "contract"),
               settings=_settings(memory=4), variant=True),
    SolverCase("Neumann", il.linear.Neumann, ("spd", "contract")),
    # scale: above the largest eigenvalue of the test systems (at most 5).
    SolverCase("LiSSA", il.linear.LiSSA, ("spd",), settings=_settings(scale=6.0), estimator=True),
    SolverCase("Dense", il.linear.Dense, SYSTEMS, iterative=False),
)


def forward(kind: str | None = None, *, unrollable: bool | None = None) -> list[SolverCase]:
    """The forward solvers that solve ``kind`` problems (and are unrollable, if asked)."""
    return [c for c in FORWARD if (kind is None or kind in c.handles)
            and (unrollable is None or c.unrollable == unrollable)]


def linear(
    system: str | None = None,
    *,
    iterative: bool | None = None,
    estimator: bool | None = None,
    variants: bool = False,
) -> list[SolverCase]:
    """The linear solvers that solve ``system`` systems, filtered by capability."""
    return [c for c in LINEAR if (system is None or system in c.handles)
            and (iterative is None or c.iterative == iterative)
            and (estimator is None or c.estimator == estimator)
            and (variants or not c.variant)]


def by_name(cases: list[SolverCase]) -> dict[str, SolverCase]:
    return {c.name: c for c in cases}


def params(cases: list[SolverCase]) -> list[Any]:
    """``pytest.param`` per case, with the solver's name as the test id."""
    return [pytest.param(c, id=c.name) for c in cases]
