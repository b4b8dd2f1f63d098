"""Proximal operators, differentiable in the point and in their strengths.

``prox_{step·g}(x) = argmin_y ½‖y − x‖² + step · g(y)``. Every function acts on the last
dimension of ``x`` (leading dimensions are a batch). Strengths are numbers or tensors that
broadcast against ``x`` — one per coordinate, or shaped ``(*batch, 1)`` for one per sample; the
strength of ``group_lasso`` is one per vector, a number or a tensor shaped ``x.shape[:-1]``.
Tensors receive gradients; derivatives of every order and ``torch.func`` work, since the
operators are plain torch operations.

**Calling convention.** A solver that takes a proximal operator calls it as ``p(w, step)``,
returning ``prox_{step·g}(w)``. :func:`bind` fixes the strengths of one of the functions below
to give that form, and :func:`indicator` turns a projection into it (the prox of the indicator
of a set is the projection, for every step):

    p = il.prox.bind(il.prox.l1, lam)          # p(w, step) == il.prox.l1(w, lam, step)
    c = il.prox.indicator(il.projection.simplex, 2.0)

**Kinks.** Where the operator is not differentiable (``|x_i| == step·strength`` for the l1
family, ``‖x‖ == step·strength`` for the group lasso, ``x_i == 0`` for the nonnegative ones)
the output is the thresholded value ``0`` and the derivative is the one of the zero side: 0 with
respect to ``x`` and to the strength. It is finite, never NaN, also for an infinite strength.
A NaN in ``x`` stays NaN (in its coordinate; in the whole vector for ``group_lasso``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._set_params import as_vector, per_vector, require, require_tensor, safe_norm

__all__ = [
    "l1",
    "nonnegative_l1",
    "elastic_net",
    "group_lasso",
    "ridge",
    "nonnegative_ridge",
    "indicator",
    "bind",
    "Prox",
]

Prox = Callable[..., Tensor]
"""A proximal operator in the solver's form, ``p(w, step) -> prox_{step·g}(w)``."""


def _nonnegative(s: Tensor, name: str) -> Tensor:
    require(s >= 0, f"{name} must be >= 0 (a negative strength makes the problem nonconvex).", s)
    return s


def _positive(h: Tensor) -> Tensor:
    require(h > 0, "step must be > 0.", h)
    return h


def _strength(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    return _nonnegative(as_vector(value, x, name), name)


def _step(step: float | Tensor, x: Tensor) -> Tensor:
    return _positive(as_vector(step, x, "step"))


def _scaled(x: Tensor, strength: float | Tensor, step: float | Tensor) -> Tensor:
    """``step · strength``, both checked and broadcastable to ``x``."""
    return _step(step, x) * _strength(strength, x, "strength")


def _shrink(x: Tensor, threshold: Tensor) -> Tensor:
    # Soft-thresholding. relu puts the kink |x| == threshold on the zero side (its derivative
    # at 0 is 0), and a NaN in x stays NaN.
    return torch.sign(x) * torch.relu(x.abs() - threshold)


def l1(x: Tensor, strength: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """Soft-thresholding, the prox of ``step·strength·‖y‖₁``.

    ``y_i = sign(x_i) · max(|x_i| − step·strength_i, 0)``.

    Args:
        x: points, shape ``(*batch, n)``.
        strength: nonnegative, broadcastable to ``x`` (per coordinate or per sample).
        step: positive, broadcastable to ``x``.

    Returns:
        The prox, shape of ``x`` broadcast with the strengths.

    Example:
        >>> l1(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
        tensor([-1.,  0.,  2.])
    """
    x = require_tensor(x, "x")
    return _shrink(x, _scaled(x, strength, step))


def nonnegative_l1(x: Tensor, strength: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """The prox of ``step·strength·‖y‖₁`` plus the indicator of ``y >= 0``: ``max(x − step·strength, 0)``.

    Args:
        x: points, shape ``(*batch, n)``.
        strength: nonnegative, broadcastable to ``x``.
        step: positive, broadcastable to ``x``.

    Returns:
        The prox, shape of ``x`` broadcast with the strengths.
    """
    x = require_tensor(x, "x")
    return torch.relu(x - _scaled(x, strength, step))


def elastic_net(x: Tensor, l1: float | Tensor, l2: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """The prox of ``step·(l1·‖y‖₁ + ½·l2·‖y‖²)``: ``soft(x, step·l1) / (1 + step·l2)``.

    Args:
        x: points, shape ``(*batch, n)``.
        l1: nonnegative l1 strength, broadcastable to ``x``.
        l2: nonnegative l2 strength, broadcastable to ``x``.
        step: positive, broadcastable to ``x``.

    Returns:
        The prox, shape of ``x`` broadcast with the strengths.
    """
    x = require_tensor(x, "x")
    h = _step(step, x)
    return _shrink(x, h * _strength(l1, x, "l1")) / (1 + h * _strength(l2, x, "l2"))


def group_lasso(x: Tensor, strength: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """Block soft-thresholding, the prox of ``step·strength·‖y‖₂`` (norm of the last dimension).

    ``y = max(1 − step·strength / ‖x‖, 0) · x``.

    Args:
        x: points, shape ``(*batch, n)``; each vector is one group.
        strength: nonnegative, one per vector: a number or a tensor shaped ``x.shape[:-1]``.
        step: positive, likewise.

    Returns:
        The prox, shape of ``x``.
    """
    x = require_tensor(x, "x")
    threshold = _positive(per_vector(step, x, "step")) * _nonnegative(
        per_vector(strength, x, "strength"), "strength"
    )
    norm, safe = safe_norm(x)
    # The threshold enters the product only where it is used, so that an infinite one (never
    # used) keeps the gradient finite; a vector holding a NaN stays NaN.
    kept = (norm > threshold) | torch.isnan(norm)
    used = torch.where(kept, threshold, torch.zeros_like(threshold))
    return torch.where(kept, x * (1 - used / safe), torch.zeros_like(x))


def ridge(x: Tensor, strength: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """The prox of ``step·strength·½‖y‖²``: ``x / (1 + step·strength)``.

    Args:
        x: points, shape ``(*batch, n)``.
        strength: nonnegative, broadcastable to ``x``.
        step: positive, broadcastable to ``x``.

    Returns:
        The prox, shape of ``x`` broadcast with the strengths.
    """
    x = require_tensor(x, "x")
    return x / (1 + _scaled(x, strength, step))


def nonnegative_ridge(x: Tensor, strength: float | Tensor, step: float | Tensor = 1.0) -> Tensor:
    """The prox of ``step·strength·½‖y‖²`` plus the indicator of ``y >= 0``.

    ``y = max(x, 0) / (1 + step·strength)``.

    Args:
        x: points, shape ``(*batch, n)``.
        strength: nonnegative, broadcastable to ``x``.
        step: positive, broadcastable to ``x``.

    Returns:
        The prox, shape of ``x`` broadcast with the strengths.
    """
    x = require_tensor(x, "x")
    return torch.relu(x) / (1 + _scaled(x, strength, step))


def indicator(projection: Callable[..., Tensor], *params: Any, **kwargs: Any) -> Prox:
    """The prox of the indicator of a set, in the solver's form ``p(w, step)``.

    The prox of ``step·ι_C`` is the projection onto ``C`` whatever the step, so the returned
    callable ignores ``step``.

    Args:
        projection: a projection ``projection(w, *params, **kwargs)``, e.g. one of
            :mod:`implicit_layers.projection`.
        *params: the set's parameters, passed after ``w`` (tensors among them receive gradients).
        **kwargs: keyword parameters of the set.

    Returns:
        ``p(w, step=1.0) -> projection(w, *params, **kwargs)``.

    Example:
        >>> from implicit_layers import projection
        >>> p = indicator(projection.box, 0.0, 1.0)
        >>> p(torch.tensor([-1.0, 0.5, 2.0]), 0.1)
        tensor([0.0000, 0.5000, 1.0000])
    """
    if not callable(projection):
        raise TypeError(
            f"projection must be callable, like il.projection.simplex; got {type(projection).__name__}."
        )

    def prox(w: Tensor, step: float | Tensor = 1.0) -> Tensor:
        return projection(w, *params, **kwargs)

    return prox


def bind(prox: Callable[..., Tensor], *strengths: float | Tensor) -> Prox:
    """Fix the strengths of a proximal operator, giving the solver's form ``p(w, step)``.

    Args:
        prox: one of this module's operators, called as ``prox(w, *strengths, step=step)``.
        *strengths: its strengths in order (``l1, l2`` for :func:`elastic_net`); tensors among
            them receive gradients.

    Returns:
        ``p(w, step=1.0) -> prox(w, *strengths, step=step)``.

    Example:
        >>> p = bind(l1, 0.5)
        >>> p(torch.tensor([-2.0, 0.2, 3.0]), 2.0)
        tensor([-1.,  0.,  2.])
    """
    if not callable(prox):
        raise TypeError(f"prox must be callable, like il.prox.l1; got {type(prox).__name__}.")
    if not strengths:
        raise TypeError("bind needs the strengths of the operator, e.g. bind(il.prox.l1, 0.1).")

    def bound(w: Tensor, step: float | Tensor = 1.0) -> Tensor:
        return prox(w, *strengths, step=step)

    return bound
