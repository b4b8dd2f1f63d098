"""implicit_layers: differentiable optimization layers for PyTorch."""

from . import linear
from ._info import ConvergenceError, ConvergenceWarning, NonFiniteError, SolveInfo

__all__ = [
    "linear",
    "SolveInfo",
    "ConvergenceWarning",
    "ConvergenceError",
    "NonFiniteError",
]
