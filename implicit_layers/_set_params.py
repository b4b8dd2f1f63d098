"""Checks and broadcasting of the parameters of sets and proximal operators.

The projections and proximal operators act on the last dimension of ``x`` and take scalar
parameters (a radius, a total, a strength) either as numbers or as tensors shaped like
``x.shape[:-1]``. These helpers turn such a parameter into a tensor that broadcasts against
``x`` and check the conditions a set needs, with messages that name the argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._capture import transforms_active

__all__ = ["as_vector", "per_vector", "require", "require_tensor", "safe_norm"]


def require_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` if it is a floating tensor with at least one dimension, else raise."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor; got {type(x).__name__}. Wrap it with torch.as_tensor."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a real floating tensor; got dtype {x.dtype}. Cast it with .double()."
        )
    if x.dim() == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the vector is its last one); got a 0-d tensor. "
            "Use x.reshape(1) for a vector of length one."
        )
    return x


def require(cond: Tensor | bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond`` holds everywhere (skipped under vmap)."""
    if isinstance(cond, Tensor):
        if cond.device.type == "meta":
            return
        try:
            cond = bool(cond.all())
        except RuntimeError:
            # Under torch.func.vmap (at any depth of nesting with grad/jacrev) a condition on
            # the data cannot become a Python bool; the same call without vmap raises. Any
            # other failure is not ours to hide.
            if transforms_active():
                return
            raise
    if not cond:
        raise ValueError(message)


def per_vector(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A scalar set parameter as a tensor shaped ``x.shape[:-1] + (1,)`` (broadcastable to ``x``).

    Args:
        value: a number, a 0-d tensor or a tensor shaped like ``x.shape[:-1]`` (or broadcastable
            to it).
        x: the points, shape ``(*batch, n)``.
        name: the argument's name, for the error message.
    """
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    try:
        torch.broadcast_shapes(t.shape, x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{name} must be a number or a tensor shaped like x.shape[:-1] = {tuple(x.shape[:-1])} "
            f"(one value per vector); got shape {tuple(t.shape)}."
        ) from None
    return t.unsqueeze(-1)


def as_vector(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A per-coordinate parameter (a bound, a strength) as a tensor broadcastable to ``x``."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} must be a number or a tensor broadcastable to x's shape {tuple(x.shape)}; "
            f"got shape {tuple(t.shape)}."
        ) from None
    return t


def safe_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """The Euclidean norm of the last dimension (kept) and a copy that is 1 where it is 0.

    Dividing by the safe copy keeps the unused branch of a ``torch.where`` finite, so no NaN
    reaches a gradient at ``x = 0``.
    """
    sq = (x * x).sum(-1, keepdim=True)
    positive = sq > 0
    safe = torch.sqrt(torch.where(positive, sq, torch.ones_like(sq)))
    return torch.where(positive, safe, torch.zeros_like(safe)), safe
