"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot, initial_residual
from ._loop import LinearLoop
from ._operator import LinearOperator

__all__ = ["CG"]


class CG(LinearSolver):
    """Conjugate gradients, batched, with per-sample step sizes and stopping.

    Needs a symmetric positive-definite operator (the Hessian at a strict minimum, an SPD
    matrix). Choosing CG declares it, as in scipy and jaxopt: an untagged operator is taken as
    symmetric positive definite (two products probe it, and a
    :class:`~implicit_layers.StructureWarning` says so when it is clearly not symmetric); one
    tagged ``symmetric=False`` or ``positive_definite=False`` is an error. Positive
    definiteness is checked as the iteration goes: a sample meeting non-positive curvature stops
    and is reported as not converged (use :class:`MINRES` for symmetric indefinite systems).

    Each iteration costs one operator product. Iterations to a relative tolerance grow like
    ``sqrt(cond(A))``.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        rtol: relative tolerance. ``None`` (default) inherits the forward solver's tolerance
            when used as ``backward=``, else ``1e-10`` in float64 and ``1e-5`` in float32.
        atol: absolute tolerance (default ``0.0``).
        max_steps: iteration limit (default 1000).
        check_every: steps between convergence checks (each a device synchronisation); ``None``
            (default) means every step on the CPU, every 8 on accelerators.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what happens when a
            sample does not converge (see :class:`~implicit_layers.linear.LinearSolver`).

    Raises:
        TypeError: if a setting has the wrong type or is passed positionally.
        ValueError: if a setting is out of range (e.g. ``rtol < 0``, ``max_steps < 1``).

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...                           il.linear.CG(rtol=1e-12))
        >>> x, int(info.steps)
        (tensor([0.0909, 0.6364], dtype=torch.float64), 2)

        As the backward solver of an argmin layer (its Hessian is symmetric positive definite):

        >>> theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> w = il.argmin(lambda w, t: ((w - t) ** 2).sum() + (w**4).sum(),
        ...               torch.zeros(2, dtype=torch.float64), theta, backward=il.linear.CG())
        >>> w.sum().backward()
    """

    name = "CG"
    needs_symmetric = True
    needs_positive_definite = True

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        loop = LinearLoop(self, b)
        x, r = initial_residual(op, b, x0)
        p = r.clone()
        rs = batched_dot(r, r)
        # Squared norms are compared with the squared tolerance: no square root per step.
        tol2 = loop.tol * loop.tol
        loop.done = rs <= tol2
        # A NaN/Inf sample fails the curvature test below and stops as ``bad``, so the
        # finiteness test can wait until the end (finite=False: one synchronisation per check).
        # On the CPU (a check every step) one more synchronisation is cheaper than the masks
        # it saves: while no sample is done and every curvature is positive the step runs
        # without them.
        unmasked = loop.check_every == 1
        inplace: bool | None = None
        while loop.proceed(rs, finite=False):
            Ap = op.mv(p)
            if inplace is None:
                inplace = loop.inplace(b, Ap, x)
            pAp = batched_dot(p, Ap)
            if unmasked and loop.all_active and inplace and bool((pAp > 0).all()):
                alpha = (rs / pAp).unsqueeze(-1)
                x.addcmul_(alpha, p)
                r.addcmul_(alpha, Ap, value=-1.0)
                rs_new = batched_dot(r, r)
                p.mul_((rs_new / rs).unsqueeze(-1)).add_(r)
                loop.steps += 1
                rs = rs_new
                loop.done = rs <= tol2
                continue
            active = ~loop.done
            step_ok = active & (pAp > 0)
            loop.bad = loop.bad | (active ^ step_ok)  # active with non-positive curvature
            if inplace:
                # Masked-out samples may divide by zero here; ``where`` discards those values.
                alpha = torch.where(step_ok, rs / pAp, 0.0).unsqueeze(-1)
                x.addcmul_(alpha, p)
                r.addcmul_(alpha, Ap, value=-1.0)
                rs_new = batched_dot(r, r)
                beta = torch.where(step_ok, rs_new / rs, 0.0).unsqueeze(-1)
                p.mul_(beta).add_(r)
                loop.steps += step_ok
            else:
                # Guarded divisions, so that no NaN reaches the gradient of a masked sample.
                alpha = torch.where(step_ok, rs / torch.where(step_ok, pAp, 1.0), 0.0)
                alpha = alpha.unsqueeze(-1)
                x = x + alpha * p
                r = r - alpha * Ap
                rs_new = batched_dot(r, r)
                beta = torch.where(step_ok, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
                p = r + beta.unsqueeze(-1) * p
                loop.steps = loop.steps + step_ok.long()
            rs = rs_new
            # ``done | bad`` equals ``~step_ok``: a sample that did not step is done or bad.
            loop.done = ~step_ok | (rs <= tol2)
        return x, loop.info(rs.sqrt(), watch=rs)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol. If the operator may be "
            "indefinite (a saddle point rather than a minimum), use MINRES or GMRES; for small "
            "ill-conditioned problems Dense is exact."
        )
