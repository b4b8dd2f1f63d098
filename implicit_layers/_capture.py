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

from collections.abc import Callable, Iterable, Iterator, Sequence
from types import BuiltinFunctionType, CodeType, FunctionType, ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode


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


def current_level() -> int:
    """The level of the innermost active ``torch.func`` transform (0 when none is active)."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return 0 if interpreter is None else int(interpreter.level())


def from_inner_transform(t: Tensor, level: int) -> bool:
    """Whether ``t`` is wrapped by a transform entered inside the function (above ``level``):
    such tensors are the function's own intermediates, never outside dependencies."""
    return is_wrapped(t) and int(torch._C._functorch.maybe_get_level(t)) > level


def outer_tensor(t: Tensor, level: int) -> Tensor:
    """``t`` without the wrappers of transforms entered above ``level``."""
    while from_inner_transform(t, level):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` is active (its batched tensors cannot steer a loop)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def refuse_vmap(entry: str, values: Iterable[tuple[str, object]], instead: str) -> None:
    """Raise a ``TypeError`` naming the first of ``values`` (``(name, value)`` pairs) that is a
    ``torch.func.vmap`` batched tensor: ``entry`` decides per sample when to stop, which vmap's
    rules cannot express; ``instead`` tells how to pass the batch."""
    for name, value in values:
        if isinstance(value, Tensor) and torch._C._functorch.is_batchedtensor(value):
            raise TypeError(
                f"{entry} does not run under torch.func.vmap ({name} is a vmapped tensor): {instead}"
            )


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform is active at this point of the program."""
    return bool(torch._C._functorch.peek_interpreter_stack() is not None)


def modes_active() -> bool:
    """Whether a torch-function or dispatch mode, or forward-mode AD, is active: a compiled
    solve would not see them (``torch.compile(fullgraph=True)`` refuses to compile under a
    dispatch mode, compiles nothing under a torch-function mode, and cannot trace forward-mode
    products inside a dual level), so the eager steps run."""
    return bool(torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
                or forward_ad._current_level >= 0)


#: Values a function may reach by name without reaching a tensor through them (module
#: attributes aside, see :func:`reaches_no_derivatives`).
_INERT = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def reaches_no_derivatives(fn: Any, depth: int = 3) -> bool:
    """Whether ``fn`` is a plain function and every object it names (its closure cells,
    defaults and the globals its code names, through the plain functions it names, up to
    ``depth`` levels) is a tensor that carries no derivatives, a number, a string, a dtype, a
    device, a module, a builtin function, or a small tuple, list, set or dict of those (a
    global ``SIZES = [(1, 40), (40, 1)]``). Anything else (an object, a class, a large
    container, a bound method, an ``nn.Module``) may hold a tensor that carries derivatives,
    and gives ``False``; attributes of modules are not followed. With a plain evaluation whose
    output does not require grad, this shows that the capture would find nothing: no tensor
    that requires grad enters the function's operations, not even one that does not reach its
    output (a comparison, ``.detach()``)."""
    if not isinstance(fn, FunctionType) or depth == 0:
        return False
    try:
        named = [cell.cell_contents for cell in fn.__closure__ or ()]
    except ValueError:  # a cell not yet assigned
        return False
    named += fn.__defaults__ or ()
    named += (fn.__kwdefaults__ or {}).values()
    names = fn.__globals__
    # The global names of the code and of the functions defined inside it (the other names
    # are attribute names).
    named += [names[k] for k in _global_names(fn.__code__) if k in names]
    for obj in named:
        if isinstance(obj, Tensor):
            if carries_derivatives(obj):
                return False
        elif isinstance(obj, FunctionType):
            if obj is not fn and not reaches_no_derivatives(obj, depth - 1):
                return False
        elif not isinstance(obj, (_INERT, ModuleType, BuiltinFunctionType)) and not _inert_container(obj):
            return False
    return True


#: The most items :func:`reaches_no_derivatives` reads through in one named container.
_CONTAINER_ITEMS = 64


def _inert_container(obj: Any, depth: int = 3) -> bool:
    """Whether ``obj`` is a tuple, list, set, frozenset or dict (exactly those types) holding,
    up to ``depth`` levels and :data:`_CONTAINER_ITEMS` items, only tensors that carry no
    derivatives and the inert values above."""
    if type(obj) not in (tuple, list, set, frozenset, dict) or depth == 0:
        return False
    items = [*obj.keys(), *obj.values()] if type(obj) is dict else list(obj)
    if len(items) > _CONTAINER_ITEMS:
        return False
    for item in items:
        if isinstance(item, Tensor):
            if carries_derivatives(item):
                return False
        elif not isinstance(item, _INERT) and not _inert_container(item, depth - 1):
            return False
    return True


def _global_names(code: CodeType) -> Iterator[str]:
    """The names ``code`` and the code objects nested in it look up (globals or attributes)."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _global_names(const)


def _tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors in nested tuples, lists and dicts (a cheaper ``tree_flatten`` for the
    argument lists of torch operations, walked once per operation)."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            if isinstance(item, Tensor):
                yield item
            elif isinstance(item, (tuple, list, dict)):
                yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _map_tensors(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``tree`` with ``fn`` applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(_map_tensors(item, fn) for item in tree)
    if isinstance(tree, list):
        return [_map_tensors(item, fn) for item in tree]
    if isinstance(tree, dict):
        return {key: _map_tensors(item, fn) for key, item in tree.items()}
    return tree


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_level_of = torch._C._functorch.maybe_get_level
_unwrap = torch._C._functorch.get_unwrapped


class _Capture(TorchFunctionMode):
    """Records the outside tensors that carry derivatives as the operations see them.

    It runs on every torch operation of the function, so it does the least it can per
    operation: one set of the ids already settled (``seen``: the excluded state, the tensors
    produced inside, the dependencies found), checked before anything else; a flat loop over
    the positional arguments (nested lists only where an operation takes them, ``torch.cat``);
    and the one output of most operations recorded without walking a tree.
    """

    def __init__(self, exclude: Sequence[Tensor]) -> None:
        super().__init__()
        self.seen: set[int] = {id(t) for t in exclude}
        self.keep: list[Tensor] = []  # keeps produced tensors alive, so their ids stay unique
        self.found: dict[int, Tensor] = {}
        self.level = current_level()

    def _consider(self, t: Tensor) -> None:
        """Record ``t`` (not in ``seen``) if it is an outside tensor that carries derivatives."""
        if _is_wrapped(t):
            # An argument of a transform the function runs itself (torch.func.grad(g)(w,
            # lam)) arrives wrapped; the dependency is the tensor underneath.
            level = self.level
            while _is_wrapped(t) and _level_of(t) > level:
                t = _unwrap(t)
            if id(t) in self.seen:
                return
        if carries_derivatives(t):
            self.found[id(t)] = t
            self.seen.add(id(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        seen = self.seen
        for a in args:
            if isinstance(a, Tensor):
                if id(a) not in seen:
                    self._consider(a)
            elif isinstance(a, (tuple, list)):  # an index (w[:, :1]) or torch.cat's list
                for x in a:
                    if isinstance(x, Tensor):
                        if id(x) not in seen:
                            self._consider(x)
                    elif isinstance(x, (tuple, list, dict)):
                        for t in _tensors(x):
                            if id(t) not in seen:
                                self._consider(t)
            elif isinstance(a, dict):
                for t in _tensors(a):
                    if id(t) not in seen:
                        self._consider(t)
        if kwargs:
            for t in _tensors(kwargs):
                if id(t) not in seen:
                    self._consider(t)
            out = func(*args, **kwargs)
        else:
            out = func(*args)
        if isinstance(out, Tensor):
            seen.add(id(out))
            self.keep.append(out)
        else:
            for t in _tensors(out):
                seen.add(id(t))
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
    """Within the mode, every torch operation sees ``replacement[i]`` where it gets ``original[i]``.

    A function called again later may no longer use the very tensors it used when they were
    captured: ``torch.func.functional_call`` swaps a module's parameters in only for the duration
    of the call, and the implicit backward runs after it returns. An outside tensor that carries
    derivatives and is not among ``original`` therefore takes the place of the first unused
    ``original`` of the same shape and dtype (the function uses its tensors in the same order
    every time); if there is none, a clear error is raised rather than a derivative lost.

    Args:
        original: the tensors captured at the first call, in order of first use.
        replacement: what stands for each of them now.
        exclude: tensors that are not parameters (the state the function is evaluated at).
    """

    def __init__(
        self,
        original: Sequence[Tensor],
        replacement: Sequence[Tensor],
        exclude: Sequence[Tensor] = (),
    ) -> None:
        super().__init__()
        self.original = tuple(original)
        self.replacement = tuple(replacement)
        self.mapping = {id(a): b for a, b in zip(self.original, self.replacement, strict=False)}
        self.used = {id(a): False for a in self.original}
        self.inside: set[int] = {id(t) for t in exclude}
        self.inside.update(id(b) for b in self.replacement)
        self.keep: list[Tensor] = []
        self.level = current_level()

    def _resolve(self, t: Tensor) -> Tensor:
        key = id(t)
        hit = self.mapping.get(key)
        if hit is not None:
            self.used[key] = True
            return hit
        if key in self.inside or not carries_derivatives(t) or from_inner_transform(t, self.level):
            return t
        for a, b in zip(self.original, self.replacement, strict=False):
            if not self.used[id(a)] and a.shape == t.shape and a.dtype == t.dtype:
                self.used[id(a)] = True
                self.mapping[key] = b
                return b
        raise RuntimeError(
            "the function of an implicit layer used a tensor that carries derivatives (shape "
            f"{tuple(t.shape)}, dtype {t.dtype}) that it did not use when the layer was called, "
            "so its derivative cannot be attributed. Keep the tensors the function closes over "
            "unchanged between the forward and the backward pass (e.g. call backward() inside "
            "the torch.func.functional_call that built the layer, or pass the tensors as "
            "explicit arguments)."
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        args = _map_tensors(args, self._resolve)
        kwargs = _map_tensors(kwargs, self._resolve) if kwargs else {}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self.inside.add(id(t))
            self.keep.append(t)
        return out
