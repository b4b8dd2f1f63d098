"""User functions on which torch's compiler failed internally, so that their loops run eagerly.

The compiled loops (``CompiledImplicit``'s adjoint CG, ``LevenbergMarquardt(compile=True)``)
trace the user's function inside a ``while_loop``. A function that cannot be traced
(``.item()``, a Python branch on a value) is the user's to change, and stays an error. But
torch's tracer also fails on functions that are fine: in torch 2.13, ``.T`` or ``.mT`` of a
tensor the function closes over, inside a ``while_loop`` body under ``torch.func``, raises an
internal ``AssertionError`` ("Expected FakeTensor"). Such a function's loops then run eagerly
(the same steps), after one warning, and are not compiled again.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from ._info import user_stacklevel

__all__ = ["failed_to_compile", "function_key", "note_compile_failure"]

_FAILED: weakref.WeakSet[Any] = weakref.WeakSet()
_FAILED_IDS: set[int] = set()  # functions that cannot be weakly referenced


def function_key(fn: Any) -> Any:
    """What identifies a user function across calls: a bound method's function (the method
    object is new at every attribute access), else the function itself."""
    return getattr(fn, "__func__", fn)


def failed_to_compile(fn: Any) -> bool:
    """Whether torch's compiler failed internally on a loop through ``fn``."""
    key = function_key(fn)
    try:
        return key in _FAILED
    except TypeError:
        return id(key) in _FAILED_IDS


def note_compile_failure(fn: Any, what: str, fallback: str, error: Exception) -> None:
    """Remember ``fn`` and warn (``RuntimeWarning``) that ``what`` runs ``fallback`` instead."""
    key = function_key(fn)
    try:
        _FAILED.add(key)
    except TypeError:
        _FAILED_IDS.add(id(key))
    first = (str(error).splitlines() or [""])[0]
    warnings.warn(
        f"{what}: torch.compile failed internally ({type(error).__name__}: {first}); "
        f"{fallback} instead (the same steps and results, eager speed). In torch 2.13 `.T` or "
        "`.mT` of a tensor the function closes over triggers this inside a compiled loop; "
        "`.t()` or `.transpose(-1, -2)` compiles.",
        RuntimeWarning, stacklevel=user_stacklevel(),
    )
