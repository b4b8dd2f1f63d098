"""Linear operators acting on batches of flat vectors of shape ``(B, n)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LinearOperator", "MatrixOperator", "FunctionOperator"]


class LinearOperator:
    """A batch of ``B`` linear maps on ``R^n``, applied to tensors of shape ``(B, n)``.

    Subclasses implement :meth:`mv` (every solver needs only ``A v``). Structure tags tell
    solvers what they may assume:

    Attributes:
        batch: number of independent systems ``B``.
        size: dimension ``n`` of each system.
        symmetric: ``True`` if every map equals its transpose, ``False`` if known not to,
            ``None`` if untagged (a solver that needs symmetry, such as CG, then takes its
            choice as the declaration).
        positive_definite: ``True`` if known to be positive definite, ``False`` if known not to
            be, ``None`` if unknown (solvers that need it check curvature at run time).
    """

    batch: int
    size: int
    dtype: torch.dtype
    device: torch.device
    symmetric: bool | None
    positive_definite: bool | None

    def mv(self, v: Tensor) -> Tensor:
        """Return ``A v`` for ``v`` of shape ``(B, n)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """Materialise the batch of matrices, shape ``(B, n, n)``, with ``n`` products."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        cols = [self.mv(eye[i].expand(self.batch, self.size)) for i in range(self.size)]
        return torch.stack(cols, dim=-1)


class MatrixOperator(LinearOperator):
    """A dense matrix ``(n, n)`` shared by the batch, or a batch of matrices ``(B, n, n)``."""

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
            tol = 100 * torch.finfo(matrix.dtype).eps * float(matrix.abs().max().clamp_min(1e-30))
            symmetric = bool(((matrix - matrix.mT).abs() <= tol).all())
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
        mv: callable mapping ``(B, n)`` to ``(B, n)``.
        batch: ``B``.
        size: ``n``.
        dtype: dtype of the vectors.
        device: device of the vectors.
        symmetric: structure tag; default ``None`` (untagged: see :class:`LinearOperator`).
        positive_definite: structure tag; default ``None`` (unknown).
        dense: optional callable returning the ``(B, n, n)`` matrix faster than ``n`` products.
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
    ) -> None:
        self._mv = mv
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
