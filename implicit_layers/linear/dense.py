"""Direct solve of the materialised matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from .._info import NonFiniteError, SolveInfo
from ._base import LinearSolver
from ._loop import LinearLoop
from ._operator import LinearOperator

__all__ = ["Dense"]


class Dense(LinearSolver):
    """Materialise the ``(B, n, n)`` matrix and call :func:`torch.linalg.solve`.

    Exact up to rounding and the fastest choice for small ``n`` (a few hundred); memory grows
    as ``B n²``, so do not use it for large problems. Building the matrix costs ``n`` operator
    products (vectorised where the operator allows). ``rtol``/``atol`` only decide whether the
    residual of the computed solution is reported as converged.
    """

    name = "Dense"
    default_max_steps = 1

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        tol = LinearLoop(self, b).tol
        matrix = op.to_dense()
        x, err = torch.linalg.solve_ex(matrix, b)
        if bool((err != 0).any()) or not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                "Dense: the matrix is singular (or holds NaN/Inf) for at least one sample, so "
                "the linear system has no unique solution. Check that the problem's Jacobian is "
                "invertible at the solution (a strict minimum, a contractive fixed point)."
            )
        residual = torch.linalg.vector_norm(
            torch.bmm(matrix, x.unsqueeze(-1)).squeeze(-1) - b, dim=-1
        )
        # A direct solve is as exact as the conditioning allows; report it as converged unless
        # the residual is far (1e3x) above the requested tolerance.
        converged = residual <= torch.clamp(tol * 1e3, min=1e3 * torch.finfo(b.dtype).eps)
        steps = torch.ones(b.shape[0], dtype=torch.int64, device=b.device)
        return x, SolveInfo(
            converged=converged, steps=steps, residual=residual, solver=self.name, tolerance=tol
        )

    def _advice(self) -> str:
        # A direct solve has no steps to add: a large residual means an ill-conditioned matrix.
        return (
            "The matrix is ill-conditioned at the solution (nearly singular): compute in "
            "float64, regularise the problem (e.g. a small ridge term), or loosen rtol/atol."
        )
