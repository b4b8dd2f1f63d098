"""Hyperparameter transforms and the relaxed (concrete) dropout.

Hyperparameters are optimised in an unconstrained space ``u ∈ ℝ`` and mapped to their
constrained value by a transform: ``Log`` for positive quantities (``value = exp(u)``, e.g. a
weight decay), ``Logit`` for an interval (``value = low + (high - low) σ(u)``, e.g. a dropout
rate), ``Identity`` for unconstrained ones. The STN perturbation ``ε`` is added in the
unconstrained space, so every perturbed value ``T(u + ε)`` satisfies the constraint by
construction — no clipping or projection is needed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Transform", "Identity", "Log", "Logit", "concrete_dropout"]


def _as_tensor(value: float | Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a float or a tensor, got {type(value).__name__}.")
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


class Transform:
    """Maps an unconstrained ``u`` to a constrained hyperparameter value (elementwise).

    Subclasses define ``forward(u)`` and its inverse ``inverse(value)`` (which raises
    ``ValueError`` outside the domain); both keep the shape of their argument.

    Examples:
        A transform for hyperparameters above 1:

        >>> class AboveOne(il.hyper.Transform):
        ...     def forward(self, u):
        ...         return 1 + torch.nn.functional.softplus(u)
        ...     def inverse(self, value):
        ...         v = torch.as_tensor(float(value))
        ...         return torch.log(torch.expm1(v - 1))
        >>> hp = il.hyper.Hyperparameters({"momentum_scale": (AboveOne(), 2.0)})
        >>> round(hp.values()["momentum_scale"], 6)
        2.0
    """

    def __call__(self, u: Tensor) -> Tensor:
        return self.forward(u)

    def forward(self, u: Tensor) -> Tensor:
        """Constrained value ``T(u)``, same shape as ``u``."""
        raise NotImplementedError

    def inverse(self, value: float | Tensor) -> Tensor:
        """Unconstrained ``u`` with ``T(u) = value``; ValueError outside the domain."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Identity(Transform):
    """No constraint: ``value = u``.

    Examples:
        >>> float(il.hyper.Identity()(torch.tensor(-3.0)))
        -3.0
    """

    def forward(self, u: Tensor) -> Tensor:
        return u

    def inverse(self, value: float | Tensor) -> Tensor:
        return _as_tensor(value)


class Log(Transform):
    """Positive hyperparameters (weight decay, noise scales): ``value = exp(u)``.

    The constraint ``value > 0`` holds for every finite ``u``; perturbations act
    multiplicatively on the value. ``inverse`` raises ``ValueError`` for a value ``<= 0``.

    Examples:
        >>> t = il.hyper.Log()
        >>> round(float(t(t.inverse(1e-3))), 6)
        0.001
    """

    def forward(self, u: Tensor) -> Tensor:
        return u.exp()

    def inverse(self, value: float | Tensor) -> Tensor:
        v = _as_tensor(value)
        if not bool((v > 0).all()):
            raise ValueError(f"Log transform needs a value > 0, got {value!r}.")
        return v.log()


class Logit(Transform):
    """Interval hyperparameters (dropout rates): ``value = low + (high - low) σ(u)``.

    The value stays strictly inside ``(low, high)`` for every finite ``u``.

    Args:
        low: lower end of the interval (default 0).
        high: upper end (default 1). For a dropout rate an upper end below 1 (e.g. 0.9)
            keeps the ``1 / (1 - p)`` rescaling of dropout bounded.

    Raises:
        TypeError: ``low`` or ``high`` is not a finite float.
        ValueError: ``low >= high``; ``inverse`` of a value outside ``(low, high)``.

    Examples:
        >>> t = il.hyper.Logit(0.0, 0.9)
        >>> round(float(t(t.inverse(0.25))), 6)
        0.25
        >>> float(t(torch.tensor(100.0))) < 0.9
        True
    """

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        for name, val in (("low", low), ("high", high)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise TypeError(f"{name} must be a finite float, got {val!r}.")
        if not low < high:
            raise ValueError(f"Logit needs low < high, got low={low}, high={high}.")
        self.low = float(low)
        self.high = float(high)

    def forward(self, u: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(u)

    def inverse(self, value: float | Tensor) -> Tensor:
        v = _as_tensor(value)
        if not bool(((v > self.low) & (v < self.high)).all()):
            raise ValueError(
                f"Logit transform needs a value strictly inside ({self.low}, {self.high}), "
                f"got {value!r}."
            )
        s = (v - self.low) / (self.high - self.low)
        return torch.log(s) - torch.log1p(-s)


def concrete_dropout(
    x: Tensor,
    rate: float | Tensor,
    *,
    temperature: float = 0.1,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dropout with a relaxed Bernoulli (concrete) mask, differentiable in ``rate``.

    The keep mask is ``z = σ((log(1-p) - log p + log U - log(1-U)) / t)``, ``U ~ Uniform(0,1)``,
    which tends to a Bernoulli(``1 - p``) mask as ``t → 0``; the output is ``x ⊙ z / (1 - p)``
    so that ``E[z] ≈ 1 - p`` keeps activations unbiased. Gradients flow to ``rate`` through the
    mask (reparameterisation), so a loss evaluated with this dropout is differentiable in the
    rate — unlike hard dropout, whose mask is piecewise constant in ``p``.

    Args:
        x: activations ``(B, ...)``.
        rate: drop probability ``p ∈ (0, 1)``: a float, a scalar tensor or one rate per example
            of shape ``(B,)`` (the per-example perturbed rates of an STN).
        temperature: relaxation temperature ``t > 0``.
        training: when False the input is returned unchanged (evaluation mode).
        generator: optional random generator for the uniform noise.

    Returns:
        A tensor shaped like ``x``.

    Raises:
        ValueError: ``temperature <= 0``, or ``rate`` neither a scalar nor of shape ``(B,)``.

    Examples:
        >>> rate = torch.tensor(0.3, requires_grad=True)
        >>> out = il.hyper.concrete_dropout(torch.ones(1000, 8), rate)
        >>> out.shape, abs(out.mean().item() - 1.0) < 0.05     # unbiased on average
        (torch.Size([1000, 8]), True)
        >>> out.square().mean().backward()                     # differentiable in the rate
        >>> rate.grad is not None
        True
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}.")
    if not training:
        return x
    p = rate if isinstance(rate, Tensor) else torch.tensor(float(rate), dtype=x.dtype, device=x.device)
    if p.dim() == 1:
        if p.shape[0] != x.shape[0]:
            raise ValueError(
                f"rate must be a scalar or have one value per example, shape ({x.shape[0]},); got "
                f"{tuple(p.shape)}."
            )
        p = p.reshape((-1,) + (1,) * (x.dim() - 1))
    elif p.dim() != 0:
        raise ValueError(f"rate must be a scalar or of shape (B,), got {tuple(p.shape)}.")
    eps = torch.finfo(x.dtype).eps
    p = p.clamp(eps, 1 - eps)
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator).clamp(eps, 1 - eps)
    logits = (torch.log1p(-p) - torch.log(p) + torch.log(u) - torch.log1p(-u)) / temperature
    keep = torch.sigmoid(logits)
    return x * keep / (1 - p)
