"""The "Coming from ..." pages run whole, the peer library's halves included.

``tests/test_docs_snippets.py`` runs each page's own blocks; the peer's blocks carry a
``<!-- skip -->`` mark there, because the peers are optional. Here every Python block of a page
runs in order in one namespace, where the peer is installed (skipped otherwise), and every
comparison the page prints must hold: each printed line that is a boolean is ``True``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_docs_snippets import parse_blocks, run_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs" / "coming-from"
# page -> the modules its peer blocks import
PEERS = {
    "jaxopt.md": ("jax", "jaxopt"),
    "torchopt.md": ("torchopt",),
    "torchdeq.md": ("torchdeq",),
    "qpth.md": ("qpth",),
}


@pytest.mark.parametrize(
    "page",
    # importing jax and compiling its solvers takes most of half a minute
    [
        pytest.param("jaxopt.md", marks=pytest.mark.slow),
        # torchopt 0.7 still calls the deprecated functorch.vjp
        pytest.param("torchopt.md", marks=pytest.mark.filterwarnings("ignore:We've integrated functorch")),
        "torchdeq.md",
        "qpth.md",
    ],
)
def test_page_runs_with_its_peer(page: str) -> None:
    for module in PEERS[page]:
        pytest.importorskip(module)
    blocks = [b for b in parse_blocks((DOCS / page).read_text(encoding="utf-8"))
              if b.info.split()[:1] == ["python"]]
    assert any(b.skip_marked for b in blocks), f"{page} has no peer block"
    printed = run_blocks(blocks, f"docs/coming-from/{page}")
    verdicts = [line.strip() for line in printed.splitlines() if line.strip() in ("True", "False")]
    assert verdicts and "False" not in verdicts, printed


def test_every_page_is_listed() -> None:
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PEERS)
    assert sorted(PEERS) == ["jaxopt.md", "qpth.md", "torchdeq.md", "torchopt.md"]
