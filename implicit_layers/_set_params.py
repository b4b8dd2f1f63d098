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


def require(cond: Tensor | bool, message: str, got: Tensor | None = None) -> None:
    """Raise ``ValueError(message)`` unless ``cond`` holds everywhere (skipped under vmap;
    under ``torch.compile`` a check in the graph that raises a ``RuntimeError``).

    With ``got`` (the parameter checked, broadcastable with ``cond``), the message ends with
    the first value that fails, and says NaN where that is what failed.
    """
    if isinstance(cond, Tensor):
        if cond.device.type == "meta":
            return
        if torch.compiler.is_compiling():
            # Traced: a Python bool of the data would break the graph. The compiled graph
            # checks the condition when it runs, and raises a RuntimeError with the message.
            torch._assert_async(cond.all(), message)
            return
        try:
            holds = bool(cond.all())
        except RuntimeError:
            # Under torch.func.vmap (at any depth of nesting with grad/jacrev) a condition on
            # the data cannot become a Python bool; the same call without vmap raises. Any
            # other failure is not ours to hide.
            if transforms_active():
                return
            raise
        if not holds and got is not None:
            bad = torch.broadcast_to(got.detach(), torch.broadcast_shapes(got.shape, cond.shape))[~cond]
            value = bad.flatten()[0].item() if bad.numel() else None
            if value is not None and value != value:
                message = f"{message} Got NaN."
            elif value is not None:
                message = f"{message} Got {value:g}."
        cond = holds
    if not cond:
        raise ValueError(message)


def _as_tensor(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    try:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a number or a real tensor; got {type(value).__name__}."
        ) from None


def per_vector(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A scalar set parameter as a tensor shaped ``x.shape[:-1] + (1,)`` (broadcastable to ``x``).

    Args:
        value: a number, a 0-d tensor or a tensor shaped like ``x.shape[:-1]`` (or broadcastable
            to it, without adding dimensions to the result).
        x: the points, shape ``(*batch, n)``.
        name: the argument's name, for the error message.
    """
    t = _as_tensor(value, x, name)
    try:
        fits = torch.broadcast_shapes(t.shape, x.shape[:-1]) == x.shape[:-1]
    except RuntimeError:
        fits = False
    if not fits:
        hint = (f"; for one value per vector drop its trailing dimension of size 1 ({name}.squeeze(-1))"
                if t.dim() and t.shape[-1] == 1 else "")
        raise ValueError(
            f"{name} must be a number or a tensor shaped like x.shape[:-1] = {tuple(x.shape[:-1])} "
            f"(one value per vector); got shape {tuple(t.shape)}{hint}."
        )
    return t.unsqueeze(-1)


def as_vector(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A per-coordinate parameter (a bound, a strength) as a tensor broadcastable to ``x``."""
    t = _as_tensor(value, x, name)
    if t.dim() == 0 or t.shape == x.shape:
        return t  # broadcastable as it is (torch.broadcast_shapes costs ~8 us a call)
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
    reaches a gradient at ``x = 0``; a vector holding a NaN has a NaN norm. The squares are
    taken of ``x`` scaled by its largest entry (a constant for the derivatives), so that a
    norm near the ends of the dtype's range neither overflows to ``inf`` (``1e20`` in float32)
    nor underflows to 0.
    """
    # A constant for every kind of derivative (detach, not no_grad: forward mode too).
    magnitude = x.detach().abs()
    scale = magnitude.amax(-1, keepdim=True) if x.shape[-1] else magnitude.new_ones(x.shape[:-1] + (1,))
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    y = x / scale
    sq = (y * y).sum(-1, keepdim=True)
    # Zero where x is 0; a NaN in x stays NaN (the norm of such a vector is undefined).
    zero = sq == 0
    safe = scale * torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return torch.where(zero, torch.zeros_like(safe), safe), safe
