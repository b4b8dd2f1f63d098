"""The KKT conditions of a QP as an optimality function, and the linear solver of its adjoint.

With ``x = (z, λ, ν)`` the residual is

    F(x) = [ Qz + q + Gᵀλ + Aᵀν ]      (stationarity)
           [ λ ∘ (Gz - h)        ]      (complementarity)
           [ Az - b              ]      (equality feasibility)

and its Jacobian ``∂F/∂x`` is OptNet's differential matrix

    [ Q          Gᵀ            Aᵀ ]
    [ diag(λ) G  diag(Gz - h)  0  ]
    [ A          0             0  ].

It is invertible under strict complementarity and linearly independent active constraints.
At a degenerate point (a weakly active constraint: ``λᵢ = 0 = (Gz - h)ᵢ``; duplicated
active or equality rows) it is singular; the adjoint then takes the minimum-norm
least-squares solution, so the gradient stays finite (see ``KKTSolve``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._config import default_rtol
from ..linear.base import LinearOperator, LinearSolver, SolveInfo
from ._linalg import bmtv, bmv
from ._reduced import ReducedKKT

__all__ = ["kkt_residual", "kkt_matrix", "KKTSolve"]


def kkt_residual(
    x: Tensor, Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor
) -> Tensor:
    """The residual ``F(x)`` above for ``x`` of shape ``(B, n + m + p)``.

    The problem data broadcast against the batch (``(n, n)`` or ``(B, n, n)``, and so on), so
    the gradient of a parameter shared across the batch is the sum over the batch.
    """
    n, m = q.shape[-1], h.shape[-1]
    z, lam, nu = x[..., :n], x[..., n:n + m], x[..., n + m:]
    stationarity = bmv(Q, z) + q + bmtv(G, lam) + bmtv(A, nu)
    complementarity = lam * (bmv(G, z) - h)
    feasibility = bmv(A, z) - b
    return torch.cat([stationarity, complementarity, feasibility], dim=-1)


def kkt_matrix(
    x: Tensor, Q: Tensor, G: Tensor, h: Tensor, A: Tensor
) -> Tensor:
    """The Jacobian ``∂F/∂x`` above, shape ``(B, N, N)`` with ``N = n + m + p`` (no graph)."""
    B = x.shape[0]
    n, m, p = Q.shape[-1], G.shape[-2], A.shape[-2]
    z, lam = x[:, :n], x[:, n:n + m]
    K = x.new_zeros(B, n + m + p, n + m + p)
    K[:, :n, :n] = Q
    K[:, :n, n:n + m] = G.mT
    K[:, :n, n + m:] = A.mT
    K[:, n:n + m, :n] = lam.unsqueeze(-1) * G
    K[:, n:n + m, n:n + m] = torch.diag_embed(bmv(G, z) - h)
    K[:, n + m:, :n] = A
    return K


class KKTSolve(LinearSolver):
    """Direct solve of the KKT system of a QP at its solution.

    The implicit backward asks for solves with ``(∂F/∂x)ᵀ`` (and, for forward mode or a second
    derivative, with ``∂F/∂x``); the operator says which (``LinearOperator.transposed``). Both
    go through :class:`ReducedKKT`: the inequality rows eliminated exactly, one ``(n, n)``
    Cholesky factorisation built at the first solve and shared by every later one, refined
    against the exact system. Samples it cannot solve (a weakly active constraint, where the
    matrix is singular) and operators it does not hold (inside ``vmap``, or of unknown
    orientation) are materialised and solved by LU; a sample whose LU solve is singular or
    inaccurate (degenerate points) gets the minimum-norm least-squares solution from a
    pseudo-inverse, so the gradient is finite.

    Args:
        point: ``(Q, G, h, A, x)`` batched as ``(B, n, n)``, ``(B, m, n)``, ``(B, m)``,
            ``(B, p, n)`` and ``(B, n + m + p)`` (the solution ``(z, λ, ν)``), or ``None`` to
            always materialise the operator.
        factor: the forward's polish factors (``IPMResult.polish_factor``), taken by
            :class:`ReducedKKT` where they fit, or ``None``.
        scale: ``(P, R)`` ``(B, n + m + p)`` when ``point`` is a scaled problem (float64): the
            KKT matrix of the caller's problem is then ``K = P⁻¹ K' R⁻¹`` with ``K'`` that of
            ``point``, and the solves with ``K`` go through ``K'`` (see ``Scaling.kkt_factors``);
            ``None`` when ``point`` is the caller's problem.
        rtol: relative residual up to which a solve counts as converged (default as
            :class:`~implicit_layers.linear.Dense`).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
    """

    name = "KKTSolve"
    default_max_steps = 1
    uses_initial_guess = False

    def __init__(self, point: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None, *,
                 factor: tuple[Tensor, Tensor, Tensor] | None = None,
                 scale: tuple[Tensor, Tensor] | None = None,
                 rtol: float | None = None, on_failure: str = "warn") -> None:
        self.point = point
        self.factor = factor
        self.scale = scale
        super().__init__(rtol=rtol, on_failure=on_failure)  # type: ignore[arg-type]

    @functools.cached_property
    def _factorised(self) -> ReducedKKT:
        # Built at the first solve (a forward without backward needs none) and kept for the
        # others; a cached property is stored past the frozen settings' __setattr__.
        assert self.point is not None
        return ReducedKKT(*self.point, factor=self.factor)

    def _reduced(self, op: LinearOperator) -> ReducedKKT | None:
        point = self.point
        if point is None or op.transposed is None:
            return None
        x = point[4]
        if (op.batch, op.size) != tuple(x.shape) or op.device != x.device:
            return None
        return self._factorised

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        rtol = default_rtol(b.dtype) if self.rtol is None else self.rtol
        b_norm = torch.linalg.vector_norm(b, dim=-1)
        reduced = self._reduced(op)
        if reduced is None:
            x, residual = _dense_solve(op.to_dense().to(b.dtype), b, rtol)
        else:
            transposed = bool(op.transposed)
            rhs = b
            if self.scale is not None:
                # K⁻¹ r = R K'⁻¹ (P r), K⁻ᵀ r = P K'⁻ᵀ (R r), in float64 (the factors may be far
                # outside float32's range); the residuals below are those of the scaled system.
                rhs = b.to(torch.float64) * self.scale[1 if transposed else 0]
                b_norm = torch.linalg.vector_norm(rhs, dim=-1)
            x64 = reduced.solve(rhs, transposed)
            residual = torch.linalg.vector_norm(reduced.apply(x64, transposed) - rhs.to(x64.dtype), dim=-1)
            x, residual = x64.to(rhs.dtype), residual.to(rhs.dtype)
            bad = (reduced.degenerate | reduced.failed | ~torch.isfinite(x).all(-1)
                   | ~(residual <= 1e3 * rtol * b_norm))
            if bool(bad.any()):
                idx = bad.nonzero().squeeze(1)
                Q, G, h, A, xs = (t[idx] for t in self.point)  # type: ignore[union-attr]
                K = kkt_matrix(xs, Q, G, h, A).to(rhs.dtype)
                x_bad, res_bad = _dense_solve(K.mT if transposed else K, rhs[idx], rtol)
                x = x.index_copy(0, idx, x_bad)
                residual = residual.index_copy(0, idx, res_bad)
            if self.scale is not None:
                x = (x * self.scale[0 if transposed else 1]).to(b.dtype)
        # A consistent singular system is solved exactly; an inconsistent one (a weakly active
        # constraint) has no exact adjoint, and its least-squares solution is reported as such.
        converged = residual <= 1e3 * rtol * b_norm + torch.finfo(b.dtype).tiny
        steps = torch.ones(b.shape[0], dtype=torch.int64, device=b.device)
        return x, SolveInfo(converged=converged, steps=steps, residual=residual.to(b.dtype),
                            solver=self.name, tolerance=(rtol * b_norm).to(b.dtype))


def _dense_solve(matrix: Tensor, b: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """LU solve of ``(B, N, N)`` systems; singular or inaccurate samples get the minimum-norm
    least-squares solution. Returns the solution and the residual norms."""
    LU, pivots, err = torch.linalg.lu_factor_ex(matrix)
    if bool((err != 0).any()):
        # An exactly singular sample (an exact zero row: a weakly active constraint) would
        # stop the batched LU solve; it is factorised as the identity here and solved below.
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        LU, pivots, _ = torch.linalg.lu_factor_ex(torch.where((err != 0)[:, None, None], eye, matrix))
    x = torch.linalg.lu_solve(LU, pivots, b.unsqueeze(-1)).squeeze(-1)
    residual = torch.linalg.vector_norm(bmv(matrix, x) - b, dim=-1)
    b_norm = torch.linalg.vector_norm(b, dim=-1)
    bad = (err != 0) | ~torch.isfinite(x).all(-1) | ~(residual <= 1e3 * rtol * b_norm)
    if bool(bad.any()):
        # Degenerate samples: the minimum-norm least-squares solution.
        x_ls = (torch.linalg.pinv(matrix[bad], hermitian=False) @ b[bad].unsqueeze(-1)).squeeze(-1)
        x = x.clone()
        x[bad] = x_ls
        residual = torch.linalg.vector_norm(bmv(matrix, x) - b, dim=-1)
    return x, residual
