"""Linear operators acting on batches of flat vectors of shape ``(B, n)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LinearOperator", "MatrixOperator", "FunctionOperator"]


class LinearOperator:
    """A batch of ``B`` linear maps on ``R^n``, applied to tensors of shape ``(B, n)``.

    Subclasses implement :meth:`mv` (every solver needs only ``A v``) and set the attributes
    below. Structure tags tell solvers what they may assume.

    Attributes:
        batch: number of independent systems ``B``.
        size: dimension ``n`` of each system.
        dtype: dtype of the vectors the operator acts on.
        device: device of the vectors the operator acts on.
        symmetric: ``True`` if every map equals its transpose, ``False`` if known not to,
            ``None`` if untagged (a solver that needs symmetry, such as CG, then takes its
            choice as the declaration).
        positive_definite: ``True`` if known to be positive definite, ``False`` if known not to
            be, ``None`` if unknown (solvers that need it check curvature at run time).
        transposed: in the solves of an implicit layer, ``False`` when the operator applies the
            Jacobian ``J`` of the problem's residual (a tangent solve: forward mode, a second
            derivative), ``True`` when it applies ``Jᵀ`` (an adjoint solve: the backward pass);
            ``None`` (the default) when neither is known. A solver that holds ``J`` in closed
            form (the QP layer's KKT solve) reads it to pick the matrix.

    Examples:
        A diagonal operator written as a subclass:

        >>> class Diagonal(il.linear.LinearOperator):
        ...     def __init__(self, d):
        ...         self.d, (self.batch, self.size) = d, d.shape
        ...         self.dtype, self.device = d.dtype, d.device
        ...         self.symmetric, self.positive_definite = True, bool((d > 0).all())
        ...     def mv(self, v):
        ...         return self.d * v
        >>> op = Diagonal(torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64))
        >>> x, info = il.linear.solve(op, torch.ones(2, 2, dtype=torch.float64), il.linear.CG())
        >>> x
        tensor([[1.0000, 0.5000],
                [0.2500, 0.1250]], dtype=torch.float64)
    """

    batch: int
    size: int
    dtype: torch.dtype
    device: torch.device
    symmetric: bool | None
    positive_definite: bool | None
    #: Which map of an implicit problem this operator applies: ``False`` for the Jacobian ``J``
    #: of its residual (a tangent solve), ``True`` for ``Jᵀ`` (an adjoint solve), ``None`` when it
    #: is neither or not known. A solver holding ``J`` in closed form reads it instead of probing.
    transposed: bool | None = None
    #: Whether each product replays one graph recorded in advance (an ordinary first-order
    #: backward of an implicit layer): the only products whose timing predicts a later call's,
    #: so the only ones the timed default solvers measure.
    recorded: bool = False

    def mv(self, v: Tensor) -> Tensor:
        """Apply the operator.

        Args:
            v: the vectors, shape ``(B, n)``.

        Returns:
            ``A v``, shape ``(B, n)``: sample ``i`` is the ``i``-th map applied to ``v[i]``.

        Examples:
            >>> A = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 0.0]]])
            >>> il.linear.MatrixOperator(A).mv(torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
            tensor([[2., 3.],
                    [2., 1.]])
        """
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """Materialise the batch of matrices with ``n`` products (``A`` applied to each unit
        vector).

        Returns:
            The matrices, shape ``(B, n, n)``.

        Examples:
            >>> d = torch.tensor([[1.0, 2.0]])
            >>> op = il.linear.FunctionOperator(lambda v: d * v, 1, 2, torch.float32, "cpu")
            >>> op.to_dense()
            tensor([[[1., 0.],
                     [0., 2.]]])
        """
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        cols = [self.mv(eye[i].expand(self.batch, self.size)) for i in range(self.size)]
        return torch.stack(cols, dim=-1)


class MatrixOperator(LinearOperator):
    """A dense matrix ``(n, n)`` shared by the batch, or a batch of matrices ``(B, n, n)``.

    Args:
        matrix: float tensor of shape ``(n, n)`` (one map applied to every sample) or
            ``(B, n, n)`` (one map per sample).
        batch: the batch size ``B`` for a shared ``(n, n)`` matrix (default 1); ignored for a
            batch of matrices, whose ``B`` is ``matrix.shape[0]``.
        symmetric: structure tag. ``None`` (default) tests the matrix: it is tagged symmetric
            when ``|A - Aᵀ|`` is within ``100 eps · max|A|`` entrywise, else ``False``.
        positive_definite: structure tag; default ``None`` (unknown, checked by CG as it
            iterates).

    Raises:
        TypeError: if ``matrix`` is not a tensor.
        ValueError: if ``matrix`` is not square of shape ``(n, n)`` or ``(B, n, n)``.

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> op = il.linear.MatrixOperator(A, batch=3)
        >>> op.batch, op.size, op.symmetric
        (3, 2, True)
        >>> op.mv(torch.ones(3, 2, dtype=torch.float64))[0]
        tensor([5., 4.], dtype=torch.float64)
    """

    def __init__(
        self,
        matrix: Tensor,
        batch: int | None = None,
        *,
        symmetric: bool | None = None,
        positive_definite: bool | None = None,
    ) -> None:
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}.")
        if matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                "matrix must be square with shape (n, n) or (B, n, n), got shape "
                f"{tuple(matrix.shape)}."
            )
        self.matrix = matrix
        self.size = matrix.shape[-1]
        self.batch = matrix.shape[0] if matrix.dim() == 3 else (batch or 1)
        self.dtype = matrix.dtype
        self.device = matrix.device
        if symmetric is None:
            m = matrix.detach()  # a structure test: nothing to record
            tol = 100 * torch.finfo(m.dtype).eps * float(m.abs().max().clamp_min(1e-30))
            symmetric = bool(((m - m.mT).abs() <= tol).all())
        self.symmetric = symmetric
        self.positive_definite = positive_definite

    def mv(self, v: Tensor) -> Tensor:
        if self.matrix.dim() == 2:
            return v @ self.matrix.mT
        return torch.bmm(self.matrix, v.unsqueeze(-1)).squeeze(-1)

    def to_dense(self) -> Tensor:
        return self.matrix.expand(self.batch, self.size, self.size)


class FunctionOperator(LinearOperator):
    """An operator given by a matrix-vector product callable ``mv(v) -> A v`` on ``(B, n)``.

    Args:
        mv: callable mapping a ``(B, n)`` tensor to a ``(B, n)`` tensor (row ``i`` through the
            ``i``-th map).
        batch: number of systems ``B``.
        size: dimension ``n`` of each system.
        dtype: dtype of the vectors.
        device: device of the vectors (a :class:`torch.device` or a string such as
            ``"cuda"``).
        symmetric: structure tag; default ``None`` (untagged: see :class:`LinearOperator`).
        positive_definite: structure tag; default ``None`` (unknown).
        dense: optional callable returning the ``(B, n, n)`` matrix faster than ``n`` products
            (used by :class:`Dense`); default ``None`` (``n`` products).
        recorded: whether ``mv`` replays a graph recorded in advance (see
            :attr:`LinearOperator.recorded`); default ``False``.
        transposed: which map of an implicit problem ``mv`` applies (see
            :attr:`LinearOperator.transposed`); default ``None`` (not known).

    Examples:
        >>> d = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64)
        >>> op = il.linear.FunctionOperator(lambda v: d * v, 2, 2, torch.float64, "cpu",
        ...                                 symmetric=True, positive_definite=True)
        >>> op.to_dense()[1]
        tensor([[4., 0.],
                [0., 8.]], dtype=torch.float64)
    """

    def __init__(
        self,
        mv: Callable[[Tensor], Tensor],
        batch: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        symmetric: bool | None = None,
        positive_definite: bool | None = None,
        dense: Callable[[], Tensor] | None = None,
        recorded: bool = False,
        transposed: bool | None = None,
    ) -> None:
        self._mv = mv
        self.recorded = recorded
        self.transposed = transposed
        self._dense = dense
        self.batch = batch
        self.size = size
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = symmetric
        self.positive_definite = positive_definite

    def mv(self, v: Tensor) -> Tensor:
        return self._mv(v)

    def to_dense(self) -> Tensor:
        if self._dense is not None:
            return self._dense()
        return super().to_dense()
