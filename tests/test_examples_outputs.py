"""Examples write into the untracked ``out/`` folder unless asked to regenerate ``docs/img``."""

import subprocess
from pathlib import Path

import pytest

from tests.helpers import load_example as _load

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ["data_poisoning", "hyperparameter_optimization", "imaml", "influence_functions",
           "meta_descent", "stn_digits", "stn_toy"]


def _ignored(path: Path) -> bool:
    probe = path / "probe.png"
    res = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
    return res.returncode == 0


@pytest.mark.parametrize("name", WRITERS)
def test_default_output_folder_is_untracked(name, capsys):
    module = _load(name)
    path = module.output_dir(None, False, name)
    assert path == ROOT / "out" / name
    assert f"outputs go to {path}" in capsys.readouterr().out
    if (ROOT / ".git").exists():
        assert _ignored(path)
    assert module.output_dir(None, True, name) == ROOT / "docs" / "img"
    with pytest.raises(SystemExit, match="either --out or --write-docs"):
        module.output_dir("elsewhere", True, name)


def test_no_example_defaults_to_docs():
    for path in (ROOT / "examples").glob("*.py"):
        text = path.read_text()
        assert 'default=Path("docs/img")' not in text, path.name
        assert 'default=os.path.join("docs", "img")' not in text, path.name
