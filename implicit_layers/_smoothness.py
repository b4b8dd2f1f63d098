"""A cheap test of whether an objective looks non-smooth at a point, for failure messages.

A minimiser that stalls on a kink (an L1 penalty, a max, an absolute value) is the classic case
of a silent wrong answer: the implicit derivative there differentiates a gradient that does not
exist. When a forward solve of an argmin fails, the gradient is compared at two distances along
one direction: for a smooth objective the difference quotients ``‖∇L(z + s v) - ∇L(z)‖ / s``
agree at both scales (both near ``‖H v‖``), while a kink crossed at one scale and not the other
(or at both, with a jump that does not shrink with ``s``) makes them differ by orders of
magnitude. The direction moves every coordinate towards and past zero (``v = -sign(z) u``),
where the kinks of sparsity penalties lie.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["looks_non_smooth"]

#: Quotients further apart than this factor mark a kink (smooth: equal up to O(s) terms).
KINK_RATIO = 30.0


def looks_non_smooth(grad: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Per sample of the ``(B, n)`` point ``z``, whether ``grad`` (``(B, n) -> (B, n)``) jumps.

    Returns:
        bool ``(B,)``.
    """
    z = z.detach()
    B, n = z.shape
    gen = torch.Generator(device=z.device).manual_seed(0)
    u = 0.5 + torch.rand(B, n, dtype=z.dtype, device=z.device, generator=gen)
    sign = torch.where(z > 0, -1.0, 1.0).to(z.dtype)
    v = sign * u
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    eps = torch.finfo(z.dtype).eps
    size = torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1.0)
    small = 10 * eps**0.5 * size
    large = 1e3 * small
    g0 = grad(z)
    tiny = torch.finfo(z.dtype).tiny
    q_small = torch.linalg.vector_norm(grad(z + small * v) - g0, dim=-1) / small.squeeze(-1)
    q_large = torch.linalg.vector_norm(grad(z + large * v) - g0, dim=-1) / large.squeeze(-1)
    # Rounding in the gradient differences at the small scale: a floor below which no kink is read.
    floor = 100 * eps * torch.linalg.vector_norm(g0, dim=-1) / small.squeeze(-1)
    ratio = (q_small + tiny) / (q_large + tiny)
    return ((ratio > KINK_RATIO) & (q_small > floor)) | (ratio < 1 / KINK_RATIO)
