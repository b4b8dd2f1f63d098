"""Forward solvers: the algorithms that find ``z*`` in the forward pass.

Fixed points and roots: :class:`Adaptive` (the default for fixed points: Picard, then Anderson
when the contraction is slow), :class:`Picard`, :class:`Anderson`, :class:`Broyden`.
Argmin: :class:`LBFGS`, :class:`Newton`, :class:`GradientDescent` (and :class:`Picard`, which is
gradient descent there); with a proximal operator or a constraint: :class:`ProximalGradient`.
Least squares: :class:`LevenbergMarquardt`, :class:`GaussNewton`.
"""

from . import base
from ._base import ForwardSolver
from .adaptive import Adaptive
from .anderson import Anderson
from .broyden import Broyden
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS
from .least_squares import GaussNewton, LevenbergMarquardt
from .newton import Newton
from .picard import Picard
from .proximal_gradient import ProximalGradient

__all__ = [
    "base", "ForwardSolver", "Adaptive", "Picard", "Anderson", "Broyden", "GradientDescent", "LBFGS",
    "Newton", "ProximalGradient", "GaussNewton", "LevenbergMarquardt",
]
