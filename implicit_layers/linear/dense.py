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
    residual of the computed solution is reported as converged: it is, unless the residual
    exceeds ``1e3`` times the tolerance (and ``1e3 eps``).

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`
    (``steps`` is 1).

    Args:
        rtol: relative tolerance. ``None`` (default) inherits the forward solver's tolerance
            when used as ``backward=``, else ``1e-10`` in float64 and ``1e-5`` in float32.
        atol: absolute tolerance (default ``0.0``).
        max_steps: unused (default 1): a direct solve takes one step.
        check_every: unused (default ``None``): a direct solve has no loop to check.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what happens when a
            sample's residual is reported not converged (see
            :class:`~implicit_layers.linear.LinearSolver`).

    Raises:
        TypeError: if a setting has the wrong type or is passed positionally.
        ValueError: if a setting is out of range.
        implicit_layers.NonFiniteError: from :meth:`~LinearSolver.solve`, when the matrix is
            singular or holds NaN/Inf for some sample.

    Examples:
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, torch.tensor([4.0, 1.0], dtype=torch.float64),
        ...                           il.linear.Dense())
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), int(info.steps)
        (True, 1)
    """

    name = "Dense"
    uses_initial_guess = False
    default_max_steps = 1

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        tol = LinearLoop(self, b).tol
        matrix = op.to_dense()
        x, err = torch.linalg.solve_ex(matrix, b)
        if bool((err != 0).any()) or not bool(torch.isfinite(x).all()):
            if not bool(torch.isfinite(b).all()):
                # In a backward, the right-hand side is the incoming gradient.
                raise NonFiniteError(
                    "Dense: the right-hand side holds NaN/Inf for at least one sample (in a "
                    "backward, the gradient arriving at the layer's output: look upstream, at "
                    "the loss); the matrix is not the cause."
                )
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
