"""implicit_layers: differentiable optimization layers for PyTorch.

Layers whose output is defined by an inner problem — a fixed point, a root or an argmin — solved
in the forward pass and differentiated in the backward pass by the implicit function theorem.
"""

from . import backward, hyper, linear, memory, nn, projection, prox, solvers
from ._info import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    SolveInfo,
    StructureWarning,
)
from ._qp import InteriorPoint, QPInfo, qp
from .functional import argmin, custom_fixed_point, custom_root, fixed_point, least_squares, root

__version__ = "0.1.0"

__all__ = [
    "fixed_point",
    "root",
    "argmin",
    "least_squares",
    "custom_root",
    "custom_fixed_point",
    "qp",
    "InteriorPoint",
    "QPInfo",
    "backward",
    "linear",
    "solvers",
    "hyper",
    "memory",
    "nn",
    "projection",
    "prox",
    "SolveInfo",
    "ConvergenceWarning",
    "ConvergenceError",
    "NonFiniteError",
    "StructureWarning",
]
