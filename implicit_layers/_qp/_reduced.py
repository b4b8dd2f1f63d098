"""Solves with the KKT matrix of a QP solution, and its transpose, through one ``(n, n)`` factorisation.

At a solution ``(z, λ, ν)`` with slack ``s = h - Gz`` the KKT matrix (see ``_kkt.py``) is

    K = [ Q       Gᵀ      Aᵀ ]
        [ ΛG      -S      0  ]          Λ = diag(λ),  S = diag(s).
        [ A       0       0  ]

Each inequality row is eliminated exactly, dividing by the larger of ``λᵢ`` and ``|sᵢ|``:

* a row with ``|sᵢ| > λᵢ`` (inactive) gives ``dλᵢ`` in closed form and adds ``(λᵢ/sᵢ) GᵢᵀGᵢ``
  to the ``(z, z)`` block (tiny at a solution, where ``λᵢ ≈ 0``);
* a row with ``λᵢ >= |sᵢ|`` (active) is divided by ``λᵢ`` and kept, with ``-sᵢ/λᵢ`` (tiny) on
  its diagonal.

What remains is the symmetric system

    [ H₀   Cᵀ ] [x]   [a]        H₀ = Q + Gᵀ diag(λ/s on inactive rows) G,
    [ C   -E  ] [y] = [c],       C = [G on active rows; A],  E = diag(s/λ on active rows, 0),

the same matrix for ``K`` and for ``Kᵀ`` (only the right-hand side and the recovery of the
eliminated multipliers differ). It is solved through the Cholesky factor of its regularised
Schur complement ``H₀ + δI + Cᵀ (E + ρI)⁻¹ C`` (positive definite for LPs, singular ``Q`` and
duplicated rows alike), refined against the exact system until the residual stops falling.
At a solution the forward's active-set polish ended, that matrix (with ``E ≈ 0`` and ``λ = 0``
on the inactive rows) is the polish's with ``δ = ρ``: the polish's factor is taken instead of a
new one wherever its active set is the one found here, with ``E`` left out of the regularised
solve as the polish leaves it (the refinement takes as many steps).
A sample with ``λᵢ = sᵢ = 0`` (a weakly active constraint, where ``K`` is singular), or one
the refinement does not solve, is left to the caller's dense path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import bmtv, bmv, cholesky_or_identity, cholesky_solve, matrix_scale, normal_matrix

__all__ = ["ReducedKKT"]

_REFINE_STEPS = 8
# The refinement stops at a residual this far below the right-hand side: a float64 solve is not
# more exact than that (its residual is of order eps |K| |x|, a few times 1e-16 |rhs| at best), and a
# step that only measured a residual of 1-3e-15 cost a fifth of the refinement.
_ROUNDING = 1e-14
_F64 = torch.float64


class ReducedKKT:
    """The reduced KKT system of a batch of QP solutions, factorised once for every solve.

    Args:
        Q: ``(B, n, n)``; G: ``(B, m, n)``; h: ``(B, m)``; A: ``(B, p, n)``.
        x: ``(B, n + m + p)``, the solution ``(z, λ, ν)`` the KKT matrix is taken at.
        factor: the forward's polish factors ``(B, n, n)``, their active sets ``(B, m)`` and the
            samples that have one ``(B,)`` (``IPMResult.polish_factor``), or ``None``.

    The work is done in float64 whatever the inputs' dtype (the eliminated rows divide by
    multipliers and slacks near zero); :meth:`solve` returns float64.
    """

    def __init__(self, Q: Tensor, G: Tensor, h: Tensor, A: Tensor, x: Tensor,
                 factor: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        Q, G, h, A, x = (t.detach().to(_F64) for t in (Q, G, h, A, x))
        n, m = Q.shape[-1], G.shape[-2]
        z, lam = x[:, :n], x[:, n:n + m]
        s = h - bmv(G, z)
        active = lam >= s.abs()
        # λᵢ = sᵢ = 0: no row to divide by, K is singular there.
        self.degenerate = (active & (lam <= 0)).any(-1)
        safe_s = torch.where(active, 1.0, s)
        safe_lam = torch.where(active & (lam > 0), lam, 1.0)
        self.Q, self.G, self.A = Q, G, A
        self.n, self.m = n, m
        self.active = active.to(_F64)
        self.inv_s = torch.where(active, 0.0, 1.0 / safe_s)
        self.inv_lam = torch.where(active, 1.0 / safe_lam, 0.0)
        self.w = torch.where(active, 0.0, lam / safe_s)  # λ/s on inactive rows
        self.e = torch.where(active, s / safe_lam, 0.0)  # s/λ on active rows
        self.lam, self.s = lam, s

        scale = matrix_scale(Q, G, A)[:, None]
        self.delta = 1e-9 * scale
        self.rho = 1e-6 * scale
        # The preconditioner's weights: 1/(E + ρ) on active rows, λ/s (not below 0) on the others.
        self.d = torch.where(active, 1.0 / (self.e.clamp(min=0.0) + self.rho), 0.0)
        omega = torch.where(active, self.d, self.w.clamp(min=0.0))
        reuse = None
        if factor is not None:
            reuse = factor[2] & (factor[1] == active).all(-1)
        if reuse is None or not bool(reuse.any()):
            # A sample whose factorisation failed is left to the dense path.
            self.L, self.failed = cholesky_or_identity(normal_matrix(Q, G, omega, A, self.rho, self.delta))
            return
        assert factor is not None
        # The polish's matrix has 1/ρ on its active rows, not 1/(E + ρ) (E is at rounding there):
        # the regularised solve takes the weights of the factor it uses.
        self.d = torch.where(reuse[:, None] & active, 1.0 / self.rho, self.d)
        self.L, self.failed = factor[0].to(_F64), torch.zeros_like(reuse)
        if not bool(reuse.all()):
            idx = (~reuse).nonzero().squeeze(1)
            L, failed = cholesky_or_identity(normal_matrix(
                Q[idx], G[idx], omega[idx], A[idx], self.rho[idx], self.delta[idx]))
            self.L = self.L.index_copy(0, idx, L)
            self.failed = self.failed.index_copy(0, idx, failed)

    # -- the reduced symmetric system -------------------------------------------------------
    def _regularised(self, a: Tensor, cg: Tensor, cnu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The regularised solve ``(x, y_g, y_ν)``, and ``G x``."""
        rhs = a + bmtv(self.G, self.d * cg) + bmtv(self.A, cnu / self.rho)
        x = cholesky_solve(rhs.unsqueeze(-1), self.L).squeeze(-1)
        Gx = bmv(self.G, x)
        yg = self.d * (self.active * Gx - cg)
        ynu = (bmv(self.A, x) - cnu) / self.rho
        return x, yg, ynu, Gx

    def _exact(self, x: Tensor, yg: Tensor, ynu: Tensor, Gx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        top = bmv(self.Q, x) + bmtv(self.G, self.w * Gx + self.active * yg) + bmtv(self.A, ynu)
        return top, self.active * Gx - self.e * yg, bmv(self.A, x)

    def _symmetric_solve(self, a: Tensor, cg: Tensor, cnu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The solution ``(x, y_g, y_ν)`` of the symmetric system, and ``G x``: carried along with
        ``x`` by the products ``G dx`` of the corrections (one product with ``G`` fewer a step)."""
        x, yg, ynu, Gx = self._regularised(a, cg, cnu)
        size = torch.cat([a, cg, cnu], -1).norm(dim=-1)
        previous = torch.full_like(size, float("inf"))
        for _ in range(_REFINE_STEPS):
            top, mid, bottom = self._exact(x, yg, ynu, Gx)
            ra, rg, rnu = a - top, cg - mid, cnu - bottom
            res = torch.cat([ra, rg, rnu], -1).norm(dim=-1)
            # Refinement gains a few digits a step; it stops at rounding or when it stalls.
            going = (res > _ROUNDING * size) & (res < 0.5 * previous)
            if x.device.type == "cpu" and not bool(going.any()):
                break
            # The residual falls by about the same factor at every step (the same factor, the
            # same regularisation): when that factor takes every sample still going to rounding,
            # the correction is made without measuring its residual (one residual fewer).
            last = x.device.type == "cpu" and not bool(
                (going & ~(previous.isfinite() & (res * res <= _ROUNDING * size * previous))).any())
            previous = res
            dx, dyg, dynu, Gdx = self._regularised(ra, rg, rnu)
            x, yg, ynu, Gx = x + dx, yg + dyg, ynu + dynu, Gx + Gdx
            if last:
                break
        return x, yg, ynu, Gx

    # -- K and Kᵀ ------------------------------------------------------------------------
    def solve(self, rhs: Tensor, transpose: bool) -> Tensor:
        """Solve ``K u = rhs`` (or ``Kᵀ u = rhs``) for ``rhs`` of shape ``(B, n + m + p)``."""
        rhs = rhs.to(_F64)
        n, m = self.n, self.m
        r1, r2, r3 = rhs[:, :n], rhs[:, n:n + m], rhs[:, n + m:]
        if transpose:
            # Kᵀ: Gᵢ y_z - sᵢ y_λᵢ = r2ᵢ; active rows solve for uᵢ = λᵢ y_λᵢ.
            a = r1 + bmtv(self.G, self.w * r2)
            cg = self.active * r2
        else:
            # K: λᵢ Gᵢ dz - sᵢ dλᵢ = r2ᵢ; active rows are divided by λᵢ.
            a = r1 + bmtv(self.G, self.inv_s * r2)
            cg = r2 * self.inv_lam
        x, yg, ynu, Gx = self._symmetric_solve(a, cg, r3)
        if transpose:
            lam = torch.where(self.active > 0, yg * self.inv_lam, (Gx - r2) * self.inv_s)
        else:
            lam = torch.where(self.active > 0, yg, self.w * Gx - r2 * self.inv_s)
        return torch.cat([x, lam, ynu], -1)

    def apply(self, u: Tensor, transpose: bool) -> Tensor:
        """``K u`` (or ``Kᵀ u``) in closed form, float64."""
        u = u.to(_F64)
        n, m = self.n, self.m
        uz, ul, un = u[:, :n], u[:, n:n + m], u[:, n + m:]
        Guz = bmv(self.G, uz)
        if transpose:
            top = bmv(self.Q, uz) + bmtv(self.G, self.lam * ul) + bmtv(self.A, un)
            mid = Guz - self.s * ul
            bottom = bmv(self.A, uz)
        else:
            top = bmv(self.Q, uz) + bmtv(self.G, ul) + bmtv(self.A, un)
            mid = self.lam * Guz - self.s * ul
            bottom = bmv(self.A, uz)
        return torch.cat([top, mid, bottom], -1)
