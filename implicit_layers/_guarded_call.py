"""A function compiled by ``torch.compile(fullgraph=True)``, called without dynamo's frame
machinery once compiled.

A call of a compiled function goes through dynamo's wrapper (contexts, the frame-evaluation
hook, the cache lookup) before the guards and the compiled code run: about 30-40 us on this
project's CPUs, as much as the whole compiled solve of a small least-squares fit. Once a
variant is compiled, :class:`GuardedCall` checks that variant's own guards (dynamo's guard
manager, the same checks the cache lookup makes: settings, tensor shapes, dtypes and strides,
the functions traced, grad mode and the rest of the global state) and runs its transformed
code directly. Where no variant's guards pass, the call goes through ``torch.compile`` as
before (which recompiles or falls back as it would), and the new variant is picked up. A
variant stays in use after ``torch._dynamo.reset()`` as long as its guards pass (its compiled
code is still valid there; only dynamo's cache forgot it).

With ``fullgraph=True`` the transformed code is one call of the compiled graph and the
reconstruction of its outputs: nothing in it is left for dynamo to trace. What it relies on
of dynamo's internals (the cache entries of a code object, their guard managers and code) is
read defensively: where this torch lacks them, every call takes the ordinary route.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["GuardedCall"]


def _cache_entries(code: types.CodeType) -> list[Any] | None:
    """Dynamo's cache entries for ``code`` (newest first), or None where this torch does not
    expose them."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    try:
        return list(_debug_get_cache_entry_list(code))
    except Exception:  # an internal API: any failure means "not available"
        return None


def _runs_compiled_code() -> bool:
    """Whether torch.compile runs compiled code as usual: not while tracing, not with dynamo
    switched off (``torch._dynamo.config.disable``), and in the default stance
    (``torch.compiler.set_stance`` can make it run eagerly, or fail on a recompilation,
    instead). Otherwise every call takes the ordinary route."""
    dynamo = torch._dynamo
    stance = getattr(getattr(dynamo.eval_frame, "_stance", None), "stance", None)
    return stance == "default" and not dynamo.config.disable and not torch.compiler.is_compiling()


class GuardedCall:
    """``compiled(*args)`` for ``compiled = torch.compile(fn, fullgraph=True, ...)``, with the
    compiled variants' guards checked and their code run directly where one passes.

    Args:
        fn: the plain function that ``compiled`` compiles (its code object keys dynamo's cache).
        compiled: ``torch.compile(fn, fullgraph=True, ...)``.

    Only positional arguments are passed; ``fn`` must be a module-level function taking
    exactly those (no ``*args``, no closure), compiled by this one ``torch.compile`` wrapper
    (its cache entries are the variants).
    """

    def __init__(self, fn: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        if not isinstance(fn, types.FunctionType):
            raise TypeError(f"fn must be a Python function, got {type(fn).__name__}.")
        code = fn.__code__
        if code.co_flags & (0x04 | 0x08) or fn.__closure__:  # CO_VARARGS, CO_VARKEYWORDS
            raise TypeError(f"{fn.__name__} must be a module-level function of named positional "
                            "arguments.")
        self._fn = fn
        self._compiled = compiled
        self._names = code.co_varnames[: code.co_argcount]
        # (guard check, transformed code as a function) per compiled variant.
        self._variants: list[tuple[Callable[[dict[str, Any]], bool], Callable[..., Any]]] = []
        self.direct_calls = 0  # how many calls skipped dynamo's frame (for tests)

    def __call__(self, *args: Any) -> Any:
        if self._variants and _runs_compiled_code():
            frame = dict(zip(self._names, args, strict=True))  # the locals dynamo's guards read
            for check, run in self._variants:
                if check(frame):
                    self.direct_calls += 1
                    return run(*args)
        out = self._compiled(*args)
        self._refresh()
        return out

    def _refresh(self) -> None:
        """Pick up the variants compiled so far (after a call that may have compiled one)."""
        entries = _cache_entries(self._fn.__code__)
        variants: list[tuple[Callable[[dict[str, Any]], bool], Callable[..., Any]]] = []
        for entry in entries or ():
            check = getattr(getattr(entry, "guard_manager", None), "check", None)
            code = getattr(entry, "code", None)
            if check is None or not isinstance(code, types.CodeType):
                return  # not the cache this class knows: stay on the ordinary route
            run = types.FunctionType(code, self._fn.__globals__, self._fn.__name__,
                                     self._fn.__defaults__)
            variants.append((check, run))
        self._variants = variants
