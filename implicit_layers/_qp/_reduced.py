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
A sample with ``λᵢ = sᵢ = 0`` (a weakly active constraint, where ``K`` is singular), or one
the refinement does not solve, is left to the caller's dense path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ReducedKKT"]

_REFINE_STEPS = 8
_F64 = torch.float64


def _mv(M: Tensor, v: Tensor) -> Tensor:
    # A row vector times Mᵀ: faster on the CPU than a batch of matrix-column products.
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


def _mtv(M: Tensor, v: Tensor) -> Tensor:
    return (v.unsqueeze(-2) @ M).squeeze(-2)


class ReducedKKT:
    """The reduced KKT system of a batch of QP solutions, factorised once for every solve.

    Args:
        Q: ``(B, n, n)``; G: ``(B, m, n)``; h: ``(B, m)``; A: ``(B, p, n)``.
        x: ``(B, n + m + p)``, the solution ``(z, λ, ν)`` the KKT matrix is taken at.

    The work is done in float64 whatever the inputs' dtype (the eliminated rows divide by
    multipliers and slacks near zero); :meth:`solve` returns float64.
    """

    def __init__(self, Q: Tensor, G: Tensor, h: Tensor, A: Tensor, x: Tensor) -> None:
        Q, G, h, A, x = (t.detach().to(_F64) for t in (Q, G, h, A, x))
        n, m = Q.shape[-1], G.shape[-2]
        z, lam = x[:, :n], x[:, n:n + m]
        s = h - _mv(G, z)
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

        scale = torch.stack([t.abs().flatten(1).amax(-1) if t.numel() else Q.new_zeros(Q.shape[0])
                             for t in (Q, G, A)], -1).amax(-1).clamp(min=1.0)
        self.delta = 1e-9 * scale[:, None]
        self.rho = 1e-6 * scale[:, None]
        # The preconditioner's weights: 1/(E + ρ) on active rows, λ/s (not below 0) on the others.
        self.d = torch.where(active, 1.0 / (self.e.clamp(min=0.0) + self.rho), 0.0)
        omega = torch.where(active, self.d, self.w.clamp(min=0.0))
        H = torch.baddbmm(Q, G.mT * omega.unsqueeze(-2), G)
        if A.shape[-2]:
            H = H + (A.mT / self.rho[..., None]) @ A
        H.diagonal(dim1=-2, dim2=-1).add_(self.delta)
        L, info = torch.linalg.cholesky_ex(H)
        self.failed = info != 0
        if L.device.type != "cpu" or bool(self.failed.any()):
            # A sample whose factorisation failed is left to the dense path; an identity factor
            # keeps the batched solves finite meanwhile (on the CPU only when one did fail).
            eye = torch.eye(n, dtype=_F64, device=Q.device)
            L = torch.where(self.failed[:, None, None], eye, L)
        self.L = L

    # -- the reduced symmetric system -------------------------------------------------------
    def _regularised(self, a: Tensor, cg: Tensor, cnu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rhs = a + _mtv(self.G, self.d * cg) + _mtv(self.A, cnu / self.rho)
        x = torch.cholesky_solve(rhs.unsqueeze(-1), self.L).squeeze(-1)
        yg = self.d * (self.active * _mv(self.G, x) - cg)
        ynu = (_mv(self.A, x) - cnu) / self.rho
        return x, yg, ynu

    def _exact(self, x: Tensor, yg: Tensor, ynu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        Gx = _mv(self.G, x)
        top = _mv(self.Q, x) + _mtv(self.G, self.w * Gx + self.active * yg) + _mtv(self.A, ynu)
        return top, self.active * Gx - self.e * yg, _mv(self.A, x)

    def _symmetric_solve(self, a: Tensor, cg: Tensor, cnu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, yg, ynu = self._regularised(a, cg, cnu)
        size = torch.cat([a, cg, cnu], -1).norm(dim=-1)
        previous = torch.full_like(size, float("inf"))
        for _ in range(_REFINE_STEPS):
            top, mid, bottom = self._exact(x, yg, ynu)
            ra, rg, rnu = a - top, cg - mid, cnu - bottom
            res = torch.cat([ra, rg, rnu], -1).norm(dim=-1)
            # Refinement gains a few digits a step; it stops at rounding or when it stalls.
            if x.device.type == "cpu" and not bool(((res > 1e-15 * size) & (res < 0.5 * previous)).any()):
                break
            previous = res
            dx, dyg, dynu = self._regularised(ra, rg, rnu)
            x, yg, ynu = x + dx, yg + dyg, ynu + dynu
        return x, yg, ynu

    # -- K and Kᵀ ------------------------------------------------------------------------
    def solve(self, rhs: Tensor, transpose: bool) -> Tensor:
        """Solve ``K u = rhs`` (or ``Kᵀ u = rhs``) for ``rhs`` of shape ``(B, n + m + p)``."""
        rhs = rhs.to(_F64)
        n, m = self.n, self.m
        r1, r2, r3 = rhs[:, :n], rhs[:, n:n + m], rhs[:, n + m:]
        if transpose:
            # Kᵀ: Gᵢ y_z - sᵢ y_λᵢ = r2ᵢ; active rows solve for uᵢ = λᵢ y_λᵢ.
            a = r1 + _mtv(self.G, self.w * r2)
            cg = self.active * r2
        else:
            # K: λᵢ Gᵢ dz - sᵢ dλᵢ = r2ᵢ; active rows are divided by λᵢ.
            a = r1 + _mtv(self.G, self.inv_s * r2)
            cg = r2 * self.inv_lam
        x, yg, ynu = self._symmetric_solve(a, cg, r3)
        Gx = _mv(self.G, x)
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
        Guz = _mv(self.G, uz)
        if transpose:
            top = _mv(self.Q, uz) + _mtv(self.G, self.lam * ul) + _mtv(self.A, un)
            mid = Guz - self.s * ul
            bottom = _mv(self.A, uz)
        else:
            top = _mv(self.Q, uz) + _mtv(self.G, ul) + _mtv(self.A, un)
            mid = self.lam * Guz - self.s * ul
            bottom = _mv(self.A, uz)
        return torch.cat([top, mid, bottom], -1)
