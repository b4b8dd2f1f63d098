"""Conjugate gradients for symmetric positive-definite systems."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, batched_dot, initial_residual
from ._loop import LinearLoop, autograd_records, first_product
from ._operator import LinearOperator

__all__ = ["CG", "cg_step"]


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
        max_steps: iteration limit (default 1000).
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).

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
        mv = op.mv
        if torch.is_grad_enabled() and not b.requires_grad and not x.requires_grad:
            # Whether autograd records the solve depends on the operator too (a product
            # that closes over tensors requiring grad): the first product tells, and is
            # reused by the first step.
            mv = first_product(op.mv, op.mv(p))
        variant = _RecordedSteps if autograd_records(b, x, getattr(mv, "first", None)) else _InPlaceSteps
        steps = variant(mv, x, r, p, rs, tol2, loop)
        # One loop; the variants differ in their step. A NaN/Inf sample fails the curvature
        # test and stops, so the finiteness test can wait until the end (finite=False: one
        # synchronisation per check).
        while loop.proceed(steps.rs, active=steps.active, finite=False):
            steps.step()
        return steps.finish()

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol. If the operator may be "
            "indefinite (a saddle point rather than a minimum), use MINRES or GMRES; for small "
            "ill-conditioned problems Dense is exact."
        )


class _RecordedSteps:
    """CG steps that autograd may record: new tensors at every step, bool masks and guarded
    divisions (no NaN of a masked sample reaches a gradient), per-sample entries ``(B,)``."""

    def __init__(
        self, mv: Callable[[Tensor], Tensor], x: Tensor, r: Tensor, p: Tensor, rs: Tensor,
        tol2: Tensor, loop: LinearLoop,
    ) -> None:
        self.mv, self.x, self.r, self.p, self.rs, self.tol2, self.loop = mv, x, r, p, rs, tol2, loop
        self.active = ~loop.done

    def step(self) -> None:
        loop, p, rs, active = self.loop, self.p, self.rs, self.active
        Ap = self.mv(p)
        pAp = batched_dot(p, Ap)
        step_ok = active & (pAp > 0)
        loop.bad = loop.bad | (active ^ step_ok)  # active with non-positive curvature
        alpha = torch.where(step_ok, rs / torch.where(step_ok, pAp, 1.0), 0.0)
        alpha = alpha.unsqueeze(-1)
        self.x = self.x + alpha * p
        r = self.r = self.r - alpha * Ap
        rs_new = batched_dot(r, r)
        beta = torch.where(step_ok, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        self.p = r + beta.unsqueeze(-1) * p
        loop.steps = loop.steps + step_ok.long()
        self.rs = rs_new
        # a sample that did not step is done or bad
        self.active = step_ok & ~(rs_new <= self.tol2)

    def finish(self) -> tuple[Tensor, SolveInfo]:
        self.loop.done = ~self.active
        return self.x, self.loop.info(self.rs.sqrt(), watch=self.rs)


class _InPlaceSteps:
    """CG steps without autograd (:func:`cg_step`): in-place updates, masks folded into the
    step sizes, no synchronisation between checks; per-sample entries ``(B, 1, 1)``."""

    def __init__(
        self, mv: Callable[[Tensor], Tensor], x: Tensor, r: Tensor, p: Tensor, rs: Tensor,
        tol2: Tensor, loop: LinearLoop,
    ) -> None:
        batch, n = x.shape
        self.mv, self.x, self.p, self.loop = mv, x, p, loop
        # Column views (B, n, 1) and rows (B, 1, n), made once (the updates are in place, so
        # they stay current): the dot products are single batched products of shape
        # (B, 1, 1), which broadcast against the columns without further views.
        self.xc, self.rc, self.pc = x.view(batch, n, 1), r.view(batch, n, 1), p.view(batch, n, 1)
        self.pr, self.rr = p.view(batch, 1, n), r.view(batch, 1, n)
        self.rs = rs.view(batch, 1, 1)
        self.active = (~loop.done).view(batch, 1, 1)
        self.tol2 = tol2.view(batch, 1, 1)
        self.zero = torch.zeros((), dtype=x.dtype, device=x.device)
        # Each step's flags of the samples that stepped, kept (references) and counted a
        # batch at a time: one op per step fewer than counting as the loop goes.
        self.stepped: list[Tensor] = []
        self.steps = loop.steps.view(batch, 1)

    def step(self) -> None:
        self.rs, self.active, ok = cg_step(
            self.mv, self.p, self.xc, self.rc, self.pc, self.pr, self.rr, self.rs, self.active,
            self.tol2, self.zero,
        )
        self.stepped.append(ok)
        if len(self.stepped) == _COUNT_EVERY:
            self._count()

    def _count(self) -> None:
        self.steps.add_(torch.cat(self.stepped, dim=-1).sum(-1))
        self.stepped = []

    def finish(self) -> tuple[Tensor, SolveInfo]:
        if self.stepped:
            self._count()
        loop, batch = self.loop, self.x.shape[0]
        rs, active, tol2 = self.rs.view(batch), self.active.view(batch), self.tol2.view(batch)
        # stopped without converging: non-positive curvature (or NaN)
        loop.bad = ~active & (rs > tol2)
        loop.done = ~active
        return self.x, loop.info(rs.sqrt(), watch=rs)


# Steps between two counts of the per-sample step flags in CG's in-place steps.
_COUNT_EVERY = 16


def cg_step(
    mv: Callable[[Tensor], Tensor], p: Tensor, xc: Tensor, rc: Tensor, pc: Tensor,
    pr: Tensor, rr: Tensor, rs: Tensor, active: Tensor, tol2: Tensor, zero: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One conjugate-gradient step for the ``active`` samples, in place (no autograd).

    Updates the iterate, residual and search direction (through their views); a sample with
    non-positive curvature ``pᵀ A p`` stops. Free of host synchronisation and
    of Python branches on data (it compiles with ``torch.compile(fullgraph=True)``).

    Args:
        mv: the operator product on ``(B, n)``.
        p: the search direction ``(B, n)`` (``pc`` and ``pr`` are views of it).
        xc, rc, pc: iterate, residual and search direction as columns ``(B, n, 1)``.
        pr, rr: search direction and residual as rows ``(B, 1, n)``.
        rs: ``‖r‖²``, ``(B, 1, 1)``.
        active: ``(B, 1, 1)`` bool, the samples that step.
        tol2: ``(B, 1, 1)`` squared tolerances.
        zero: a 0-dim zero of the dtype.

    Returns:
        ``(rs, active, stepped)``: the new squared residual norms, the samples still stepping
        and those that took this step (all ``(B, 1, 1)``).
    """
    Ap = mv(p).unsqueeze(-1)
    pAp = torch.bmm(pr, Ap)
    ok = (pAp > 0) & active
    # Masked-out samples may divide by zero here; ``where`` discards those values.
    alpha = torch.where(ok, rs / pAp, zero)
    xc.addcmul_(alpha, pc)
    rc.addcmul_(alpha, Ap, value=-1.0)
    rs_new = torch.bmm(rr, rc)
    # p ← r + β p (β = 0 for the samples that stopped)
    torch.addcmul(rc, pc, torch.where(ok, rs_new / rs, zero), out=pc)
    return rs_new, ok & (rs_new > tol2), ok
