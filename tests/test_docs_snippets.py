"""Snippets of the documentation that are meant to run as written do run."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_block_after(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_layers_deq_snippet_runs_as_written():
    code = _python_block_after(ROOT / "docs" / "layers.md", "## `DEQ`")
    namespace: dict = {}
    exec(compile(code, "docs/layers.md", "exec"), namespace)
    info = namespace["info"]
    assert info.converged.shape == (32,) and info.backward is not None
    grads = [p.grad for p in namespace["deq"].parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
