"""Broyden's ("good") quasi-Newton method with a limited-memory inverse Jacobian."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_positive_int
from .._info import SolveInfo
from .._problem import Problem
from ._base import ForwardSolver, Monitor

__all__ = ["Broyden"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class Broyden(ForwardSolver):
    """Good Broyden's method on ``F(z) = 0``, per sample.

    Keeps an inverse-Jacobian estimate ``H = I + Σ u_i v_iᵀ`` (starting at the identity, which
    is exact for a fixed point with ``f`` constant) and steps ``z ← z - H F(z)``. At most
    ``memory`` rank-one factors are kept: when they are all used the estimate restarts from the
    identity, so memory stays at ``2 · memory · B · n`` however many steps are taken. An update
    whose denominator ``sᵀ H y`` is below ``sqrt(eps) ‖s‖ ‖H y‖`` is skipped for that sample.
    One evaluation of ``F`` per step.

    Args:
        memory: number of rank-one updates kept before a restart (default 30).
        rtol, atol, max_steps, check_every, on_failure: see :class:`ForwardSolver`.
    """

    name = "Broyden"
    kinds = ("fixed_point", "root")

    def __init__(
        self,
        memory: int = 30,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: str = "warn",
    ) -> None:
        super().__init__(rtol, atol, max_steps, check_every, on_failure)
        self.memory = check_positive_int(memory, "memory")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        z = z0
        r = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, r)
        us: list[Tensor] = []
        vs: list[Tensor] = []

        def apply_h(x: Tensor) -> Tensor:  # H x
            if not us:
                return x
            U = torch.stack(us, 1)
            V = torch.stack(vs, 1)
            return x + (U * (V @ x.unsqueeze(-1))).sum(1)

        def apply_ht(x: Tensor) -> Tensor:  # Hᵀ x
            if not us:
                return x
            U = torch.stack(us, 1)
            V = torch.stack(vs, 1)
            return x + (V * (U @ x.unsqueeze(-1))).sum(1)

        # An update whose denominator sᵀHy is tiny relative to ‖s‖‖Hy‖ carries no reliable
        # curvature information and would blow up the estimate: it is skipped (per sample).
        guard = torch.finfo(z.dtype).eps ** 0.5
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            mask = active.unsqueeze(-1)
            s = torch.where(mask, -apply_h(r), torch.zeros_like(r))
            z = z + s
            r_new = problem.residual(z, create_graph=differentiable)
            y = r_new - r
            if len(us) == self.memory:
                # Restart from H = I when the memory is full. Dropping only the oldest update
                # would leave the others, each built on the estimate that included it,
                # inconsistent; on a slowly contracting map that made the iteration diverge.
                us.clear()
                vs.clear()
            Hy = apply_h(y)
            denom = _dot(s, Hy)
            scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(Hy, dim=-1)
            ok = active & (denom.abs() > guard * scale)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok.unsqueeze(-1), (s - Hy) / safe.unsqueeze(-1), torch.zeros_like(s))
            v = apply_ht(s)
            us.append(u)
            vs.append(v)
            r = r_new
            mon.record(z, r, active)
        return mon.finish()
