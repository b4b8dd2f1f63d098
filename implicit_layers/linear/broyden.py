"""Placeholder until implemented."""

from ._base import LinearSolver

__all__ = ["Broyden"]


class Broyden(LinearSolver):
    name = "Broyden"

    def _solve(self, op, b, x0):
        raise NotImplementedError("Broyden is not implemented yet")
