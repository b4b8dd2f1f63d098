"""The DEQ layer's default Lipschitz bound: the spectral norm of every linear or convolution
layer that the state passes through is kept at most ``bound``.

With 1-Lipschitz activations (``tanh``, ``relu``) and ``bound < 1`` this makes ``z ↦ f(z, x)`` a
contraction: the fixed point exists and is unique, and the implicit gradient is that of a
well-posed layer. Layers that only see the input ``x`` are left free, since they do not affect
the contraction (bounding them too, as ``apply_norm`` on the whole map does, trained worse).

The bound does not touch the user's module: the bounded weights are computed once per solve,
with their graph to the raw weights, and substituted for the solve through
:func:`torch.func.functional_call`, so ``state_dict`` keys, the optimiser's parameters and
checkpoints stay those of the module. The power iteration that estimates each spectral norm
keeps its vectors outside the module's state (they are re-estimated after a reload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ._capture import _tensors, is_wrapped
from ._deq_norm import SpectralBound, normalisable_layers

__all__ = ["StateLayerBound", "check_lipschitz"]


def check_lipschitz(lipschitz: object) -> float | None:
    """``lipschitz`` checked: ``None`` or a positive number."""
    if lipschitz is None:
        return None
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)) or not lipschitz > 0:
        raise ValueError(
            "lipschitz must be a positive number (the bound on the spectral norm of each layer the "
            f"state passes through, e.g. 0.9) or None (solve the map as it is), got {lipschitz!r}."
        )
    return float(lipschitz)


class StateLayerBound:
    """Spectral bound on the state layers of one DEQ map.

    Args:
        bound: the largest spectral norm a state layer's weight may have.
    """

    def __init__(self, bound: float) -> None:
        self.bound = bound
        #: qualified names of the state layers, found on the first call
        self.names: list[str] | None = None
        self._estimators: dict[str, SpectralBound] = {}

    def find_state_layers(self, f: torch.nn.Module, z0: Any, x: Tensor, args: Sequence[Any]) -> None:
        """Record the linear and convolution layers of ``f`` whose input depends on the state.

        One evaluation of ``f(z0, x, *args)`` without a graph, following which tensors the
        state flows into (a torch-function mode marks every output of an operation that takes
        a marked tensor). Layers already normalised by ``apply_norm`` keep the user's
        normalisation.
        """
        candidates = set(normalisable_layers(f))
        layers = {name: m for name, m in f.named_modules()
                  if m in candidates and not parametrize.is_parametrized(m, "weight")}
        if not layers:
            self.names = []
            return
        seen: set[str] = set()
        state = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, z0)
        marks = _StateMarks(_tensors(state))

        def hook(name: str) -> Callable[..., None]:
            def record(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
                if any(marks.marked(t) for t in _tensors(inputs)):
                    seen.add(name)
            return record

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
        try:
            with torch.no_grad(), marks:
                f(state, x, *args)
        finally:
            for h in handles:
                h.remove()
        self.names = [name for name in layers if name in seen]

    def reset(self) -> None:
        """Forget the spectral estimates (new weights were loaded)."""
        self._estimators.clear()

    def weights(self, f: torch.nn.Module, advance: bool) -> dict[str, Tensor]:
        """The bounded weight of every state layer whose estimated spectral norm reaches the
        bound, by parameter name, differentiable in the raw weights (layers inside the bound are
        used as they are); ``advance`` moves each power iteration by one step first (once per
        training solve, as ``reset_norm``)."""
        out: dict[str, Tensor] = {}
        for name in self.names or ():
            weight = cast(Tensor, f.get_submodule(name).weight)
            est = self._estimators.get(name)
            # A weight that a torch.func transform wraps (functional_call of the layer inside
            # the transform) cannot seed or move the persistent power-iteration vectors.
            wrapped = is_wrapped(weight)
            if est is None or est.u.device != weight.device or est.u.dtype != weight.dtype:
                if wrapped:
                    raise ValueError(
                        "the DEQ layer's Lipschitz bound estimates each state layer's spectral "
                        "norm on its first call, which got weights wrapped by a torch.func "
                        "transform; call the layer once outside the transform first, or build "
                        "it with lipschitz=None."
                    )
                # The vectors outlive this call: never inference tensors, nor drawn (or
                # batched) inside an active torch.func transform.
                with torch.inference_mode(False), torch._C._DisableFuncTorch():
                    est = self._estimators[name] = SpectralBound(weight, self.bound, 1)
            elif advance and not wrapped:
                with torch.inference_mode(False):
                    est.power_iteration(weight)
            if not wrapped:
                with torch.no_grad():
                    inside = bool(est.sigma(weight) < self.bound)
                if inside:
                    continue  # used as it is (the bound's factor is 1, its derivative 0)
            out[f"{name}.weight" if name else "weight"] = est(weight)
        return out


class _StateMarks(TorchFunctionMode):
    """Marks the outputs of every torch operation that takes a marked tensor."""

    def __init__(self, seeds: Iterable[Tensor]) -> None:
        super().__init__()
        self.keep: list[Tensor] = list(seeds)  # alive, so that their ids stay unique
        self.ids = {id(t) for t in self.keep}

    def marked(self, t: Tensor) -> bool:
        return id(t) in self.ids

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(id(t) in self.ids for t in _tensors((args, kwargs))):
            for t in _tensors(out):
                self.ids.add(id(t))
                self.keep.append(t)
        return out


class BoundedMap:
    """``f`` called with the bounded weights substituted (the map a bounded DEQ solves)."""

    def __init__(self, f: torch.nn.Module, weights: dict[str, Tensor]) -> None:
        self.f = f
        self.weights = weights

    def __call__(self, z: Any, x: Any, *args: Any) -> Any:
        return torch.func.functional_call(self.f, self.weights, (z, x, *args), strict=False)
