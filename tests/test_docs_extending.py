"""The code blocks of docs/extending.md run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"

pytestmark = pytest.mark.usefixtures("single_thread")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_extending_guide_code_runs():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4  # a forward solver and a linear solver, each defined and used
    namespace: dict = {"__name__": "extending_md"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert namespace["HeavyBall"].__mro__[1].__name__ == "ForwardSolver"
    assert namespace["MinimalResidual"].__mro__[1].__name__ == "LinearSolver"
    assert namespace["ElementwiseRoot"].__mro__[1].__name__ == "RootProblem"
