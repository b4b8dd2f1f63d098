"""Aliases of the names that moved to :mod:`implicit_layers.linear.timed` (the timed default
adjoint solvers and their cache) and :mod:`implicit_layers.linear.combinators`."""

from .linear.combinators import DenseThenGMRES as DenseElseGMRES
from .linear.timed import (
    DenseOrCG,
    DenseOrGMRES,
    prefer_dense,
    probe_columns,
    problem_key,
    timed_choices,
)
from .linear.timed import timed_default as measured_default

__all__ = [
    "DenseElseGMRES", "DenseOrCG", "DenseOrGMRES", "forget", "measured_default", "prefer_dense",
    "probe_columns", "problem_key",
]

#: The remembered choices (the dict of :data:`~implicit_layers.linear.timed.timed_choices`).
_choices = timed_choices.choices


def forget() -> None:
    """Drop every remembered choice (``il.linear.timed_choices.clear()``)."""
    timed_choices.clear()
