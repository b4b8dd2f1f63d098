"""Power iteration: the largest eigenvalue magnitude of a batch of linear maps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["power_iteration", "power_iteration_from", "seeded_start"]


def power_iteration(
    mv: Callable[[Tensor], Tensor], like: Tensor, steps: int, *, seed: int = 0
) -> Tensor:
    """Estimate ``|λ_max|`` of each map of a batch by ``steps`` products.

    The start vector is drawn once from a local generator seeded with ``seed`` and shared by
    every sample: the estimate (and whatever step size is derived from it) neither consumes nor
    depends on the global random state, nor on a sample's position in the batch. The estimate
    is the Rayleigh quotient ``|vᵀ A v|`` of the last normalised iterate, which approaches
    ``|λ_max|`` from below for symmetric maps: callers add a safety margin.

    Args:
        mv: the product ``v -> A v`` on ``(B, n)`` tensors.
        like: a ``(B, n)`` tensor giving the batch size, length, dtype and device.
        steps: number of products.
        seed: seed of the local generator.

    Returns:
        The estimates, shape ``(B,)`` (ones when ``steps`` is 0).

    Examples:
        >>> from implicit_layers.linear.base import power_iteration
        >>> d = torch.tensor([[1.0, 3.0], [2.0, 0.5]], dtype=torch.float64)
        >>> lam = power_iteration(lambda v: d * v, d, steps=50)
        >>> torch.allclose(lam, torch.tensor([3.0, 2.0], dtype=torch.float64))
        True
    """
    return power_iteration_from(mv, seeded_start(like, seed), steps)[0]


def seeded_start(like: Tensor, seed: int = 0) -> Tensor:
    """The start vector of :func:`power_iteration`, shaped like the ``(B, n)`` tensor ``like``:
    one vector drawn from a local generator seeded with ``seed``, shared by every sample."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape[-1], dtype=like.dtype, device=like.device, generator=gen).expand_as(like)


def power_iteration_from(mv: Callable[[Tensor], Tensor], v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """:func:`power_iteration` from the start vectors ``v`` (``(B, n)``): ``(|λ_max|, v)``, the
    estimates ``(B,)`` and the last iterates, from which a later estimate of a nearby map
    (the Hessian at a nearby point) can start and need few products."""
    lam = torch.ones(v.shape[0], dtype=v.dtype, device=v.device)
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(steps):
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)
        Av = mv(v)
        lam = torch.linalg.vecdot(v, Av).abs()
        v = Av
    return lam, v
