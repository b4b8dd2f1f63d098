"""The guards that the library's own compiled loops keep.

A compiled loop of this library (the whole solves of ``LevenbergMarquardt`` and
``ProximalGradient``, ``CompiledImplicit``'s CG; see
:func:`~implicit_layers._guarded_call.compile_loop`) is traced through torch's own modules
(``torch.func``, pytree, the ``while_loop`` operator) and through this library's, and dynamo
guards each global object it met there: every module, function, code object, closure and
builtin, and the contents of their dictionaries. On a small
least-squares fit that is about 300 of its 380 guards, checked on every call (about a tenth of
the call). Those objects stay what they are for the life of the process, unless torch or this
library is patched at run time, so the loops leave those guards out
(``torch.compile(options={"guard_filter_fn": ...})``).

Every other guard stays: those on what the caller owns (the user's function, its closure, the
globals of its module, the arguments), on tensors (shape, dtype, strides, ``requires_grad``,
aliasing, wherever the tensor lives), on values (``EQUALS_MATCH``, ``CONSTANT_MATCH``: these
also cover state such as functorch's nesting level and forward-mode AD's level) and on the
global state (grad mode, autocast, the default device, the function-mode stack).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["keep_guard", "loop_options"]

#: The first global a guard's source starts from: ``G['name']`` (a global of the compiled
#: function's module, or a module dynamo imported under a ``__import_...`` name) or
#: ``__import__('module')``.
_ROOT = re.compile(r"G\['([^']*)'\]|__import__\('([^']*)'\)")
#: Modules whose objects are fixed: torch's and this library's.
_FIXED_MODULE = re.compile(r"(torch|implicit_layers)(\.|_dot_|$)")
#: Kept wherever they are: checks of tensors and of values.
_ALWAYS_KEPT = frozenset({"TENSOR_MATCH", "NO_TENSOR_ALIASING", "EQUALS_MATCH", "CONSTANT_MATCH"})


def keep_guard(name: str, guard_type: str) -> bool:
    """Whether a compiled loop keeps the guard on source ``name`` of type ``guard_type``
    (see the module's docstring)."""
    if guard_type in _ALWAYS_KEPT:
        return True
    root = _ROOT.search(name)
    if root is None:  # a local: the arguments and what they reach
        return True
    global_name, imported = root.groups()
    if imported is not None:
        return not _FIXED_MODULE.match(imported)
    if global_name.startswith("__import_"):  # a module dynamo imported for the traced code
        return not _FIXED_MODULE.match(global_name[len("__import_"):])
    # Otherwise a global of the compiled loop's own module (this library's), a builtin, or an
    # object dynamo itself placed among those globals (three leading underscores).
    return False


def _filter(entries: Sequence[Any]) -> list[bool]:
    return [keep_guard(entry.name, entry.guard_type) for entry in entries]


def loop_options() -> dict[str, Any]:
    """``options`` of ``torch.compile`` for the library's compiled loops (a new dictionary:
    ``torch.compile`` takes the filter out of the one it is given)."""
    return {"guard_filter_fn": _filter}
