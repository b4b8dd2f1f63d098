"""Griffe extension: the signatures of the constructors that end in ``**settings``.

A solver's constructor takes its own parameters and passes ``**settings`` on to its base
class, which validates the keywords every solver shares (``rtol``, ``atol``, ``max_steps``,
...). At run time ``inspect.signature`` lists those keywords in its place; griffe reads the
source and would show ``**settings: Unpack[...]``. This extension gives the documented
constructor the run-time signature, so a page lists every keyword with its default.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _passes_settings_on(init: griffe.Object) -> bool:
    params = list(init.parameters) if init.is_function else []
    return bool(params) and params[-1].kind is griffe.ParameterKind.var_keyword and (
        params[-1].name == "settings"
    )


def _expand(cls: griffe.Class) -> None:
    init = cls.members.get("__init__")
    if init is None or init.is_alias or not _passes_settings_on(init):
        return
    runtime = getattr(importlib.import_module(cls.module.path), cls.name)
    static = {p.name: p for p in init.parameters}
    params = []
    for p in inspect.signature(runtime.__init__).parameters.values():
        if p.name in static:  # as written in the source (annotations stay cross-referenced)
            params.append(static[p.name])
            continue
        params.append(griffe.Parameter(
            p.name, kind=_KINDS[p.kind],
            annotation=p.annotation if isinstance(p.annotation, str) else None,
            default=None if p.default is inspect.Parameter.empty else repr(p.default),
        ))
    init.parameters = griffe.Parameters(*params)


class SettingsSignatures(griffe.Extension):
    """Expand ``**settings`` in the constructor of each class, once its members are loaded."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        _expand(cls)
