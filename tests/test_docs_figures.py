"""The documentation's generated figures: ``docs/_scripts/figures.py`` and the peer chart of
``benchmarks/plots.py``."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest

import implicit_layers as il
from benchmarks import plots

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _figures():
    spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "docs" / "_scripts" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _figures()


def test_residual_trace_reaches_the_tolerance():
    T = figures.deq_tensors("hard", 32, 8)
    trace = figures.residual_trace(T, il.solvers.Picard(rtol=1e-10, max_steps=400))
    assert trace[0] == pytest.approx(1.0)  # f(0) - 0 = f(0)
    assert trace[-1] <= 1e-10 < trace[-2]
    # plain iteration on a contraction: the residual shrinks at every step after the first few
    assert all(b < a for a, b in zip(trace[3:], trace[4:], strict=False))


def test_gradient_errors_fall_with_the_backward_steps():
    T = figures.deq_tensors("hard", 32, 8)
    ref = figures.reference(T)
    quiet = {"rtol": 1e-15, "on_failure": "ignore"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        one = figures.deq_gradient_error(T, ref, il.linear.Neumann(max_steps=1, **quiet))
        many = figures.deq_gradient_error(T, ref, il.linear.Neumann(max_steps=300, **quiet))
        cg_short = figures.ridge_gradient_error(20, il.linear.CG(max_steps=2, **quiet))
        cg_full = figures.ridge_gradient_error(20, il.linear.CG(max_steps=40, **quiet))
    assert one > 1e-2 and many < 1e-8
    # CG is exact in at most d steps (up to rounding); two steps are not enough
    assert cg_short > 1e-4 and cg_full < 1e-10


def test_make_figures_tiny(tmp_path):
    paths = figures.make_figures(tmp_path, tiny=True)
    assert [p.name for p in paths] == ["deq_residuals.png", "gradient_error_vs_steps.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_peer_chart_finds_every_method_in_the_committed_results(tmp_path):
    results = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    rows = {(s["name"], r["case"], r["method"]) for s in results["sections"] for r in s["rows"]}
    missing = [(sec, case, m) for sec, case, _, methods in plots.PEER_CASES for m in methods.values()
               if (sec, case, m) not in rows]
    assert missing == []
    assert plots.peer_chart(results, tmp_path) == tmp_path / "bench_peers.png"
    assert plots.peer_chart({"sections": []}, tmp_path) is None


def test_deq_training_curves_tiny(tmp_path):
    """The DEQ training-curve script trains the example twice and records one point per epoch
    and per curve; the Jacobian penalty changes the training (different forward steps)."""
    spec = importlib.util.spec_from_file_location("deq_curves", ROOT / "docs" / "_scripts" / "deq_curves.py")
    assert spec is not None and spec.loader is not None
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    results = curves.main(["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "deq_training_curves.png").stat().st_size > 10_000
    plain, penalised = results.values()
    for result in (plain, penalised):
        history = result["history"]
        assert {len(v) for v in history.values()} == {result["epochs"]}
        assert all(0.0 <= a <= 1.0 for a in history["test_accuracy"])
        assert history["test_accuracy"][-1] == pytest.approx(result["test_accuracy"])
        assert all(s >= 1 for s in history["forward_steps"] + history["backward_steps"])
    assert plain["history"]["forward_steps"] != penalised["history"]["forward_steps"]
