"""Placeholder until implemented."""

from ._base import LinearSolver

__all__ = ["BiCGStab"]


class BiCGStab(LinearSolver):
    name = "BiCGStab"

    def _solve(self, op, b, x0):
        raise NotImplementedError("BiCGStab is not implemented yet")
