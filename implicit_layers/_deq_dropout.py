"""Variational (DEQ) dropout: one mask per solve, shared by every iteration and the backward.

Ordinary dropout draws a new mask at every call, so inside a fixed-point map it would change the
map at every iteration and the solve would have no fixed point. Here the mask is drawn at the
first call after :func:`reset_dropout` and reused until the next reset;
:class:`~implicit_layers.nn.DEQ` resets at the start of every forward in training mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["VariationalDropout", "reset_dropout"]


class VariationalDropout(torch.nn.Module):
    """Dropout whose mask stays fixed between resets (torchdeq's ``VariationalDropout``).

    In training mode each element is zeroed with probability ``p`` and the rest scaled by
    ``1 / (1 - p)``; the mask is drawn at the first call after :func:`reset_dropout` (shaped
    like that call's input, or with size 1 along ``shared_dims``) and reused by every later call
    until the next reset, so every iteration of a DEQ solve and its backward see one map. In
    eval mode, or with ``p = 0``, it is the identity.

    Args:
        p: drop probability in ``[0, 1)``.
        shared_dims: dimensions (of the input, batch dimension 0 excluded) along which the mask
            is shared, e.g. ``(2, 3)`` for one mask per channel of a ``(B, C, H, W)`` map
            (torchdeq's ``VariationalDropout2d``).

    Shapes:
        input ``(B, ...)``; output the same shape.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, ``shared_dims`` holding the batch dimension, or an
            input whose shape differs from the one the current mask was drawn for (reset first).
    """

    mask: Tensor | None

    def __init__(self, p: float = 0.1, *, shared_dims: tuple[int, ...] = ()) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a probability in [0, 1), got {p!r}.")
        if not all(isinstance(d, int) and d >= 1 for d in shared_dims):
            raise ValueError(
                f"shared_dims must hold dimensions >= 1 (the batch dimension 0 always gets its own "
                f"mask), got {shared_dims!r}."
            )
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)
        self.mask = None

    def reset(self) -> None:
        """Forget the current mask; the next call in training mode draws a new one."""
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = [1 if d in self.shared_dims else s for d, s in enumerate(x.shape)]
        if self.mask is None:
            keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
            self.mask = keep / (1 - self.p)
        elif list(self.mask.shape) != shape:
            raise ValueError(
                f"VariationalDropout got an input of shape {tuple(x.shape)} but its mask was drawn "
                f"for shape {tuple(self.mask.shape)}; call il.nn.reset_dropout(module) before "
                "a solve with a new batch (il.nn.DEQ does this at every forward)."
            )
        return x * self.mask.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        extra = f", shared_dims={self.shared_dims}" if self.shared_dims else ""
        return f"p={self.p}{extra}"


def reset_dropout(module: torch.nn.Module) -> None:
    """Forget the masks of every :class:`VariationalDropout` inside ``module``.

    The counterpart of torchdeq's ``reset_dropout``; :class:`~implicit_layers.nn.DEQ` calls it
    at the start of every forward in training mode.

    Args:
        module: any module (those without variational dropout are left alone).
    """
    for sub in module.modules():
        if isinstance(sub, VariationalDropout):
            sub.reset()
