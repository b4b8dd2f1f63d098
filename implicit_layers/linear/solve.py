"""``solve(A, b, solver=...)``: the functional entry point to the linear solvers."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .._capture import refuse_vmap
from .._config import check_float_tensor
from .._eager import run_eagerly
from .._info import SolveInfo
from ._base import LinearSolver
from ._operator import FunctionOperator, LinearOperator, MatrixOperator

__all__ = ["solve"]


@run_eagerly  # one graph break under torch.compile: its checks and verdicts read the host
def solve(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    b: Tensor,
    solver: LinearSolver | None = None,
    *,
    x0: Tensor | None = None,
    batched: bool | None = None,
    symmetric: bool | None = None,
    positive_definite: bool | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve the linear system ``A x = b`` (or a batch of them).

    What ``b`` holds depends on ``A``:

    * a matrix ``(n, n)`` or a :class:`LinearOperator`: ``b`` is ``(n,)`` (one system) or
      ``(B, n)`` (``B`` systems with the same matrix, or the operator's batch);
    * a batch of matrices ``(B, n, n)``: ``b`` is ``(B, n)``;
    * a callable ``v -> A v``: it acts on tensors shaped like ``b``, whatever their shape, and
      ``b`` is **one** system with ``b.numel()`` unknowns (as in jaxopt), unless
      ``batched=True``: then the leading dimension of ``b`` indexes independent systems, each
      solved to its own tolerance, and the callable maps ``(B, ...)`` to ``(B, ...)``.

    Args:
        A: a matrix ``(n, n)``, a batch of matrices ``(B, n, n)``, a :class:`LinearOperator`,
            or a callable ``v -> A v``.
        b: right-hand side, a float tensor (shapes above).
        solver: a :class:`LinearSolver`; default :class:`GMRES`, or :class:`CG` when ``A`` is
            tagged symmetric positive definite. Choosing CG (or MINRES) declares ``A``
            symmetric: an untagged callable is taken as such (after a cheap probe that warns
            with :class:`~implicit_layers.StructureWarning` when it clearly is not).
        x0: initial guess shaped like ``b``; default zeros.
        batched: for a callable, whether the leading dimension of ``b`` indexes systems
            (default ``None``, read as ``False``); for a matrix or operator it follows from
            ``b``'s shape and may be given to assert it.
        symmetric: structure tag for ``A`` (auto-detected for matrices; untagged, ``None``, by
            default for callables; a TypeError for a :class:`LinearOperator`, which carries
            its own tags).
        positive_definite: structure tag for ``A`` (``None``: unknown; a TypeError for a
            :class:`LinearOperator`).

    Returns:
        ``(x, info)``: ``x`` shaped like ``b``; ``info`` a :class:`~implicit_layers.SolveInfo`
            whose fields have shape ``(B,)`` for batched systems and ``()`` for one system.

    Raises:
        TypeError: if ``A``, ``b``, ``x0``, ``solver`` or ``batched`` has the wrong type
            (``b`` and ``x0`` must be floating-point tensors), or if the call runs under
            ``torch.func.vmap`` (pass the systems as a batch instead).
        ValueError: if the shapes of ``A``, ``b`` and ``x0`` do not fit together (the message
            gives them), a callable ``A`` returns a tensor of another shape, or the solver
            needs a structure ``A`` is tagged as lacking.
        implicit_layers.ConvergenceError: if a system does not converge and the solver has
            ``on_failure="raise"``.
        implicit_layers.NonFiniteError: if the residual becomes NaN or Inf.

    Warns:
        implicit_layers.ConvergenceWarning: if a system does not converge (the default
            ``on_failure="warn"``).
        implicit_layers.StructureWarning: if CG or MINRES is given an untagged operator that
            a probe finds clearly non-symmetric.

    Examples:
        One system with a matrix:

        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, torch.ones(2, dtype=torch.float64), il.linear.CG())
        >>> x, info.converged.shape
        (tensor([0.1818, 0.2727], dtype=torch.float64), torch.Size([]))

        Five systems given by a callable, each solved to its own tolerance:

        >>> d = torch.rand(5, 3, dtype=torch.float64) + 1
        >>> X, info = il.linear.solve(lambda v: d * v, torch.ones(5, 3, dtype=torch.float64),
        ...                           il.linear.CG(), batched=True, symmetric=True)
        >>> torch.allclose(X, 1 / d), info.steps.shape
        (True, torch.Size([5]))
    """
    check_float_tensor(b, "b")
    refuse_vmap(
        "il.linear.solve", (("b", b), ("x0", x0), ("A", getattr(A, "matrix", A))),
        "its solvers stop on data. Pass the systems as one batch instead: b of shape (B, n) with "
        "A (n, n) or (B, n, n), or a callable A with batched=True; each system is solved to its "
        "own tolerance.",
    )
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be True, False or None, got {batched!r}.")
    if isinstance(A, LinearOperator) and (symmetric is not None or positive_definite is not None):
        raise TypeError(
            "symmetric= and positive_definite= describe a matrix or a callable A; a "
            f"LinearOperator carries its own tags (got {type(A).__name__} with symmetric="
            f"{A.symmetric!r}, positive_definite={A.positive_definite!r}). Set them on the "
            "operator instead."
        )
    if callable(A) and not isinstance(A, (Tensor, LinearOperator)):
        op, bb, one = _callable_operator(A, b, bool(batched), symmetric, positive_definite)
    else:
        op, bb, one = _matrix_operator(A, b, batched, symmetric, positive_definite)
    if solver is None:
        from .cg import CG
        from .gmres import GMRES

        solver = CG() if (op.symmetric and op.positive_definite) else GMRES()
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            f"solver must be a LinearSolver such as il.linear.CG(), got {type(solver).__name__}."
        )
    x0f = None
    if x0 is not None:
        check_float_tensor(x0, "x0")
        if x0.shape != b.shape:
            raise ValueError(f"x0 must be shaped like b {tuple(b.shape)}, got {tuple(x0.shape)}.")
        x0f = x0.reshape(bb.shape)
    x, info = solver.solve(op, bb, x0f)
    if one:
        return x.reshape(b.shape), info.squeeze_batch()
    return x.reshape(b.shape), info


def _matrix_operator(
    A: object, b: Tensor, batched: bool | None, symmetric: bool | None,
    positive_definite: bool | None,
) -> tuple[LinearOperator, Tensor, bool]:
    if b.dim() not in (1, 2):
        raise ValueError(
            f"b must have shape (n,) or (B, n) for a matrix or LinearOperator, got shape "
            f"{tuple(b.shape)}. Flatten each right-hand side to a vector first, or pass A as "
            "a callable acting on b's shape."
        )
    one = b.dim() == 1
    if batched is not None and batched == one:
        raise ValueError(
            f"batched={batched} disagrees with b of shape {tuple(b.shape)}: with a matrix or "
            "operator, b is (n,) for one system and (B, n) for a batch."
        )
    bb = b.unsqueeze(0) if one else b
    batch, n = bb.shape
    op: LinearOperator
    if isinstance(A, LinearOperator):
        op = A
    elif isinstance(A, Tensor):
        check_float_tensor(A, "A")
        if A.dim() == 3 and one:
            raise ValueError(
                f"A is a batch of matrices {tuple(A.shape)} but b has shape {tuple(b.shape)}; "
                "give b the shape (B, n)."
            )
        op = MatrixOperator(
            A, batch=batch, symmetric=symmetric, positive_definite=positive_definite
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
    return op, bb, one


def _callable_operator(
    A: Callable[[Tensor], Tensor], b: Tensor, batched: bool, symmetric: bool | None,
    positive_definite: bool | None,
) -> tuple[LinearOperator, Tensor, bool]:
    if batched and b.dim() < 1:
        raise ValueError("batched=True needs b with a leading batch dimension, got a 0-d tensor.")
    shape = b.shape
    bb = b.reshape(shape[0], -1) if batched else b.reshape(1, -1)

    def mv(v: Tensor) -> Tensor:
        out = A(v.reshape(shape))
        if not isinstance(out, Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"A (a callable) must return a tensor shaped like its input {tuple(shape)}, "
                f"got {got}."
            )
        return out.reshape(v.shape)

    op = FunctionOperator(
        mv, bb.shape[0], bb.shape[1], b.dtype, b.device,
        symmetric=symmetric, positive_definite=positive_definite,
    )
    return op, bb, not batched

