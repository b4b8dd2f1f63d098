"""Anderson acceleration (type II) with per-sample mixing weights."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_positive_int, check_tolerance
from .._info import OnFailure, SolveInfo
from .._problem import Problem
from ._base import ForwardSolver, Monitor

__all__ = ["Anderson"]


def _extreme(norms: Tensor, safe: tuple[float, float]) -> bool:
    """Whether some norm lies outside ``safe`` (or is NaN); one synchronisation."""
    bounds = torch.aminmax(norms)
    low, high = float(bounds.min), float(bounds.max)
    return not (safe[0] <= low and high <= safe[1])


class Anderson(ForwardSolver):
    """Anderson acceleration of the map ``G(z) = z - F(z)`` (``= f(z)`` for fixed points).

    Each step mixes the last ``memory`` map values with weights that minimise the norm of the
    mixed residual, solved per batch element (every sample gets its own weights), then takes
    ``z ← β Σ α_i G(z_i) + (1 - β) Σ α_i z_i``. One evaluation of ``f`` per step, plus a tiny
    ``(memory × memory)`` solve per sample.

    Used as ``solver=`` of :func:`~implicit_layers.fixed_point`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        memory: number of past iterates mixed (``m``; default 5); the one positional argument.
        mixing: ``β`` in ``(0, 1]`` (default 1).
        regularization: Tikhonov term relative to the largest diagonal of the Gram matrix,
            keeping the mixing solve well posed; ``None`` (default) means ``100 · eps`` of the
            dtype.
        rtol: relative tolerance; ``None`` (default) means ``1e-10`` in float64, ``1e-5`` in
            float32, ``1e-3`` in float16 and ``1e-2`` in bfloat16.
        atol: absolute tolerance (default ``0.0``).
        max_steps: iteration limit (default 500).
        check_every: steps between convergence checks (each a device synchronisation); ``None``
            (default) means every step on the CPU, every 8 on accelerators.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what happens when a
            sample does not converge (see :class:`ForwardSolver`).

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``memory`` is
            passed positionally.
        ValueError: if a setting is out of range (``memory < 1``, ``mixing`` outside
            ``(0, 1]``, ``regularization < 0``, ...).

    Examples:
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        >>> z, info = il.fixed_point(lambda z, x: 0.5 * torch.cos(z) + x,
        ...                          torch.zeros(3, dtype=torch.float64), x,
        ...                          solver=il.solvers.Anderson(3), return_info=True)
        >>> torch.allclose(z, 0.5 * torch.cos(z) + x), info.solver
        (True, 'Anderson')
    """

    name = "Anderson"
    kinds = ("fixed_point", "root")

    def __init__(
        self,
        memory: int = 5,
        *,
        mixing: float = 1.0,
        regularization: float | None = None,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every,
            on_failure=on_failure,
        )
        self.memory = check_positive_int(memory, "memory")
        self.mixing = check_tolerance(mixing, "mixing", allow_none=False)
        if not 0 < self.mixing <= 1:
            raise ValueError(f"mixing must lie in (0, 1], got {mixing}.")
        self.regularization = check_tolerance(regularization, "regularization")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        reg = self.regularization
        if reg is None:
            reg = 100 * torch.finfo(z0.dtype).eps
        beta = self.mixing
        finfo = torch.finfo(z0.dtype)
        # Residual norms in this range have Gram entries far from under- and overflow.
        safe = (finfo.tiny**0.25, finfo.max**0.25)
        z = z0
        r = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, r)
        # Without autograd the history lives in two preallocated ring buffers (iterates and
        # residuals), written in place: no re-stacking of the whole history every step. The
        # differentiable (unrolled) path keeps lists, as in-place writes would break autograd.
        ring = not differentiable
        if ring:
            X_buf = z.new_empty(z.shape[0], self.memory, z.shape[1])
            R_buf = torch.empty_like(X_buf)
        xs: list[Tensor] = []
        rs: list[Tensor] = []
        count = 0
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            if ring:
                slot = count % self.memory
                X_buf[:, slot] = z
                R_buf[:, slot] = r
                count += 1
                k = min(count, self.memory)
                X, R = X_buf[:, :k], R_buf[:, :k]
            else:
                xs.append(z)
                rs.append(r)
                if len(xs) > self.memory:
                    xs.pop(0)
                    rs.pop(0)
                k = len(xs)
                if k > 1:
                    X, R = torch.stack(xs, dim=1), torch.stack(rs, dim=1)
            if k == 1:
                z_new = z - beta * r
            else:
                # The map values are G(z_i) = z_i - r_i; the mixing weights minimise
                # ‖Σ α_i r_i‖ subject to Σ α_i = 1 (order of the history is irrelevant).
                # The weights do not depend on the scale of the residuals: dividing them by
                # their largest entry keeps the Gram matrix away from underflow (residuals of
                # 1e-160 have a Gram matrix of 0 in float64) and from overflow. On the CPU one
                # look at the residual norms skips this (B, m, n) pass when it is not needed.
                Rn = R
                if mon.check_every != 1 or _extreme(mon.res, safe):
                    rscale = R.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(z.dtype).tiny)
                    Rn = R / rscale[:, None, None]
                H = torch.bmm(Rn, Rn.mT)
                m = H.shape[-1]
                diag = H.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(z.dtype).tiny)
                eye = torch.eye(m, dtype=z.dtype, device=z.device)
                H = H + (reg * diag)[:, None, None] * eye
                ones = torch.ones(z.shape[0], m, 1, dtype=z.dtype, device=z.device)
                # solve_ex without error checks: no device synchronisation per step; the
                # regularisation keeps H invertible and NaN is caught by the monitor.
                w = torch.linalg.solve_ex(H, ones, check_errors=False)[0].squeeze(-1)
                alpha = w / w.sum(-1, keepdim=True)
                # row-vector batched products: one pass over the history, no (B, m, n) temporary
                a_row = alpha.unsqueeze(1)
                mixed_x = torch.bmm(a_row, X).squeeze(1)
                # β Σ α_i G(z_i) + (1 - β) Σ α_i z_i = Σ α_i z_i - β Σ α_i r_i
                z_new = mixed_x - beta * torch.bmm(a_row, R).squeeze(1)
            z = torch.where(active.unsqueeze(-1), z_new, z)
            r = problem.residual(z, create_graph=differentiable)
            mon.record(z, r, active)
        return mon.finish()
