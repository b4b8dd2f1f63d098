"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot, initial_residual, should_stop
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
        x, r = initial_residual(op, b, x0)
        p = r.clone()
        rs = batched_dot(r, r)
        # Squared norms are compared with the squared tolerance: no square root per step.
        tol2 = tol * tol
        done = rs <= tol2
        bad = torch.zeros_like(done)
        steps = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        inplace: bool | None = None
        for k in range(self.max_steps):
            # A NaN/Inf sample fails the curvature test below and stops as ``bad``, so the
            # finiteness check can wait until after the loop (one synchronisation, not one
            # per check).
            all_active = False
            if k % check_every == 0:
                # On the CPU (a check every step) one more synchronisation is cheaper than
                # the masks it saves: while no sample is done and every curvature is positive
                # the step below runs without them.
                all_active = check_every == 1 and not bool(done.any())
                if not all_active and bool(done.all()):
                    break
            Ap = op.mv(p)
            if inplace is None:
                # In-place updates unless autograd records the solve (a differentiable
                # operator or right-hand side, e.g. a double backward); then every tensor the
                # graph saves must stay intact.
                inplace = not (torch.is_grad_enabled() and (
                    b.requires_grad or Ap.requires_grad or x.requires_grad
                ))
            pAp = batched_dot(p, Ap)
            if all_active and inplace and bool((pAp > 0).all()):
                alpha = (rs / pAp).unsqueeze(-1)
                x.addcmul_(alpha, p)
                r.addcmul_(alpha, Ap, value=-1.0)
                rs_new = batched_dot(r, r)
                p.mul_((rs_new / rs).unsqueeze(-1)).add_(r)
                steps += 1
                rs = rs_new
                done = rs <= tol2
                continue
            active = ~done
            step_ok = active & (pAp > 0)
            bad = bad | (active ^ step_ok)  # active with non-positive curvature
            if inplace:
                # Masked-out samples may divide by zero here; ``where`` discards those values.
                alpha = torch.where(step_ok, rs / pAp, 0.0).unsqueeze(-1)
                x.addcmul_(alpha, p)
                r.addcmul_(alpha, Ap, value=-1.0)
                rs_new = batched_dot(r, r)
                beta = torch.where(step_ok, rs_new / rs, 0.0).unsqueeze(-1)
                p.mul_(beta).add_(r)
                steps += step_ok
            else:
                # Guarded divisions, so that no NaN reaches the gradient of a masked sample.
                alpha = torch.where(step_ok, rs / torch.where(step_ok, pAp, 1.0), 0.0)
                alpha = alpha.unsqueeze(-1)
                x = x + alpha * p
                r = r - alpha * Ap
                rs_new = batched_dot(r, r)
                beta = torch.where(step_ok, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
                p = r + beta.unsqueeze(-1) * p
                steps = steps + step_ok.long()
            rs = rs_new
            # ``done | bad`` equals ``~step_ok``: a sample that did not step is done or bad.
            done = ~step_ok | (rs <= tol2)
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
