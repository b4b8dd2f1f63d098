"""The higher-order benchmark runs in tiny mode, writes well-formed results, and reports a method
that raises instead of crashing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import higher_order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ho")
    res = higher_order.main(["--tiny", "--out", str(out), "--repeats", "1", "--threads", "0"])
    return res, out


def test_writes_json_and_markdown(tiny):
    res, out = tiny
    loaded = json.loads((out / "higher_order_tiny.json").read_text())
    assert loaded["meta"]["tiny"] is True
    assert [s["name"] for s in loaded["sections"]] == ["higher_order"]
    md = (out / "higher_order_tiny.md").read_text()
    assert "## Targets" in md and "reproduce" in md and "jacfwd" in md


def test_every_row_has_a_time_and_error_or_a_reported_failure(tiny):
    res, _ = tiny
    (sec,) = res["sections"]
    cases = {r["case"] for r in sec["rows"]}
    assert any(c.startswith("ridge") for c in cases)
    assert any(c.startswith("DEQ") for c in cases)
    assert sum(c.startswith("p=") for c in cases) == 2
    for r in sec["rows"]:
        if r.get("error"):
            assert r["time_ms"] is None
            continue
        assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0, r
        assert math.isfinite(r["rel_err"]) and r["rel_err"] >= 0, r
    for t in sec["targets"]:
        assert {"name", "goal", "measured", "met", "detail"} <= set(t)


def test_first_order_rows_are_accurate(tiny):
    """What works on every version of the core: first-order hypergradients and the eager loop."""
    res, _ = tiny
    (sec,) = res["sections"]
    rows = [r for r in sec["rows"] if r["method"].startswith("ours") and r["method"].endswith(
        "gradient")] + [r for r in sec["rows"] if r["method"] == "eager reverse loop"]
    assert len(rows) == 3 + 2
    assert all(r["rel_err"] < 1e-6 for r in rows), rows


def test_a_method_that_raises_is_reported(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(torch.func, "jacfwd", broken)
    cfg = higher_order.Config(tiny=True, repeats=1, warmup=1, threads=None)
    section = higher_order.Section("higher_order", "t")
    higher_order.run_jac(cfg, section)
    failed = [r for r in section.rows if r["method"] == "jacfwd"]
    assert len(failed) == 2 and all("simulated failure" in r["error"] for r in failed)
    assert all(r["time_ms"] > 0 for r in section.rows if r["method"] == "eager reverse loop")
