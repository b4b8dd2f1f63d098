"""Placeholder until implemented."""

from ._base import LinearSolver

__all__ = ["MINRES"]


class MINRES(LinearSolver):
    name = "MINRES"

    def _solve(self, op, b, x0):
        raise NotImplementedError("MINRES is not implemented yet")
