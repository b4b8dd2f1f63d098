"""Find the tensors a user function depends on, and call it with other tensors in their place.

An implicit layer's map closes over tensors (module parameters, hyperparameters) that the user
does not list. Two tools make such closures behave like explicit arguments:

* :func:`capture` runs the function once and returns the tensors from outside it that entered a
  torch operation and carry derivative information (``requires_grad``, a forward-mode tangent, or
  a ``torch.func`` wrapper). They become explicit inputs of the layer's ``autograd.Function``.
* :class:`Substitute` calls the function with each captured tensor replaced by another one (for
  example the unwrapped or batched version a ``torch.func`` transform hands to a custom
  function), so that derivatives flow to the inputs the transform tracks.

Both work on every torch operation through a ``TorchFunctionMode``; Python-level attribute reads
(``x.shape``) see the original tensors, which have the same metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only


def is_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (grad, jvp or vmap level)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def carries_derivatives(t: Tensor) -> bool:
    """Whether a derivative may have to flow to ``t`` (reverse, forward mode or ``torch.func``)."""
    if not t.is_floating_point() and not t.is_complex():
        return False
    if t.requires_grad or is_wrapped(t):
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform is active at this point of the program."""
    return bool(torch._C._functorch.peek_interpreter_stack() is not None)


class _Capture(TorchFunctionMode):
    def __init__(self, exclude: Sequence[Tensor]) -> None:
        super().__init__()
        self.inside: set[int] = {id(t) for t in exclude}
        self.keep: list[Tensor] = []  # keeps produced tensors alive, so their ids stay unique
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, Tensor) and id(t) not in self.inside and id(t) not in self.found:
                if carries_derivatives(t):
                    self.found[id(t)] = t
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.inside.add(id(t))
                self.keep.append(t)
        return out


def capture(fn: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> tuple[Any, list[Tensor]]:
    """Call ``fn()`` and return its output and the outside tensors it used that carry derivatives.

    Args:
        fn: a function of no arguments (the user's map bound to its inputs).
        exclude: tensors not to report (the state the map is evaluated at).

    Returns:
        ``(output, tensors)``, the tensors in order of first use, each once.
    """
    mode = _Capture(exclude)
    with mode:
        out = fn()
    return out, list(mode.found.values())


class Substitute(TorchFunctionMode):
    """Within the mode, every torch operation sees ``replacement[i]`` where it gets ``original[i]``."""

    def __init__(self, original: Sequence[Tensor], replacement: Sequence[Tensor]) -> None:
        super().__init__()
        self.mapping = {id(a): b for a, b in zip(original, replacement) if a is not b}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        mapping = self.mapping
        args, kwargs = tree_map_only(Tensor, lambda t: mapping.get(id(t), t), (args, kwargs))
        return func(*args, **kwargs)


def needs_substitution(original: Sequence[Tensor], replacement: Sequence[Tensor]) -> bool:
    return any(a is not b for a, b in zip(original, replacement))
