"""Where the examples write their outputs (imported by the example scripts beside it)."""

from __future__ import annotations

from pathlib import Path


def output_dir(out: str | None, write_docs: bool, name: str) -> Path:
    """Where the outputs go: ``--out`` if given, ``docs/img`` with ``--write-docs`` (tracked
    figures of the documentation), else the untracked ``out/{name}`` of the repository."""
    root = Path(__file__).resolve().parents[1]
    if out is not None and write_docs:
        raise SystemExit("give either --out or --write-docs, not both")
    path = Path(out) if out is not None else root / ("docs/img" if write_docs else f"out/{name}")
    path.mkdir(parents=True, exist_ok=True)
    print(f"outputs go to {path}")
    return path
