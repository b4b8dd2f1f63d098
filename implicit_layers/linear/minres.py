"""MINRES for symmetric, possibly indefinite, systems."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot
from ._loop import LinearLoop
from ._operator import LinearOperator
from ._restart import run_in_rounds

__all__ = ["MINRES"]


class MINRES(LinearSolver):
    """MINRES (Paige & Saunders, 1975), batched, with per-sample stopping.

    For symmetric operators that may be indefinite: the Hessian at a saddle point, KKT systems
    of equality-constrained problems, ``H - σ I`` shifts. Like CG it uses a three-term Lanczos
    recurrence (constant memory), but it minimises ``‖b - A x‖`` over the Krylov subspace, so it
    needs no positive definiteness. On SPD systems it takes about as many steps as CG.
    Choosing MINRES declares the operator symmetric, as choosing CG does: an untagged operator
    is taken as symmetric (two products probe it, and a
    :class:`~implicit_layers.StructureWarning` says so when it is clearly not); one tagged
    ``symmetric=False`` is an error. For non-symmetric systems use :class:`GMRES`.

    The residual norm is tracked by the recurrence at every step (no extra product); when every
    sample's estimate meets its tolerance the true residual ``b - A x`` is recomputed, and
    samples whose true residual is still too large (rounding drift) continue from their
    iterate. The reported residual is the true one.

    Cost: one operator product and a few vector operations per step; memory for six vectors.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        max_steps: limit on the number of operator products spent in Lanczos steps (default
            1000); ``info.steps`` counts each sample's steps.
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).

    Raises:
        TypeError: if a setting has the wrong type or is passed positionally.
        ValueError: if a setting is out of range (e.g. ``rtol < 0``, ``max_steps < 1``).

    Examples:
        A symmetric indefinite system, where CG would stop at the negative eigenvalue:

        >>> A = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
        >>> x, info = il.linear.solve(A, torch.ones(3, dtype=torch.float64), il.linear.MINRES())
        >>> x, bool(info.converged)
        (tensor([-1.0000,  0.5000,  0.3333], dtype=torch.float64), True)
    """

    name = "MINRES"
    needs_symmetric = True

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        eps = torch.finfo(b.dtype).eps

        def inner(
            x: Tensor, r: Tensor, beta1: Tensor, active: Tensor, loop: LinearLoop
        ) -> tuple[Tensor, Tensor]:
            tol = loop.tol
            one = torch.ones((), dtype=b.dtype, device=b.device)
            v_prev = torch.zeros_like(r)
            v = r / torch.where(beta1 > 0, beta1, one).unsqueeze(-1)
            beta = torch.zeros_like(beta1)  # coefficient linking v_prev and v
            phibar = beta1.clone()
            res = beta1.clone()
            cs = -torch.ones_like(beta1)
            sn = torch.zeros_like(beta1)
            dbar = torch.zeros_like(beta1)
            epsln = torch.zeros_like(beta1)
            w_old = torch.zeros_like(r)
            w = torch.zeros_like(r)
            used = torch.zeros(beta1.shape, dtype=torch.int64, device=b.device)
            first = True  # the round starts right after a check
            while loop.proceed(res, done=~active, check=not first):
                first = False
                # Lanczos step.
                y = op.mv(v) - beta.unsqueeze(-1) * v_prev
                alfa = batched_dot(v, y)
                y = y - alfa.unsqueeze(-1) * v
                beta_next = torch.linalg.vector_norm(y, dim=-1)
                # Apply the previous rotation, then a new one.
                oldeps = epsln
                delta = cs * dbar + sn * alfa
                gbar = sn * dbar - cs * alfa
                epsln = sn * beta_next
                dbar = -cs * beta_next
                gamma = torch.hypot(gbar, beta_next).clamp_min(eps)
                cs = gbar / gamma
                sn = beta_next / gamma
                phi = cs * phibar
                phibar = sn * phibar
                w_new = v - oldeps.unsqueeze(-1) * w_old - delta.unsqueeze(-1) * w
                w_new = w_new / gamma.unsqueeze(-1)
                x = torch.where(active.unsqueeze(-1), x + phi.unsqueeze(-1) * w_new, x)
                w_old, w = w, w_new
                v_prev = v
                v = y / torch.where(beta_next > 0, beta_next, one).unsqueeze(-1)
                beta = beta_next
                used = used + active.long()
                res = torch.where(active, phibar.abs(), res)
                # beta_next ~ 0: the Krylov space is invariant (exact solution reached).
                breakdown = beta_next <= eps * alfa.abs()
                active = active & (res > tol) & ~breakdown
            return x, used

        return run_in_rounds(self, op, b, x0, inner)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol; for small "
            "ill-conditioned problems Dense is exact. MINRES needs a symmetric operator: for a "
            "non-symmetric one use GMRES."
        )
