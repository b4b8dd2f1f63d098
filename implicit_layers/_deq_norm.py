"""Weight and spectral normalisation of the linear and convolution layers inside a DEQ's map.

Both are ``torch.nn.utils.parametrize`` parametrizations of each layer's ``weight``, so that
``state_dict``, ``.to()`` and optimisers see ordinary parameters. A DEQ evaluates its map tens of
times per solve; :class:`~implicit_layers.nn.DEQ` therefore computes every normalised weight once
per solve (inside :func:`torch.nn.utils.parametrize.cached`, with the graph to the raw weights
recorded) and, in training mode, advances the spectral norm's power iteration once per solve
(:func:`reset_norm`), not once per iteration.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, cast

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

__all__ = ["apply_norm", "reset_norm", "remove_norm", "precompute_norm", "normalisable_layers",
           "SpectralBound"]

NormKind = Literal["weight", "spectral"]


class SpectralBound(torch.nn.Module):
    """Parametrization ``W ↦ W · bound / max(σ(W), bound)``: the spectral norm of the weight
    (viewed as a matrix ``(out, in · kernel)``) is at most ``bound``; weights already inside the
    bound are unchanged.

    ``σ`` is estimated by power iteration with persistent vectors ``u``, ``v`` (buffers), which
    only :meth:`power_iteration` moves; the forward is ``uᵀ W v``, differentiable in ``W``.
    """

    u: Tensor
    v: Tensor

    def __init__(self, weight: Tensor, bound: float, n_power_iterations: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.bound = float(bound)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        matrix = weight.detach().flatten(1)
        gen = torch.Generator(device="cpu").manual_seed(0)
        u = torch.randn(matrix.shape[0], generator=gen).to(matrix)
        v = torch.randn(matrix.shape[1], generator=gen).to(matrix)
        self.register_buffer("u", u / u.norm().clamp_min(eps))
        self.register_buffer("v", v / v.norm().clamp_min(eps))
        # Start from a converged estimate, so that the first solve already sees the bound.
        self.power_iteration(weight, steps=max(15, n_power_iterations))

    @torch.no_grad()
    def power_iteration(self, weight: Tensor, steps: int | None = None) -> None:
        """Advance the estimate of the leading singular vectors of ``weight`` by ``steps``."""
        matrix = weight.detach().flatten(1)
        for _ in range(self.n_power_iterations if steps is None else steps):
            v = matrix.mT @ self.u
            self.v.copy_(v / v.norm().clamp_min(self.eps))
            u = matrix @ self.v
            self.u.copy_(u / u.norm().clamp_min(self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate ``uᵀ W v`` of the largest singular value (differentiable in ``weight``)."""
        # Copies: the graph keeps the vectors of this solve while a later solve moves them.
        # In the weight's own dtype, also under autocast.
        with torch.autocast(weight.device.type, enabled=False):
            return torch.dot(self.u.clone(), weight.flatten(1) @ self.v.clone())

    def forward(self, weight: Tensor) -> Tensor:
        sigma = self.sigma(weight)
        return weight * (self.bound / torch.clamp(sigma, min=self.bound))

    def extra_repr(self) -> str:
        return f"bound={self.bound}, n_power_iterations={self.n_power_iterations}"


def normalisable_layers(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The linear and convolution layers of ``module`` (itself included) with a ``weight``."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, _ConvNd)):
            yield sub


def apply_norm(
    module: torch.nn.Module,
    kind: NormKind = "spectral",
    *,
    bound: float = 1.0,
    n_power_iterations: int = 1,
) -> torch.nn.Module:
    """Normalise the weight of every ``nn.Linear`` and ``nn.Conv*`` layer inside ``module``.

    The counterpart of torchdeq's ``apply_norm``. Inside :class:`~implicit_layers.nn.DEQ` each
    normalised weight is computed once per solve, not once per iteration.

    Args:
        module: the map (or any module containing it); changed in place.
        kind: ``"spectral"``: rescale each weight so that its spectral norm (of the weight
            viewed as a matrix ``(out, in · kernel)``) is at most ``bound`` (a Lipschitz bound
            of the layer; ``bound < 1`` with 1-Lipschitz activations makes ``z ↦ f(z, x)``
            contractive). ``"weight"``: weight normalisation ``w = g · v / ‖v‖`` per output
            unit (:func:`torch.nn.utils.parametrizations.weight_norm`), with the learnable
            magnitude ``g`` initialised to the current norms.
        bound: the spectral bound (only for ``"spectral"``), positive.
        n_power_iterations: power-iteration steps per :func:`reset_norm` (per training solve
            inside a DEQ), for ``"spectral"``.

    Returns:
        ``module``, with a parametrization on each layer's ``weight``.

    Raises:
        ValueError: ``kind`` is not ``"weight"`` or ``"spectral"``, ``bound`` is not positive,
            ``n_power_iterations`` is not a positive int, or ``module`` holds no linear or
            convolution layer.
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> lin = torch.nn.Linear(8, 8)
        >>> _ = il.nn.apply_norm(lin, "spectral", bound=0.9)
        >>> bool(torch.linalg.matrix_norm(lin.weight.detach(), ord=2) <= 0.9 + 1e-4)
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if kind not in ("weight", "spectral"):
        raise ValueError(f"kind must be 'weight' or 'spectral', got {kind!r}.")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"bound must be a positive number (a spectral norm bound), got {bound!r}.")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) \
            or n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}.")
    layers = list(normalisable_layers(module))
    if not layers:
        raise ValueError(
            f"module ({type(module).__name__}) holds no nn.Linear or nn.Conv* layer to normalise; "
            "apply_norm normalises the weights of such layers."
        )
    for layer in layers:
        if parametrize.is_parametrized(layer, "weight"):
            continue  # already normalised (apply_norm called twice): keep the first choice
        if kind == "weight":
            torch.nn.utils.parametrizations.weight_norm(layer, "weight", dim=0)
        else:
            parametrize.register_parametrization(
                layer, "weight", SpectralBound(cast(Tensor, layer.weight), float(bound), n_power_iterations)
            )
    return module


def _spectral_layers(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, SpectralBound]]:
    for layer in normalisable_layers(module):
        if parametrize.is_parametrized(layer, "weight"):
            for p in layer.parametrizations["weight"]:  # type: ignore[index]
                if isinstance(p, SpectralBound):
                    yield layer, p


def reset_norm(module: torch.nn.Module) -> None:
    """Advance the spectral norms' power iterations by one round (``n_power_iterations``).

    The counterpart of torchdeq's ``reset_norm``; :class:`~implicit_layers.nn.DEQ` calls it at
    the start of every forward in training mode, so users of the layer need not. Weight
    normalisation has no state to reset.

    Args:
        module: a module normalised by :func:`apply_norm` (others are left alone).
    """
    for layer, p in _spectral_layers(module):
        p.power_iteration(layer.parametrizations["weight"].original)  # type: ignore[union-attr,index]


def precompute_norm(module: torch.nn.Module) -> None:
    """Compute every normalised weight of ``module`` once, recording its graph.

    Called inside :func:`torch.nn.utils.parametrize.cached`, so that the solve's iterations
    (run without a graph) and the gradient's evaluation reuse these values.
    """
    with torch.enable_grad():
        for layer in normalisable_layers(module):
            if parametrize.is_parametrized(layer, "weight"):
                layer.weight  # noqa: B018 (the read fills the parametrization cache)


def remove_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Remove the normalisation of :func:`apply_norm`, keeping the normalised weights.

    Args:
        module: a module normalised by :func:`apply_norm`.

    Returns:
        ``module``, whose layers hold the normalised weights as plain parameters.
    """
    for layer in normalisable_layers(module):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return module
