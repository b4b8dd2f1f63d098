"""Batched linear algebra the QP solver's forward and backward share."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bmv", "bmtv", "inf_norm", "largest_abs", "matrix_scale", "weighted_gram",
           "normal_matrix", "cholesky", "cholesky_solve", "cholesky_or_identity"]


def bmv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` per sample for ``M`` ``(B, r, c)`` and ``v`` ``(B, c)``.

    As a row vector times ``Mᵀ``: torch's batched matrix times one column is several times
    slower on the CPU than the same product laid out as one row. ``torch.bmm`` rather than ``@``:
    the same kernel without matmul's reshapes (half the dispatched operations of a product)."""
    if M.dim() != 3 or v.dim() != 2 or M.shape[0] != v.shape[0]:
        return (v.unsqueeze(-2) @ M.mT).squeeze(-2)  # broadcast batch dimensions
    return torch.bmm(v.unsqueeze(1), M.mT).squeeze(1)


def bmtv(M: Tensor, v: Tensor) -> Tensor:
    """``Mᵀ v`` per sample for ``M`` ``(B, r, c)`` and ``v`` ``(B, r)``."""
    if M.dim() != 3 or v.dim() != 2 or M.shape[0] != v.shape[0]:
        return (v.unsqueeze(-2) @ M).squeeze(-2)  # broadcast batch dimensions
    return torch.bmm(v.unsqueeze(1), M).squeeze(1)


def inf_norm(v: Tensor) -> Tensor:
    """The largest absolute entry of ``v`` along its last dimension (zeros for an empty one):
    two ops, for the vectors of the solve's loops."""
    if v.shape[-1] == 0:
        return v.new_zeros(v.shape[:-1])
    return v.abs().amax(dim=-1)


def largest_abs(t: Tensor, dim: int = -1) -> Tensor:
    """The largest absolute entry of ``t`` along ``dim`` (zeros for an empty one), by two
    reductions: no ``|t|`` temporary of ``t``'s size, for matrices."""
    if t.shape[dim] == 0:
        shape = list(t.shape)
        del shape[dim]
        return t.new_zeros(shape)
    return torch.maximum(t.amax(dim), -t.amin(dim))


def matrix_scale(Q: Tensor, G: Tensor, A: Tensor) -> Tensor:
    """The largest absolute entry of ``Q``, ``G`` and ``A`` per sample, at least 1: ``(B,)``."""
    return torch.stack([largest_abs(t.flatten(1)) for t in (Q, G, A)], -1).amax(-1).clamp(min=1.0)


def weighted_gram(Q: Tensor, G: Tensor, w: Tensor) -> Tensor:
    """``Q + Gᵀ diag(w) G`` ``(B, n, n)``, a new matrix (``w`` ``(B, m)``, not negative): one
    batched ``baddbmm`` of ``(diag(√w) G)ᵀ`` with ``diag(√w) G``, the rows of ``G`` scaled
    (``(Gᵀ diag(w)) G`` is markedly slower); the scaled copy is freed when this returns, before
    the caller factorises."""
    Gw = G * w.sqrt().unsqueeze(-1)
    return torch.baddbmm(Q, Gw.mT, Gw)


def normal_matrix(
    Q: Tensor, G: Tensor, g_weight: Tensor, A: Tensor, a_divisor: Tensor, diagonal: Tensor
) -> Tensor:
    """``Q + Gᵀ diag(g_weight) G + AᵀA / a_divisor + diagonal I`` (``(B, n, n)``; ``g_weight``
    ``(B, m)``, not negative, ``a_divisor`` and ``diagonal`` ``(B, 1)``): the regularised Schur
    complement of a KKT system with the rows of ``G`` weighted and those of ``A`` eliminated.

    Formed by :func:`weighted_gram`, and then updated in place: one new ``(n, n)`` matrix per
    call."""
    H = weighted_gram(Q, G, g_weight)
    if A.shape[-2]:
        As = A / a_divisor.sqrt().unsqueeze(-1)
        H.baddbmm_(As.mT, As)
    H.diagonal(dim1=-2, dim2=-1).add_(diagonal)
    return H


def cholesky(H: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex(H)``: the lower factor ``L`` ``(B, n, n)`` and ``info`` ``(B,)``.

    ``H`` is a temporary of the caller's and is overwritten: on the CPU a contiguous ``H`` is
    factorised in place and ``L`` is ``H`` itself (row-major). ``H`` is symmetric, so ``Hᵀ`` is
    the same matrix in torch's column-major layout, and ``cholesky_ex(Hᵀ, upper=True,
    out=Hᵀ)`` writes the upper factor ``U = Lᵀ`` over it: no new ``(B, n, n)`` matrix and no copy
    of ``H`` into one (each call's fresh memory costs page faults). Elsewhere it is computed as
    the upper factor and returned as its transpose (``L`` row-major): torch zeroes the other
    triangle of its factor, and on the CPU that pass is markedly cheaper for the upper factor.
    Solve with :func:`cholesky_solve`."""
    if H.device.type == "cpu" and H.is_contiguous():
        info = torch.empty(H.shape[:-2], dtype=torch.int32, device=H.device)
        try:
            torch.linalg.cholesky_ex(H.mT, upper=True, out=(H.mT, info))
            return H, info
        except RuntimeError:  # a torch that refuses an output aliasing its input: a new factor
            pass
    U, info = torch.linalg.cholesky_ex(H, upper=True)
    return U.mT, info


def cholesky_solve(b: Tensor, L: Tensor) -> Tensor:
    """``torch.cholesky_solve(b, L)`` for a lower factor ``L`` of either memory layout.

    On the CPU as two triangular solves (the same two LAPACK calls, the same result to the bit):
    ``torch.cholesky_solve`` copies its factor on every call, and at B = 128, n = 50 that fresh
    2.5 MB copy costs more than the solve (the backward went from 6.1-7.0 to 5.4-5.7 ms).
    Elsewhere a row-major ``L`` (from :func:`cholesky`) is passed as its column-major transpose."""
    if L.device.type == "cpu":
        y = torch.linalg.solve_triangular(L, b, upper=False)
        return torch.linalg.solve_triangular(L.mT, y, upper=True)
    if L.is_contiguous():
        return torch.cholesky_solve(b, L.mT, upper=True)
    return torch.cholesky_solve(b, L)


def cholesky_or_identity(H: Tensor) -> tuple[Tensor, Tensor]:
    """The Cholesky factor of ``H`` ``(B, n, n)`` and the samples whose factorisation failed
    ``(B,)``; those get the identity as factor, which keeps the batched solves finite until the
    caller sets them aside. On the CPU, where asking costs nothing, the masked replacement is
    skipped when no sample failed. ``H`` is overwritten (see :func:`cholesky`)."""
    L, info = cholesky(H)
    failed = info != 0
    if L.device.type != "cpu" or bool(failed.any()):
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        L = torch.where(failed[:, None, None], eye, L)
    return L, failed
