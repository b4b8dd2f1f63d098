"""Every ```python block of README.md and docs/**/*.md runs.

The blocks of one page run in order in one namespace, so a page can build on its earlier blocks.
A block that is not meant to run says so explicitly: the info string ``python no-run``, or a
``<!-- skip -->`` comment on the line before the fence. Other languages (```bash, ```text) are
never executed. A ```text block titled "Output" shows what the page's snippets print: it must
appear, up to whitespace, in what they print. Warnings keep the suite's filters, so a snippet
that emits an unexpected ``ConvergenceWarning`` fails.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SKIP_COMMENT = "<!-- skip -->"
# Modules whose docstring examples are written as doctests with their expected output; the API
# reference shows them, so they run here too.
DOCTEST_MODULES = [
    "implicit_layers._qp._functional",
    "implicit_layers._qp._layer",
    "implicit_layers._qp._settings",
    "implicit_layers._info",
    "implicit_layers.backward",
    "implicit_layers.linear._base",
    "implicit_layers.linear._loop",
    "implicit_layers.linear._operator",
    "implicit_layers.linear._power",
    "implicit_layers.linear._restart",
    "implicit_layers.linear.bicgstab",
    "implicit_layers.linear.broyden",
    "implicit_layers.linear.cg",
    "implicit_layers.linear.dense",
    "implicit_layers.linear.gmres",
    "implicit_layers.linear.lissa",
    "implicit_layers.linear.minres",
    "implicit_layers.linear.neumann",
    "implicit_layers.linear.solve",
    "implicit_layers.solvers._base",
    "implicit_layers.solvers.anderson",
    "implicit_layers.solvers.broyden",
    "implicit_layers.solvers.gradient_descent",
    "implicit_layers.solvers.lbfgs",
    "implicit_layers.solvers.newton",
    "implicit_layers.solvers.picard",
    "implicit_layers.nn",
    "implicit_layers._deq_norm",
    "implicit_layers.projection",
    "implicit_layers._polyhedron",
    "implicit_layers.prox",
    "implicit_layers.solvers.adaptive",
    "implicit_layers.solvers.proximal_gradient",
    "implicit_layers.solvers.least_squares",
    "implicit_layers._gauss_newton_backward",
    "implicit_layers.hyper.layers",
    "implicit_layers.hyper.trainer",
    "implicit_layers.hyper.transforms",
]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# A ```text block that quotes a message, "SomeWarning: text" or "SomeError: text", claims that
# the page's snippets print that text: it is checked against what they print.
QUOTED_MESSAGE = re.compile(r"^\w+(?:Warning|Error): (?P<text>.*)$", re.DOTALL)
OUTPUT_INFO = 'text title="Output"'


@dataclass
class Block:
    """One fenced code block: its info string, first code line (1-based) and text."""

    info: str
    line: int
    code: str
    skip_marked: bool


def parse_blocks(text: str) -> list[Block]:
    """Return the fenced code blocks of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            # Blocks nested in lists are indented; strip the fence's indentation only.
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened on line {i + 1}")
        blocks.append(Block(info, i + 2, "\n".join(body) + "\n", prev == SKIP_COMMENT))
        i = j + 1
    return blocks


def runnable(block: Block) -> bool:
    """A block runs when its language is Python and nothing marks it as not to run."""
    words = block.info.replace("{", " ").replace("}", " ").split()
    if not words or words[0].lstrip(".") not in ("python", "py"):
        return False
    return "no-run" not in words and not block.skip_marked


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_parser_finds_and_marks_blocks() -> None:
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "<!-- skip -->",
            "",
            "```python",
            "raise RuntimeError",
            "```",
            "```python no-run",
            "raise RuntimeError",
            "```",
            "```bash",
            "ls",
            "```",
            "- item",
            "    ```python",
            "    b = a + 1",
            "    ```",
        ]
    )
    blocks = parse_blocks(text)
    assert [b.line for b in blocks] == [2, 7, 10, 13, 17]
    assert [runnable(b) for b in blocks] == [True, False, False, False, True]
    assert blocks[4].code == "b = a + 1\n"


def run_blocks(blocks: list[Block], name: str) -> str:
    """Run ``blocks`` in order in one fresh namespace; return what they print."""
    namespace: dict[str, object] = {"__name__": f"docs_snippet_{Path(name).stem}"}
    out = io.StringIO()
    # The snippets' problems are tiny: on a small shared CPU one intra-op thread is several
    # times faster than two (see docs/testing.md), and it keeps this test's run time low.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in blocks:
            code = compile(block.code, f"{name}:{block.line}", "exec")
            with contextlib.redirect_stdout(out):
                exec(code, namespace)  # noqa: S102 - running the documentation is the point
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_snippets_run(page: Path) -> None:
    blocks = [b for b in parse_blocks(page.read_text(encoding="utf-8")) if runnable(b)]
    if not blocks:
        pytest.skip("no Python blocks on this page")
    printed = " ".join(run_blocks(blocks, _page_id(page)).split())
    for block in parse_blocks(page.read_text(encoding="utf-8")):
        if block.info == OUTPUT_INFO:
            shown = " ".join(block.code.split())
            assert shown in printed, (
                f"{_page_id(page)}:{block.line} shows an output its snippets do not print: {shown!r}; "
                f"they print {printed[-2000:]!r}"
            )
        m = QUOTED_MESSAGE.match(block.code.strip()) if block.info == "text" else None
        if m:
            quoted = " ".join(m["text"].split())
            assert quoted in printed, (
                f"{_page_id(page)}:{block.line} quotes a message that its snippets do not print "
                f"(any more): {quoted!r}"
            )


def test_quoted_message_pattern() -> None:
    assert QUOTED_MESSAGE.match("ConvergenceWarning: Picard did not\nconverge.")["text"] == (
        "Picard did not\nconverge."
    )
    assert QUOTED_MESSAGE.match("pip install -e .") is None


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module: str) -> None:
    import implicit_layers as il

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = doctest.testmod(
            importlib.import_module(module),
            extraglobs={"torch": torch, "il": il},
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            report=True,
        )
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0, f"{module} has no docstring examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} failed (see the output)"


def _python_block_after(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None, heading
    return match.group(1)


def test_layers_deq_snippet_trains_with_per_sample_info():
    """Beyond running, the DEQ snippet of docs/layers.md reports per-sample forward and backward
    statistics and gives every parameter a finite gradient."""
    code = _python_block_after(ROOT / "docs" / "layers.md", "## `DEQ`")
    namespace: dict = {}
    exec(compile(code, "docs/layers.md", "exec"), namespace)
    info = namespace["info"]
    assert info.converged.shape == (32,) and info.backward is not None
    grads = [p.grad for p in namespace["deq"].parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
