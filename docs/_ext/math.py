"""MkDocs hook: typeset the formulas at build time, so pages need no script and no network.

``pymdownx.arithmatex`` (generic mode) wraps each formula in an element of class ``arithmatex``
holding its escaped TeX between ``\\(`` ``\\)`` (inline) or ``\\[`` ``\\]`` (display). This hook
replaces each such element by the MathML that ``latex2mathml`` writes for it; browsers render
MathML natively. The hook runs on every page, docstrings rendered by mkdocstrings included. A
formula that cannot be converted fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

# Arithmatex's generic output: <span class="arithmatex">\(...\)</span> and
# <div class="arithmatex">\[...\]</div>; the TeX is HTML-escaped and may span lines.
FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\(?P<open>[(\[])(?P<tex>.*?)\\[)\]]\s*</(?P=tag)>',
    re.DOTALL,
)
# A control word still present after conversion: a command latex2mathml did not know.
LEFTOVER_COMMAND = re.compile(r">\\[A-Za-z]+<")
# Commands the converter lacks, written with ones it has.
REWRITES = {r"\arg": r"\operatorname{arg}"}


def typeset(tex: str, display: bool) -> str:
    """Return the MathML of one formula (``display``: a block of its own, else inline).

    Raises:
        ValueError: ``tex`` uses a command the converter does not know.
    """
    for command, replacement in REWRITES.items():
        tex = re.sub(re.escape(command) + r"(?![A-Za-z])", lambda _, r=replacement: r, tex)
    mathml = convert(tex.strip(), display="block" if display else "inline")
    if LEFTOVER_COMMAND.search(mathml):
        raise ValueError(f"unknown TeX command in formula {tex.strip()!r}")
    return mathml


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """Replace the formulas of one rendered page by MathML."""

    def replace(m: re.Match[str]) -> str:
        display = m["open"] == "["
        try:
            mathml = typeset(html.unescape(m["tex"]), display)
        except Exception as exc:  # the converter raises its own types; name the page either way
            raise ValueError(f"{page.file.src_path}: cannot typeset {m['tex'][:80]!r}: {exc}") from exc
        cls = "arithmatex arithmatex--display" if display else "arithmatex"
        return f'<{m["tag"]} class="{cls}">{mathml}</{m["tag"]}>'

    return FORMULA.sub(replace, html_text)
