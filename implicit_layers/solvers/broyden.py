"""Broyden's ("good") quasi-Newton method with a limited-memory inverse Jacobian."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_positive_int
from .._info import OnFailure, SolveInfo
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
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every,
            on_failure=on_failure,
        )
        self.memory = check_positive_int(memory, "memory")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        z = z0
        r = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, r)
        us: list[Tensor] = []
        vs: list[Tensor] = []
        # Without autograd the factors live in preallocated (B, memory, n) buffers, filled in
        # order and reset on restart: no re-stacking of the history at every product. Unrolled
        # (differentiable) solves keep lists, since autograd forbids overwriting saved tensors.
        buffered = not differentiable
        if buffered:
            B, n = z.shape
            Ubuf = z.new_empty(B, self.memory, n)
            Vbuf = z.new_empty(B, self.memory, n)

        def factors() -> tuple[Tensor, Tensor]:
            if buffered:
                return Ubuf[:, : len(us)], Vbuf[:, : len(us)]
            return torch.stack(us, 1), torch.stack(vs, 1)

        # Products with the history as row vectors, (B, 1, n) @ (B, n, k) and (B, 1, k) @
        # (B, k, n): several times faster on the CPU than the column form (B, k, n) @ (B, n, 1).
        def apply_h(x: Tensor) -> Tensor:  # H x = x + Uᵀ (V x)
            if not us:
                return x
            U, V = factors()
            row = x.unsqueeze(1)
            return (row + (row @ V.mT) @ U).squeeze(1)

        def apply_ht(x: Tensor) -> Tensor:  # Hᵀ x = x + Vᵀ (U x)
            if not us:
                return x
            U, V = factors()
            row = x.unsqueeze(1)
            return (row + (row @ U.mT) @ V).squeeze(1)

        # An update whose denominator sᵀHy is tiny relative to ‖s‖‖Hy‖ carries no reliable
        # curvature information and would blow up the estimate: it is skipped (per sample).
        guard = torch.finfo(z.dtype).eps ** 0.5
        Hr = r  # H r with H = I
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            mask = active.unsqueeze(-1)
            s = torch.where(mask, -Hr, torch.zeros_like(r))
            z = z + s
            r_new = problem.residual(z, create_graph=differentiable)
            if len(us) == self.memory:
                # Restart from H = I when the memory is full. Dropping only the oldest update
                # would leave the others, each built on the estimate that included it,
                # inconsistent; on a slowly contracting map that made the iteration diverge.
                us.clear()
                vs.clear()
                h = r_new
                Hy = r_new - r
            else:
                # H y = H r_new - H r reuses H r from the step: one product with H per step
                # fewer, and H r_new serves the next step too.
                h = apply_h(r_new)
                Hy = h - Hr
            denom = _dot(s, Hy)
            scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(Hy, dim=-1)
            ok = active & (denom.abs() > guard * scale)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok.unsqueeze(-1), (s - Hy) / safe.unsqueeze(-1), torch.zeros_like(s))
            v = apply_ht(s)
            if buffered:
                Ubuf[:, len(us)] = u
                Vbuf[:, len(us)] = v
            us.append(u)
            vs.append(v)
            # The updated estimate H + u vᵀ applied to r_new, for the next step.
            Hr = h + u * _dot(v, r_new).unsqueeze(-1)
            r = r_new
            mon.record(z, r, active)
        return mon.finish()
