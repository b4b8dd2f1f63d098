"""Linear solvers and operators: the backward pass of every implicit layer solves one of these.

All solvers share the interface of :class:`LinearSolver`: ``rtol``, ``atol``, ``max_steps``,
``check_every``, ``on_failure``; batched, per-sample convergence; a :class:`SolveInfo` result.
"""

from . import base
from ._base import LinearSolver
from ._operator import FunctionOperator, LinearOperator, MatrixOperator
from .bicgstab import BiCGStab
from .broyden import Broyden
from .cg import CG
from .dense import Dense
from .gmres import GMRES
from .lissa import LiSSA
from .minres import MINRES
from .neumann import Neumann
from .solve import solve

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
]
