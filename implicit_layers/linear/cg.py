"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot, should_stop
from ._operator import LinearOperator

__all__ = ["CG"]


class CG(LinearSolver):
    """Conjugate gradients, batched, with per-sample step sizes and stopping.

    Needs a symmetric positive-definite operator (the Hessian at a strict minimum, an SPD
    matrix). The operator must be tagged ``symmetric``; positive definiteness is checked as the
    iteration goes: a sample meeting non-positive curvature stops and is reported as not
    converged (use :class:`MINRES` for symmetric indefinite systems).

    Each iteration costs one operator product. Iterations to a relative tolerance grow like
    ``sqrt(cond(A))``.

    Args: see :class:`LinearSolver` (``max_steps`` defaults to 1000).
    """

    name = "CG"
    needs_symmetric = True
    needs_positive_definite = True

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        _, tol, check_every = self._setup(op, b)
        if x0 is None:
            x = torch.zeros_like(b)
            r = b.clone()
        else:
            x = x0.clone()
            r = b - op.mv(x)
        p = r.clone()
        rs = batched_dot(r, r)
        done = rs.sqrt() <= tol
        bad = torch.zeros_like(done)
        steps = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        zero = torch.zeros((), dtype=b.dtype, device=b.device)
        for k in range(self.max_steps):
            if k % check_every == 0 and should_stop(done, rs, self.name):
                break
            active = ~done
            Ap = op.mv(p)
            pAp = batched_dot(p, Ap)
            curvature_ok = pAp > 0
            bad = bad | (active & ~curvature_ok)
            step_ok = active & curvature_ok
            alpha = torch.where(step_ok, rs / torch.where(curvature_ok, pAp, 1.0), zero)
            x = x + alpha.unsqueeze(-1) * p
            r = r - alpha.unsqueeze(-1) * Ap
            rs_new = batched_dot(r, r)
            beta = torch.where(step_ok, rs_new / torch.where(rs > 0, rs, 1.0), zero)
            p = r + beta.unsqueeze(-1) * p
            rs = rs_new
            steps = steps + step_ok.long()
            done = done | (rs.sqrt() <= tol) | bad
        else:
            should_stop(done, rs, self.name)
        residual = rs.sqrt()
        converged = (residual <= tol) & ~bad
        return x, self._info(converged, steps, residual, tol)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol. If the operator may be "
            "indefinite (a saddle point rather than a minimum), use MINRES or GMRES; for small "
            "ill-conditioned problems Dense is exact."
        )
