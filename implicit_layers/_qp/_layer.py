"""``QPLayer``: an OptNet layer with learnable constraints and quadratic term."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._eager import run_eagerly
from ._functional import qp
from ._settings import InteriorPoint

__all__ = ["QPLayer"]


class QPLayer(nn.Module):
    """``z*(q) = argmin ½ zᵀQz + qᵀz  s.t.  Gz <= h, Az = b``, with ``q`` the layer's input.

    OptNet's parametrisation (Amos and Kolter, 2017): ``Q = L Lᵀ + εI`` from a learnable
    factor ``L``, learnable ``G`` and ``A``, and the right-hand sides ``h = G z₀ + s₀`` and
    ``b = A z₀`` from a learnable point ``z₀`` and slack ``s₀ >= 0`` (kept non-negative by a
    softplus), so the constraints stay feasible (``z₀`` satisfies them) whatever the
    parameters become. The parameters are shared across the batch; their gradients are summed
    over it.

    Args:
        n: number of variables (the input's last dimension).
        n_ineq: number of inequality rows ``m`` (0 for none).
        n_eq: number of equality rows ``p`` (0 for none; keep ``p < n``).
        eps: the ridge ``ε`` added to ``L Lᵀ`` (default ``1e-4``; 0 allows LPs).
        learn_quadratic: learn ``L`` (default ``True``); ``False`` keeps ``Q = (1 + ε) I``.
        solver: forward solver settings (default ``InteriorPoint()``).
        dtype: parameter dtype (default ``torch.get_default_dtype()``).

    Shapes:
        input ``q``: ``(B, n)`` or ``(n,)``; output: the same.

    Examples:
        >>> layer = il.nn.QPLayer(4, n_ineq=6, n_eq=1, dtype=torch.float64)
        >>> z = layer(torch.randn(8, 4, dtype=torch.float64))
        >>> z.shape
        torch.Size([8, 4])
    """

    def __init__(self, n: int, n_ineq: int = 0, n_eq: int = 0, *, eps: float = 1e-4,
                 learn_quadratic: bool = True, solver: InteriorPoint | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for value, name in ((n, "n"), (n_ineq, "n_ineq"), (n_eq, "n_eq")):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n" else 0):
                raise ValueError(f"{name} must be a{' positive' if name == 'n' else ' non-negative'} "
                                 f"int, got {value!r}.")
        if n_eq >= n + 1:
            raise ValueError(f"n_eq must be at most n = {n} for the equalities to leave freedom, "
                             f"got {n_eq}.")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        dt = dtype or torch.get_default_dtype()
        self.n, self.eps, self.solver = n, float(eps), solver
        self.L = nn.Parameter(torch.eye(n, dtype=dt), requires_grad=learn_quadratic)
        self.G = nn.Parameter(torch.randn(n_ineq, n, dtype=dt) / math.sqrt(n))
        self.A = nn.Parameter(torch.randn(n_eq, n, dtype=dt) / math.sqrt(n))
        self.z0 = nn.Parameter(torch.zeros(n, dtype=dt))
        self.s0 = nn.Parameter(torch.ones(n_ineq, dtype=dt))

    def quadratic(self) -> Tensor:
        """``Q = L Lᵀ + εI``, shape ``(n, n)``."""
        return self.L @ self.L.mT + self.eps * torch.eye(self.n, dtype=self.L.dtype, device=self.L.device)

    @run_eagerly  # one graph break under torch.compile: the layer call, not one per frame
    def forward(self, q: Tensor) -> Tensor:
        h = self.G @ self.z0 + nn.functional.softplus(self.s0)
        b = self.A @ self.z0
        ineq = (self.G, h) if self.G.shape[0] else (None, None)
        eq = (self.A, b) if self.A.shape[0] else (None, None)
        return qp(self.quadratic(), q, *ineq, *eq, solver=self.solver)

    def extra_repr(self) -> str:
        return f"n={self.n}, n_ineq={self.G.shape[0]}, n_eq={self.A.shape[0]}, eps={self.eps}"
