"""Placeholder until implemented."""

from ._base import LinearSolver

__all__ = ["LiSSA"]


class LiSSA(LinearSolver):
    name = "LiSSA"

    def _solve(self, op, b, x0):
        raise NotImplementedError("LiSSA is not implemented yet")
