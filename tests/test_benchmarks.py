"""The benchmark suite runs in tiny mode and writes well-formed results; missing peers are skipped."""

from __future__ import annotations

import json
import math

import pytest
import torch

import implicit_layers as il
from benchmarks import _common, run


def _fail_jax(monkeypatch):
    real = _common.import_peer

    def fake(name):
        if name in ("jax", "jaxopt"):
            raise ImportError(f"{name} unavailable (simulated)")
        return real(name)

    monkeypatch.setattr(_common, "import_peer", fake)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    _fail_jax(mp)  # also keeps the test fast: no XLA compilation
    out = tmp_path_factory.mktemp("bench")
    try:
        res = run.main(["--tiny", "--out", str(out), "--repeats", "1"])
    finally:
        mp.undo()
    return res, out


def test_writes_json_and_markdown(tiny_results):
    res, out = tiny_results
    loaded = json.loads((out / "results_tiny.json").read_text())
    assert loaded["meta"]["tiny"] is True
    assert {s["name"] for s in loaded["sections"]} == set(run.PROBLEMS)
    md = (out / "results_tiny.md").read_text()
    assert "## Targets" in md and "reproduce" in md


def test_rows_have_finite_times_and_errors(tiny_results):
    res, _ = tiny_results
    for s in res["sections"]:
        assert s["rows"], s["name"]
        for r in s["rows"]:
            assert isinstance(r["case"], str) and isinstance(r["method"], str)
            if "error" in r:  # a method that raised is reported with its message
                assert r["error"]
                continue
            if "time_ms" in r and r["time_ms"] is not None:
                assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0
        if s["name"] in ("ridge", "deq", "imaml"):
            errs = [r["grad_rel_err"] for r in s["rows"] if r.get("grad_rel_err") is not None]
            assert errs and all(e >= 0 and math.isfinite(e) for e in errs)


def test_our_gradients_are_accurate_in_tiny_run(tiny_results):
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}
    for name, method in (("ridge", "ours CG"), ("ridge", "ours Dense"), ("ridge", "ours (compiled solve)"),
                         ("ridge", "ours (whole call compiled)"),
                         ("deq", "ours Anderson+GMRES"), ("deq", "ours default"), ("imaml", "ours Dense")):
        rows = [r for r in sec[name]["rows"] if r["method"] == method]
        assert rows and all(r["grad_rel_err"] < 1e-6 for r in rows), (name, method, rows)


def test_missing_peer_is_skipped_with_note(tiny_results):
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}
    assert any("jax" in n and "skipped" in n for n in sec["ridge"]["skipped"])
    assert not any(r["method"].startswith("jaxopt") for r in sec["ridge"]["rows"])


def test_memory_rows_and_targets(tiny_results):
    res, _ = tiny_results
    mem = next(s for s in res["sections"] if s["name"] == "memory")
    imp = [r["saved_MB"] for r in mem["rows"] if r["method"] == "implicit"]
    unr = [r["saved_MB"] for r in mem["rows"] if r["method"] == "unrolled"]
    assert imp[-1] <= 1.1 * imp[0] and unr[-1] > 1.5 * unr[0]
    for s in res["sections"]:
        for t in s["targets"]:
            assert {"name", "goal", "measured", "met"} <= set(t)


def test_all_peers_missing_does_not_crash(monkeypatch):
    def fake(name):
        raise ImportError(f"{name} unavailable (simulated)")

    monkeypatch.setattr(_common, "import_peer", fake)
    from benchmarks.ridge import run_ridge

    sec = run_ridge(_common.Config(tiny=True, repeats=1, warmup=1, threads=None))
    assert len(sec.skipped) == 2
    assert all(r["method"].startswith(("ours", "dense", "unrolled")) for r in sec.rows)


def test_custom_root_returns_solver_value_when_inexact():
    # regression: the returned value is the solver's z even when F(z) != 0 (early stop)
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    @il.custom_root(lambda z, b: A @ z - b, symmetric=True)
    def inexact(z0, b):
        return torch.linalg.solve(A, b) + 0.1

    b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    z = inexact(torch.zeros(2, dtype=torch.float64), b)
    torch.testing.assert_close(z.detach(), torch.linalg.solve(A, b.detach()) + 0.1)


def test_backward_reuse_rows(tiny_results):
    # The backward the forward picked (Neumann from its contraction) against GMRES, both to
    # the forward tolerance: equal accuracy, and the VJP counts reported.
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}
    rows = [r for r in sec["deq"]["rows"] if r["case"].startswith("backward only")]
    assert {r["method"].split(":")[0] for r in rows} == {"before", "after"}
    for r in rows:
        assert r["grad_rel_err"] < 1e-6 and r["bwd_vjps"] > 0 and 0 < r["forward_rho"] < 1
    assert any("Neumann" in r["method"] for r in rows if r["method"].startswith("after"))


def test_compiled_solve_rows(tiny_results):
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}["compiled_solve"]
    methods = {r["method"]: r for r in sec["rows"]}
    compiled = methods["compiled_solve + torch.compile(eager, fullgraph)"]
    assert compiled["breaks"] == 0 and compiled["first_call_s"] > 0
    for r in sec["rows"]:  # float32 gradients against eager Picard + Neumann
        assert r["grad_rel_err"] < 1e-4, r


def test_compile_rows(tiny_results):
    """Every model kind of the compile section: one break per eagerly run layer, none with the
    compiled solve, no new graphs after the second batch size, gradients as eager."""
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}["compile"]
    compiled = [r for r in sec["rows"] if r["method"] == "compiled (eager)"]
    kinds = {r["case"].split(" n=")[0]: r for r in compiled}
    assert set(kinds) == {"DEQ", "ArgminLayer (box)", "ArgminLayer (unbounded)",
                          "ArgminLayer (prox=l1)", "QPLayer", "DEQ (compiled_solve=True)"}
    for kind, r in kinds.items():
        assert r["breaks"] == (0 if "compiled_solve" in kind else 1), r
        assert r["graphs_after_6_sizes"] == r["graphs_after_2_sizes"], r
        assert r["grad_rel_err"] < 1e-5, r
    assert any(r["method"] == "default DEQ: eager" for r in sec["rows"])


def test_composite_rows_are_accurate(tiny_results):
    # Our hypergradients against the active-set / KKT closed forms and our fits against a tight
    # scipy solve, to the accuracy; jax is simulated missing, so its peers are noted.
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}["composite"]
    ours = {r["case"]: r for r in sec["rows"] if r["method"] == "ours"}
    hyper = [r for case, r in ours.items() if not case.startswith("curve")]
    fits = [r for case, r in ours.items() if case.startswith("curve")]
    assert len(hyper) == 2 and all(r["hypergrad_rel_err"] < 1e-6 for r in hyper), hyper
    assert len(fits) == 2 and all(r["sol_abs_err"] < 1e-8 for r in fits), fits
    scipy_rows = [r for r in sec["rows"] if r["method"].startswith("scipy")]
    assert scipy_rows and all(r["sol_abs_err"] < 1e-6 for r in scipy_rows)
    assert any("jaxopt" in n for n in sec["skipped"]) and any("optimistix" in n for n in sec["skipped"])
    assert not any(r["method"].startswith(("jaxopt", "optimistix")) for r in sec["rows"])


def test_qp_rows_are_accurate(tiny_results):
    res, _ = tiny_results
    sec = {s["name"]: s for s in res["sections"]}["qp"]
    rows = {r["method"]: r for r in sec["rows"]}
    assert rows["il.qp"]["time_ms"] > 0
    if any("proxsuite (the reference) not installed" in n for n in sec["skipped"]):
        pytest.skip("proxsuite, the reference of the errors, is not installed")
    assert rows["il.qp"]["sol_rel_err"] < 1e-8 and rows["il.qp"]["grad_err"] < 1e-6
    targets = {t["name"]: t for t in sec["targets"]}
    assert targets["qp B=8, n=10: il.qp solution error"]["met"]


def test_qp_section_without_peers_or_reference(monkeypatch):
    # Every peer and the reference missing: il.qp is still timed, the rest is noted, no error.
    import builtins

    from benchmarks import qp

    real_import = builtins.__import__

    def no_peers(name, *args, **kwargs):
        if name.split(".")[0] in ("qpth", "proxsuite"):
            raise ImportError(f"{name} unavailable (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    real_find_spec = qp.importlib.util.find_spec
    monkeypatch.setattr(qp.importlib.util, "find_spec",
                        lambda name, *a: None if name == "cvxpylayers" else real_find_spec(name, *a))
    sec = qp.run_qp(_common.Config(tiny=True, repeats=1, warmup=1, threads=None))
    assert [r["method"] for r in sec.rows] == ["il.qp"]
    assert sec.rows[0]["sol_rel_err"] is None and sec.rows[0]["time_ms"] > 0
    assert any("proxsuite (the reference)" in n for n in sec.skipped)
    assert any("qpth not installed" in n for n in sec.skipped)
    assert any("cvxpylayers not installed" in n for n in sec.skipped)
