"""BiCGStab for general (non-symmetric) systems."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot
from ._loop import LinearLoop
from ._operator import LinearOperator
from ._restart import one_and_zero, run_in_rounds

__all__ = ["BiCGStab"]


class BiCGStab(LinearSolver):
    """BiCGStab (van der Vorst, 1992), batched, with per-sample stopping.

    For non-symmetric systems when the memory of :class:`GMRES` (``restart`` basis vectors) is
    too much: it keeps a constant number of vectors and needs only ``A v``. Its residual is not
    monotone and it can break down (a vanishing inner product); a sample that breaks down is
    frozen at its current iterate and restarted from its true residual with a fresh shadow
    vector once the round ends; a sample whose true residual stops decreasing is reported as not
    converged. GMRES is usually the more robust choice; BiCGStab wins when the Krylov dimension
    GMRES would need is large.

    The recursively updated residual drifts from the true one in finite precision; the true
    residual ``b - A x`` is recomputed when every sample's recursive residual meets its
    tolerance, and samples that have not truly converged continue. The reported residual is the
    true one.

    Cost: two operator products and a few vector operations per step; memory for eight vectors.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        max_steps: limit on the number of BiCGStab steps, each of two operator products (default
            1000); ``info.steps`` counts the steps each sample used (a sample that converges at
            the half step counts a full step).
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).

    Raises:
        TypeError: if a setting has the wrong type or is passed positionally.
        ValueError: if a setting is out of range (e.g. ``rtol < 0``, ``max_steps < 1``).

    Examples:
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, b, il.linear.BiCGStab())
        >>> torch.allclose(x, torch.linalg.solve(A, b)), bool(info.converged)
        (True, True)
    """

    name = "BiCGStab"

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        eps = torch.finfo(b.dtype).eps

        def inner(
            x: Tensor, r: Tensor, beta1: Tensor, active: Tensor, loop: LinearLoop
        ) -> tuple[Tensor, Tensor]:
            tol = loop.tol
            one, zero = one_and_zero(b)
            r_hat = r.clone()
            r_hat_norm = beta1.clone()
            rho = torch.ones_like(beta1)
            alpha = torch.ones_like(beta1)
            omega = torch.ones_like(beta1)
            p = torch.zeros_like(r)
            v = torch.zeros_like(r)
            res = beta1.clone()
            used = torch.zeros(beta1.shape, dtype=torch.int64, device=b.device)
            first = True  # the round starts right after a check
            while loop.proceed(res, done=~active, check=not first):
                first = False
                rho_new = batched_dot(r_hat, r)
                beta = (rho_new / torch.where(rho != 0, rho, one)) * (
                    alpha / torch.where(omega != 0, omega, one)
                )
                p = r + beta.unsqueeze(-1) * (p - omega.unsqueeze(-1) * v)
                v = op.mv(p)
                rv = batched_dot(r_hat, v)
                # Breakdown: r_hat is (numerically) orthogonal to r or to A p.
                broke = (rho_new.abs() <= eps * r_hat_norm * res) | (
                    rv.abs() <= eps * r_hat_norm * torch.linalg.vector_norm(v, dim=-1)
                )
                alpha = rho_new / torch.where(broke, one, rv)
                s = r - alpha.unsqueeze(-1) * v
                s_norm = torch.linalg.vector_norm(s, dim=-1)
                half = s_norm <= tol  # converged at the half step: skip the stabilising part
                t = op.mv(s)
                tt = batched_dot(t, t)
                ts = batched_dot(t, s) / torch.where(tt > 0, tt, one)
                omega = torch.where(half | (tt == 0), zero, ts)
                valid = active & ~broke
                x_new = x + alpha.unsqueeze(-1) * p + omega.unsqueeze(-1) * s
                x = torch.where(valid.unsqueeze(-1), x_new, x)
                r_new = s - omega.unsqueeze(-1) * t
                r = torch.where(valid.unsqueeze(-1), r_new, r)
                rho = rho_new
                used = used + valid.long()
                res = torch.where(valid, torch.linalg.vector_norm(r, dim=-1), res)
                # omega = 0 without convergence: the next step would divide by zero; restart.
                stalled = (omega == 0) & ~half
                active = valid & (res > tol) & ~stalled
            return x, used

        return run_in_rounds(self, op, b, x0, inner)
