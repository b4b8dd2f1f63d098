"""Limited-memory BFGS with per-sample curvature pairs and line search."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo
from .._problem import MinimiseProblem, Problem
from ._base import ForwardSolver, Monitor
from ._linesearch import descent_step, where_active

__all__ = ["LBFGS"]


class LBFGS(ForwardSolver):
    """L-BFGS for argmin problems, batched: every sample keeps its own curvature pairs,
    scaling and line-search step.

    Each step costs one objective-and-gradient evaluation per line-search trial (usually one)
    plus ``O(memory · n)`` work for the two-loop recursion. Curvature pairs with
    ``sᵀy <= 0`` are skipped per sample, so the quasi-Newton matrix stays positive definite.

    Used as ``solver=`` of :func:`~implicit_layers.argmin`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        memory: number of curvature pairs kept (default 10); the one positional argument.
        max_steps: iteration limit (default 500).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``memory`` is
            passed positionally.
        ValueError: if a setting is out of range (``memory < 1``, ``rtol < 0``, ...).

    Examples:
        >>> t = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w, info = il.argmin(lambda w, t: ((w - t) ** 2).sum() + (w**4).sum(),
        ...                     torch.zeros(2, dtype=torch.float64), t,
        ...                     solver=il.solvers.LBFGS(5), return_info=True)
        >>> torch.allclose(2 * (w - t) + 4 * w**3, torch.zeros(2, dtype=torch.float64))
        True
    """

    name = "LBFGS"
    problems = (MinimiseProblem,)

    def __init__(self, memory: int = 10, **settings: Unpack[SolverKeywords]) -> None:
        super().__init__(**settings)
        self.memory = check_positive_int(memory, "memory")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        z = z0
        v, g = problem.value_and_grad(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, g)
        S: list[Tensor] = []
        Y: list[Tensor] = []
        rhos: list[Tensor] = []
        gamma = None
        eps = torch.finfo(z.dtype).eps
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            # Two-loop recursion; pairs with rho = 0 are skipped for that sample.
            q = g
            alphas = []
            for s, y, rho in zip(reversed(S), reversed(Y), reversed(rhos), strict=True):
                a = rho * (s * q).sum(-1)
                q = q - a.unsqueeze(-1) * y
                alphas.append(a)
            if gamma is None:
                # First step: unit length along the steepest descent direction.
                gnorm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
                d = q / gnorm.clamp_min(torch.finfo(z.dtype).tiny)
            else:
                d = gamma.unsqueeze(-1) * q
            for s, y, rho, a in zip(S, Y, rhos, reversed(alphas), strict=True):
                b = rho * (y * d).sum(-1)
                d = d + (a - b).unsqueeze(-1) * s
            d = -d
            z_new, v_new, g_new = descent_step(problem, z, v, g, d, active, differentiable)
            s = z_new - z
            y = g_new - g
            sy = (s * y).sum(-1)
            yy = (y * y).sum(-1)
            valid = active & (sy > eps * yy)
            rho = torch.where(valid, 1.0 / torch.where(valid, sy, 1.0), 0.0)
            S.append(s)
            Y.append(y)
            rhos.append(rho)
            if len(S) > self.memory:
                S.pop(0)
                Y.pop(0)
                rhos.pop(0)
            new_gamma = sy / torch.where(valid, yy, 1.0)
            gamma = torch.where(valid, new_gamma, gamma if gamma is not None else torch.ones_like(sy))
            z, v, g = where_active(active, (z_new, v_new, g_new), (z, v, g))
            mon.record(z, g, active)
        return mon.finish()
