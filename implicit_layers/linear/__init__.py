"""Linear solvers and operators: the backward pass of every implicit layer solves one of these.

All solvers share the interface of :class:`LinearSolver`: ``rtol``, ``atol``, ``max_steps``,
``check_every``, ``on_failure``; batched, per-sample convergence; a :class:`SolveInfo` result.
Solvers made of solvers live in :mod:`~implicit_layers.linear.combinators` ("X then Y": fall
back on failure) and :mod:`~implicit_layers.linear.timed` ("X or Y": choose by timing).
"""

from . import base, combinators, timed
from ._base import LinearSolver
from ._operator import FunctionOperator, LinearOperator, MatrixOperator
from .bicgstab import BiCGStab
from .broyden import Broyden
from .cg import CG
from .combinators import DenseThenGMRES, NeumannThenGMRES, StepsOnFailure
from .dense import Dense
from .gmres import GMRES
from .lissa import LiSSA
from .minres import MINRES
from .neumann import Neumann
from .solve import solve
from .timed import DenseOrCG, DenseOrGMRES, TimedChoices, timed_choices

__all__ = [
    "base",
    "LinearSolver",
    "LinearOperator",
    "MatrixOperator",
    "FunctionOperator",
    "solve",
    "CG",
    "MINRES",
    "GMRES",
    "BiCGStab",
    "Broyden",
    "Neumann",
    "LiSSA",
    "Dense",
    "combinators",
    "NeumannThenGMRES",
    "DenseThenGMRES",
    "StepsOnFailure",
    "timed",
    "DenseOrCG",
    "DenseOrGMRES",
    "TimedChoices",
    "timed_choices",
]
