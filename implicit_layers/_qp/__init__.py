"""Batched, differentiable quadratic programs (OptNet layers)."""

from ._functional import qp
from ._kkt import KKTSolve
from ._layer import QPLayer
from ._settings import InteriorPoint, QPInfo

__all__ = ["qp", "QPLayer", "InteriorPoint", "QPInfo", "KKTSolve"]
