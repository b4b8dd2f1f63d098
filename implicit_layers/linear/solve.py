"""``solve(A, b, solver=...)``: the functional entry point to the linear solvers."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .._config import check_float_tensor
from .._info import SolveInfo
from ._base import LinearSolver
from ._operator import FunctionOperator, LinearOperator, MatrixOperator

__all__ = ["solve"]


def solve(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    b: Tensor,
    solver: LinearSolver | None = None,
    *,
    x0: Tensor | None = None,
    symmetric: bool | None = None,
    positive_definite: bool | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve the linear system ``A x = b`` (or a batch of them).

    Args:
        A: a matrix of shape ``(n, n)``, a batch of matrices ``(B, n, n)``, a
            :class:`LinearOperator`, or a callable ``mv(v) -> A v`` acting on ``b``'s shape.
        b: right-hand side, shape ``(n,)`` or ``(B, n)`` (with a batched matrix or operator).
        solver: a :class:`LinearSolver`; default :class:`GMRES`, or :class:`CG` when ``A`` is
            tagged symmetric positive definite.
        x0: initial guess shaped like ``b``.
        symmetric: structure tag for ``A`` (auto-detected for matrices; ``False`` by default for
            callables).
        positive_definite: structure tag for ``A`` (``None``: unknown).

    Returns:
        ``(x, info)``: ``x`` shaped like ``b``; ``info`` a :class:`SolveInfo` whose fields have
        shape ``(B,)`` for a batched ``b`` and ``()`` otherwise.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = solve(A, torch.ones(2, dtype=torch.float64), solver=CG())
    """
    check_float_tensor(b, "b")
    if b.dim() not in (1, 2):
        raise ValueError(
            f"b must have shape (n,) or (B, n), got shape {tuple(b.shape)}. Flatten each "
            "right-hand side to a vector first."
        )
    unbatched = b.dim() == 1
    bb = b.unsqueeze(0) if unbatched else b
    batch, n = bb.shape
    if isinstance(A, LinearOperator):
        op = A
    elif isinstance(A, Tensor):
        check_float_tensor(A, "A")
        if A.dim() == 3 and unbatched:
            raise ValueError(
                f"A is a batch of matrices {tuple(A.shape)} but b has shape {tuple(b.shape)}; "
                "give b the shape (B, n)."
            )
        op = MatrixOperator(
            A, batch=batch, symmetric=symmetric, positive_definite=positive_definite
        )
    elif callable(A):
        def mv(v: Tensor) -> Tensor:
            out = A(v.squeeze(0) if unbatched else v)
            if not isinstance(out, Tensor) or out.shape != (v.shape[1:] if unbatched else v.shape):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"A (a callable) must return a tensor shaped like its input "
                    f"{tuple(b.shape)}, got {got}."
                )
            return out.unsqueeze(0) if unbatched else out

        op = FunctionOperator(
            mv, batch, n, b.dtype, b.device,
            symmetric=bool(symmetric), positive_definite=positive_definite,
        )
    else:
        raise TypeError(
            "A must be a tensor (n, n) or (B, n, n), a LinearOperator, or a callable v -> A v; "
            f"got {type(A).__name__}."
        )
    if op.size != n or op.batch != batch:
        raise ValueError(
            f"A acts on vectors of size {op.size} (batch {op.batch}) but b has shape "
            f"{tuple(b.shape)}."
        )
    if solver is None:
        from .cg import CG
        from .gmres import GMRES

        solver = CG() if (op.symmetric and op.positive_definite) else GMRES()
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            f"solver must be a LinearSolver such as il.linear.CG(), got {type(solver).__name__}."
        )
    if x0 is not None:
        check_float_tensor(x0, "x0")
        if x0.shape != b.shape:
            raise ValueError(f"x0 must be shaped like b {tuple(b.shape)}, got {tuple(x0.shape)}.")
        x0 = x0.unsqueeze(0) if unbatched else x0
    x, info = solver.solve(op, bb, x0)
    if unbatched:
        return x.squeeze(0), info.squeeze_batch()
    return x, info
