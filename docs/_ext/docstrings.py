"""Griffe extension: two markups of the docstrings that mkdocstrings would render badly.

* Sphinx cross-reference roles (``:class:`~pkg.Name```) would be printed verbatim. Each role
  becomes an optional autorefs link: a link where the target is documented on the site, plain
  code otherwise, so an undocumented target never breaks the strict build.
* A singular ``Example:`` section is a Google-style admonition, whose ``>>>`` lines Markdown
  turns into nested quotes. When it holds doctest lines it is read as ``Examples:``, the
  section that renders them as code.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|obj|data):`(~?)([^`]+)`")
EXAMPLE = re.compile(r"^Example:[ \t]*\n(?=(?:[ \t]*\n)*[ \t]+>>>)", re.MULTILINE)


def _identifier(obj: griffe.Object, target: str) -> str:
    """Full path of ``target`` as seen from ``obj`` (its own name if it cannot be resolved)."""
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            resolved = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            scope = scope.parent
            continue
        return f"{resolved}.{rest}" if rest else resolved
    return target


def _rewrite(obj: griffe.Object) -> None:
    if obj.docstring is None:
        return

    def link(m: re.Match[str]) -> str:
        tilde, target = m.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        ident = html.escape(_identifier(obj, target), quote=True)
        return f'<autoref identifier="{ident}" optional><code>{html.escape(shown)}</code></autoref>'

    obj.docstring.value = EXAMPLE.sub("Examples:\n", ROLE.sub(link, obj.docstring.value))


class DocstringMarkup(griffe.Extension):
    """Rewrite the markup above in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        stack: list[griffe.Object] = [pkg]
        seen: set[int] = set()
        while stack:
            obj = stack.pop()
            if id(obj) in seen or obj.is_alias:
                continue
            seen.add(id(obj))
            _rewrite(obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
