"""A function compiled by ``torch.compile(fullgraph=True)``, called without dynamo's frame
machinery once compiled.

A call of a compiled function goes through dynamo's wrapper (contexts, the frame-evaluation
hook, the cache lookup) before the guards and the compiled code run: about 30-40 us on this
project's CPUs, about half the time of the compiled solve of a small least-squares fit. Once a
variant is compiled, :class:`GuardedCall` checks that variant's own guards (dynamo's guard
manager, the same checks the cache lookup makes: settings, tensor shapes, dtypes and strides,
the functions traced, grad mode and the rest of the global state) and runs its transformed
code directly. Where no variant's guards pass, the call goes through ``torch.compile`` as
before (which recompiles or falls back as it would). The variants are dynamo's cache entries
as they stand at each call, so an entry that dynamo invalidated or dropped is never run.

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

from ._compiled_reads import inductor_reporting_reads
from ._guard_filter import loop_options

__all__ = ["GuardedCall", "compile_loop"]


def _entry_lister() -> Callable[[types.CodeType], Any] | None:
    """Dynamo's reader of a code object's cache entries (newest first), or None where this
    torch does not expose it."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    return _debug_get_cache_entry_list


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

    The variants are read from dynamo's cache on every call (1.5 us), not kept: an entry that
    dynamo invalidated (an object its guards match by identity was freed, so that a new object
    may now sit at the same address) or dropped (``torch._dynamo.reset()``) is never run.
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
        self._entries = _entry_lister()
        self._names = code.co_varnames[: code.co_argcount]
        # The transformed code of each entry seen, as a function, by its guard manager's id
        # (the manager is kept with it, so that the id is not reused while the entry is cached).
        self._runs: dict[int, tuple[Any, Callable[..., Any]]] = {}
        self.direct_calls = 0  # how many calls skipped dynamo's frame (for tests)

    def __call__(self, *args: Any) -> Any:
        if self._entries is not None and _runs_compiled_code():
            try:
                entries = self._entries(self._fn.__code__)
            except Exception:  # an internal API: any failure means "not available"
                entries = None
            if entries:
                frame = dict(zip(self._names, args, strict=True))  # the locals dynamo's guards read
                for entry in entries:
                    run = self._run_of(entry)
                    if run is not None and run[0].check(frame):
                        self.direct_calls += 1
                        return run[1](*args)
        return self._compiled(*args)

    def _run_of(self, entry: Any) -> tuple[Any, Callable[..., Any]] | None:
        """The guard manager of a cache entry and its transformed code as a function, or None
        for an entry without code (invalidated) or of a form this class does not know."""
        manager = getattr(entry, "guard_manager", None)
        known = self._runs.get(id(manager))
        if known is not None and known[0] is manager:
            return known
        code = getattr(entry, "code", None)
        if manager is None or not callable(getattr(manager, "check", None)) or not isinstance(
                code, types.CodeType):
            return None
        if len(self._runs) > 64:  # entries dropped by dynamo: forget their code
            self._runs.clear()
        run = (manager, types.FunctionType(code, self._fn.__globals__, self._fn.__name__,
                                           self._fn.__defaults__))
        self._runs[id(manager)] = run
        return run


def compile_loop(
    fn: Callable[..., Any], config_patches: dict[str, Any] | None = None,
    cpu_config_patches: dict[str, Any] | None = None,
) -> GuardedCall:
    """One of the library's compiled loops: ``fn`` (a module-level function of positional
    arguments) compiled with ``fullgraph=True`` and static shapes by inductor with
    ``config_patches`` (and ``cpu_config_patches`` for a graph whose tensors are all on the
    CPU), its graphs noting the tensors carrying derivatives they read
    (:func:`~implicit_layers._compiled_reads.inductor_reporting_reads`), without the guards on
    torch's and this library's own objects (:mod:`~implicit_layers._guard_filter`), and
    called through its guards (:class:`GuardedCall`: dynamo's frame around a compiled variant
    costs about half as much as the loop of a small fit)."""
    backend = inductor_reporting_reads(config_patches or {}, cpu_config_patches)
    return GuardedCall(fn, torch.compile(fn, fullgraph=True, dynamic=False, backend=backend,
                                         options=loop_options()))
