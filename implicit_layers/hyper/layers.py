"""STN layers: weights modulated by the hyperparameters (a compact best-response hypernetwork).

A Self-Tuning Network (MacKay et al., 2019) approximates the best response ``w*(λ)`` by a
layer whose rows (output units / output channels) are rescaled by a function of ``λ``. Two
modulations are offered:

* ``modulation="linear"`` (the STN / Δ-STN layer): ``W(λ) = W0 + (V u) ⊙_row Wh`` and
  ``b(λ) = b0 + (V u) ⊙ bh``. The weights are affine in ``u``, i.e. ``r_φ(λ) = Φ u + φ0`` with a
  structured, low-rank ``Φ``.
* ``modulation="sigmoid"`` (the lecture's ``Q(λ) = σ(λ v + c) ⊙_row Q0``): ``W(λ) = σ(V u + c)
  ⊙_row W0``, which represents the best response of ridge regression exactly (in the eigenbasis
  of the data each row is damped by ``s_i² / (s_i² + e^λ) = σ(log s_i² - λ)``).

and two parameterisations of the input ``u``:

* ``centered=False`` — the original STN: ``u = λ`` (``r_φ(λ) = Φ λ + φ0``).
* ``centered=True`` — the Δ-STN (Bae and Grosse, 2020): ``u = λ - λ0`` with ``λ0`` the current
  hyperparameter (detached), so ``r_φ(λ) = Φ (λ - λ0) + w0``: the base weights are the
  response at the current hyperparameter, and ``Φ`` is only trained by the perturbations.

``λ`` here is the *unconstrained* hyperparameter vector of :class:`Hyperparameters`; pass a
:class:`HyperSample` (it carries both ``λ + ε`` and the center) or a tensor plus ``center=``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STNLinear", "STNConv2d"]

_MODULATIONS = ("linear", "sigmoid")


class _STNBase(nn.Module):
    """Shared hyperparameter plumbing of the STN layers."""

    out_rows: int
    n_hyper: int
    centered: bool
    modulation: str
    weight: Tensor
    bias: Tensor | None
    hyper_weight: Tensor
    hyper_bias: Tensor | None

    def _init_modulation(self, out_rows: int, n_hyper: int, centered: bool, modulation: str) -> None:
        if isinstance(n_hyper, bool) or not isinstance(n_hyper, int) or n_hyper < 1:
            raise ValueError(f"n_hyper must be an int >= 1, got {n_hyper!r}.")
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be a bool, got {type(centered).__name__}.")
        if modulation not in _MODULATIONS:
            raise ValueError(f"modulation must be one of {_MODULATIONS}, got {modulation!r}.")
        self.out_rows = out_rows
        self.n_hyper = n_hyper
        self.centered = centered
        self.modulation = modulation
        # V starts at zero: the initial response Jacobian is zero (no spurious hypergradient).
        self.hyper_scale = nn.Parameter(torch.zeros(out_rows, n_hyper))
        if modulation == "sigmoid":
            self.hyper_shift = nn.Parameter(torch.zeros(out_rows))

    def _hyper_input(self, hyper: object, center: Tensor | None) -> Tensor:
        """The ``(B, H)`` (or ``(H,)``) input ``u`` of the modulation."""
        raw = getattr(hyper, "raw", None)
        if raw is not None:  # a HyperSample
            center = hyper.center if center is None else center  # type: ignore[attr-defined]
            hyper = raw
        if not isinstance(hyper, Tensor):
            raise TypeError(
                f"hyper must be a HyperSample or a tensor of shape (B, {self.n_hyper}), got "
                f"{type(hyper).__name__}."
            )
        if hyper.shape[-1:] != (self.n_hyper,) or hyper.dim() > 2:
            raise ValueError(
                f"hyper must have shape ({self.n_hyper},) or (B, {self.n_hyper}), got "
                f"{tuple(hyper.shape)}."
            )
        if not self.centered:
            return hyper
        if center is None:
            raise ValueError(
                "center is required for a centered (Δ-STN) layer: pass the current "
                "hyperparameters λ0 (detached), or a HyperSample, or build the layer with "
                "centered=False."
            )
        return hyper - center.detach()

    def modulation_of(self, hyper: object, center: Tensor | None = None) -> Tensor:
        """Per-row modulation, shape ``(B, out)`` or ``(out,)``.

        ``V u`` for ``modulation="linear"``, ``σ(V u + c)`` for ``"sigmoid"``.
        """
        u = self._hyper_input(hyper, center)
        s = u.to(self.hyper_scale.dtype) @ self.hyper_scale.T
        if self.modulation == "sigmoid":
            s = torch.sigmoid(s + self.hyper_shift)
        return s

    def _row_view(self, s: Tensor, ndim: int) -> Tensor:
        """Reshape ``(B, out)``/``(out,)`` modulation to broadcast over an output of ``ndim`` dims."""
        if s.dim() == 1:
            return s.reshape((self.out_rows,) + (1,) * (ndim - 2))
        return s.reshape(s.shape + (1,) * (ndim - 2))

    def effective_weight(self, hyper: object, center: Tensor | None = None) -> Tensor:
        """The modulated weight ``W(λ)``: ``(B, *weight.shape)`` for batched ``hyper``."""
        s = self.modulation_of(hyper, center)
        view = s.reshape(s.shape + (1,) * (self.weight.dim() - 1))
        if self.modulation == "sigmoid":
            return view * self.weight
        return self.weight + view * self.hyper_weight

    def weight_sq_norm(self, hyper: object, center: Tensor | None = None) -> Tensor:
        """``‖W(λ)‖²`` (weights, not biases) per example, shape ``(B,)`` or ``()``.

        Computed from per-row norms without materialising ``W(λ)`` for every example, so a
        per-example weight decay ``Σ_i wd_i ‖W(λ_i)‖²`` is cheap.
        """
        s = self.modulation_of(hyper, center)
        w = self.weight.flatten(1)
        if self.modulation == "sigmoid":
            return (s.square() * w.square().sum(1)).sum(-1)
        wh = self.hyper_weight.flatten(1)
        return (
            w.square().sum()
            + 2 * (s * (w * wh).sum(1)).sum(-1)
            + (s.square() * wh.square().sum(1)).sum(-1)
        )

    def _combine(self, base: Tensor, hyper_out: Tensor | None, s: Tensor, bias: Tensor | None) -> Tensor:
        if s.dim() == 2 and s.shape[0] != base.shape[0]:
            raise ValueError(
                f"hyper has {s.shape[0]} rows but the input has batch size {base.shape[0]}; pass "
                "one hyperparameter row per example or a single (H,) vector."
            )
        sv = self._row_view(s, base.dim())
        if self.modulation == "sigmoid":
            out = sv * base
        else:
            out = base + sv * cast(Tensor, hyper_out)  # linear modulation computes it
        if bias is not None:
            out = out + self._row_view(bias, base.dim())
        return out


class STNLinear(_STNBase):
    """A linear layer whose weight rows are modulated by the hyperparameters.

    Args:
        in_features, out_features: as :class:`torch.nn.Linear`.
        n_hyper: number of hyperparameters ``H`` fed to the modulation.
        centered: ``True`` (default) for the Δ-STN parameterisation ``Φ (λ - λ0) + w0``,
            ``False`` for the original STN ``Φ λ + φ0``.
        modulation: ``"linear"`` (default, ``W0 + (V u) ⊙_row Wh``) or ``"sigmoid"``
            (``σ(V u + c) ⊙_row W0``).
        bias: whether to add a bias.

    Shapes:
        ``x`` is ``(B, in_features)``; ``hyper`` is a :class:`HyperSample` or a tensor of
        shape ``(B, H)`` (one perturbed hyperparameter per example) or ``(H,)``; output
        ``(B, out_features)``. ``forward(x, hyper, center=None)``: ``center`` is the ``λ0`` of
        the centered layer when ``hyper`` is a plain tensor (a sample carries its own).

    Raises:
        ValueError: a size below 1, or an unknown ``modulation``.
        TypeError: ``centered`` is not a bool.

    Examples:
        >>> layer = il.hyper.STNLinear(3, 2, n_hyper=1)
        >>> x, lam = torch.randn(4, 3), torch.randn(4, 1)     # one hyperparameter per example
        >>> layer(x, lam, center=torch.zeros(1)).shape
        torch.Size([4, 2])
        >>> layer.effective_weight(lam, center=torch.zeros(1)).shape   # W(λ_i) per example
        torch.Size([4, 2, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_hyper: int,
        *,
        centered: bool = True,
        modulation: str = "linear",
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}.")
        base = nn.Linear(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone()) if bias else None
        self._init_modulation(out_features, n_hyper, centered, modulation)
        if modulation == "linear":
            bound = 1.0 / math.sqrt(in_features)
            self.hyper_weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
            self.hyper_bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor, hyper: object, center: Tensor | None = None) -> Tensor:
        s = self.modulation_of(hyper, center)
        base = F.linear(x, self.weight)
        hyper_out = None
        if self.modulation == "linear":
            hyper_out = F.linear(x, self.hyper_weight, self.hyper_bias)
        return self._combine(base, hyper_out, s, self.bias)


class STNConv2d(_STNBase):
    """A 2-d convolution whose output channels are modulated by the hyperparameters.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as :class:`torch.nn.Conv2d`.
        n_hyper, centered, modulation, bias: see :class:`STNLinear`.

    Shapes:
        ``x`` is ``(B, C_in, H, W)``; ``hyper`` as for :class:`STNLinear`; output
        ``(B, C_out, H', W')``.

    Raises:
        ValueError: a size below 1, or an unknown ``modulation``.
        TypeError: ``centered`` is not a bool.

    Examples:
        >>> conv = il.hyper.STNConv2d(1, 4, 3, n_hyper=2, padding=1)
        >>> conv(torch.randn(5, 1, 8, 8), torch.randn(5, 2), center=torch.zeros(2)).shape
        torch.Size([5, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        n_hyper: int,
        *,
        stride: int = 1,
        padding: int = 0,
        centered: bool = True,
        modulation: str = "linear",
        bias: bool = True,
    ) -> None:
        super().__init__()
        base = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.stride = base.stride
        self.padding = base.padding
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(cast(Tensor, base.bias).detach().clone()) if bias else None
        self._init_modulation(out_channels, n_hyper, centered, modulation)
        if modulation == "linear":
            hyper_base = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
            self.hyper_weight = nn.Parameter(hyper_base.weight.detach().clone())
            self.hyper_bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor, hyper: object, center: Tensor | None = None) -> Tensor:
        s = self.modulation_of(hyper, center)
        base = F.conv2d(x, self.weight, None, self.stride, self.padding)
        hyper_out = None
        if self.modulation == "linear":
            hyper_out = F.conv2d(x, self.hyper_weight, self.hyper_bias, self.stride, self.padding)
        return self._combine(base, hyper_out, s, self.bias)
