"""Placeholder until implemented."""

from ._base import LinearSolver

__all__ = ["GMRES"]


class GMRES(LinearSolver):
    name = "GMRES"

    def _solve(self, op, b, x0):
        raise NotImplementedError("GMRES is not implemented yet")
