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

import torch
from torch import Tensor

from .._config import default_rtol
from ..linear.base import LinearOperator, LinearSolver, SolveInfo

__all__ = ["kkt_residual", "kkt_matrix", "KKTSolve"]


def _mv(M: Tensor, v: Tensor) -> Tensor:
    # A row vector times Mᵀ: faster on the CPU than a batch of matrix-column products.
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


def _mtv(M: Tensor, v: Tensor) -> Tensor:
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def kkt_residual(
    x: Tensor, Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor
) -> Tensor:
    """The residual ``F(x)`` above for ``x`` of shape ``(B, n + m + p)``.

    The problem data broadcast against the batch (``(n, n)`` or ``(B, n, n)``, and so on), so
    the gradient of a parameter shared across the batch is the sum over the batch.
    """
    n, m = q.shape[-1], h.shape[-1]
    z, lam, nu = x[..., :n], x[..., n:n + m], x[..., n + m:]
    stationarity = _mv(Q, z) + q + _mtv(G, lam) + _mtv(A, nu)
    complementarity = lam * (_mv(G, z) - h)
    feasibility = _mv(A, z) - b
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
    K[:, n:n + m, n:n + m] = torch.diag_embed(_mv(G, z) - h)
    K[:, n + m:, :n] = A
    return K


class KKTSolve(LinearSolver):
    """Direct solve of the KKT system, built in closed form at the solution.

    The implicit backward asks for solves with ``(∂F/∂x)ᵀ`` (and, for forward mode or a second
    derivative, with ``∂F/∂x``). This solver holds the KKT matrix of the solution, checks with
    one operator product which of the two (or neither, e.g. under a transform) it is asked
    for, and otherwise materialises the operator. It solves by LU; samples whose matrix is
    singular or whose solve is inaccurate (degenerate points) get the minimum-norm
    least-squares solution from a pseudo-inverse, so the gradient is finite.

    Args:
        kkt: the ``(B, N, N)`` KKT matrix at the solution, or ``None`` to always materialise.
        rtol: relative residual up to which a solve counts as converged (default as
            :class:`~implicit_layers.linear.Dense`).
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
    """

    name = "KKTSolve"
    default_max_steps = 1

    def __init__(self, kkt: Tensor | None = None, *, rtol: float | None = None,
                 on_failure: str = "warn") -> None:
        self.kkt = kkt
        super().__init__(rtol=rtol, on_failure=on_failure)  # type: ignore[arg-type]

    def _matrix(self, op: LinearOperator) -> Tensor:
        K = self.kkt
        if K is not None and K.shape == (op.batch, op.size, op.size) and K.dtype == op.dtype:
            K = K.to(op.device)
            probe = torch.randn(op.batch, op.size, dtype=op.dtype, device=op.device,
                                generator=torch.Generator(device=op.device).manual_seed(0))
            with torch.no_grad():
                applied = op.mv(probe)
            scale = applied.norm() + 1e-30
            tol = 1e3 * torch.finfo(op.dtype).eps ** 0.5
            for candidate in (K.mT, K):
                if bool(((_mv(candidate, probe) - applied).norm() <= tol * scale).item()):
                    return candidate
        return op.to_dense()

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        matrix = self._matrix(op).to(b.dtype)
        LU, pivots, err = torch.linalg.lu_factor_ex(matrix)
        if bool((err != 0).any()):
            # An exactly singular sample (an exact zero row: a weakly active constraint) would
            # stop the batched LU solve; it is factorised as the identity here and solved below.
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            LU, pivots, _ = torch.linalg.lu_factor_ex(torch.where((err != 0)[:, None, None], eye, matrix))
        x = torch.linalg.lu_solve(LU, pivots, b.unsqueeze(-1)).squeeze(-1)
        residual = torch.linalg.vector_norm(_mv(matrix, x) - b, dim=-1)
        b_norm = torch.linalg.vector_norm(b, dim=-1)
        rtol = default_rtol(b.dtype) if self.rtol is None else self.rtol
        bad = (err != 0) | ~torch.isfinite(x).all(-1) | ~(residual <= 1e3 * rtol * b_norm)
        if bool(bad.any()):
            # Degenerate samples: the minimum-norm least-squares solution.
            x_ls = (torch.linalg.pinv(matrix[bad], hermitian=False) @ b[bad].unsqueeze(-1)).squeeze(-1)
            x = x.clone()
            x[bad] = x_ls
            residual = torch.linalg.vector_norm(_mv(matrix, x) - b, dim=-1)
        # A consistent singular system is solved exactly; an inconsistent one (a weakly active
        # constraint) has no exact adjoint, and its least-squares solution is reported as such.
        converged = residual <= 1e3 * rtol * b_norm + torch.finfo(b.dtype).tiny
        steps = torch.ones(b.shape[0], dtype=torch.int64, device=b.device)
        return x, SolveInfo(converged=converged, steps=steps, residual=residual, solver=self.name,
                            tolerance=rtol * b_norm)
