"""The site seen in a real browser: ``docs/_scripts/check_site.py`` on the built site.

Skipped where no Chromium-family browser is installed (the browser is not a dependency of the
project; ``apt-get install chromium`` brings one).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "_scripts" / "check_site.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_site", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_site = _load()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(check_site.find_browser() is None, reason="no Chromium-family browser installed"),
]


def test_checker_reports_wide_code_and_raw_tex(tmp_path: Path) -> None:
    # A page with the defects the checker exists for: it must name both.
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(
        "<html><body><div class='md-content' style='width: 600px'>"
        "<pre><code style='display: block; overflow: auto'>" + "x = 1  # " + "w" * 300 + "</code></pre>"
        "<p>a formula left as TeX: \\(a + b\\)</p></div></body></html>",
        encoding="utf-8",
    )
    problems = check_site.check_site(tmp_path / "shots", site=site, pages=[""])
    assert any("code block wider than its column" in p for p in problems), problems
    assert any("raw TeX" in p for p in problems), problems
    assert (tmp_path / "shots" / "index_1280.png").stat().st_size > 0


def test_main_pages_render_cleanly(tmp_path: Path) -> None:
    # Two pages keep the test near a minute; `python docs/_scripts/check_site.py` checks them all.
    problems = check_site.check_site(tmp_path, pages=["", "choosing/"])
    assert problems == []
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "choosing_1280.png", "choosing_390.png", "index_1280.png", "index_390.png",
    ]
