"""The closest feasible problem of an infeasible QP (``InteriorPoint(infeasible="closest")``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._inputs import QPData

__all__ = ["closest_feasible_shift"]


def closest_feasible_shift(data: QPData, solve: Callable[..., Any]) -> tuple[Tensor, Tensor]:
    """The least-squares shifts ``(t_h, t_b)`` that make ``Gz <= h + t_h, Az = b + t_b`` feasible.

    They solve the always-feasible QP ``min ½‖t_h‖² + ½‖t_b‖²  s.t.  Gz - t_h <= h,
    Az - t_b = b`` in ``(z, t_h, t_b)``, whose ``t`` part is unique (strictly convex in ``t``);
    ``solve`` is :func:`~implicit_layers.qp`, so the shifts are differentiable.

    Args:
        data: ``(Q, q, G, h, A, b)`` with a batch dimension ``B``.
        solve: the QP function.

    Returns:
        ``t_h`` of shape ``(B, m)`` and ``t_b`` of shape ``(B, p)``.
    """
    Q, q, G, h, A, b = data
    B, n = q.shape
    m, p = h.shape[-1], b.shape[-1]
    size = n + m + p
    eye = torch.eye(size, dtype=q.dtype, device=q.device)
    # A tiny ridge on z (1e-12, below the tolerance) makes the z part unique too.
    ridge = torch.cat([q.new_full((n,), 1e-12), q.new_ones(m + p)])
    Q1 = (eye * ridge).expand(B, size, size)
    q1 = q.new_zeros(B, size)
    G1 = torch.cat([G, -torch.eye(m, dtype=q.dtype, device=q.device).expand(B, m, m),
                    q.new_zeros(B, m, p)], dim=-1)
    A1 = torch.cat([A, q.new_zeros(B, p, m), -torch.eye(p, dtype=q.dtype, device=q.device).expand(B, p, p)],
                   dim=-1)
    x = solve(Q1, q1, G1, h, A1, b)
    return x[:, n:n + m], x[:, n + m:]
