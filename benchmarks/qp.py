"""QP layers side by side: ``il.qp`` against qpth, proxsuite's QPLayer and cvxpylayers.

For each batch size ``B`` and size ``n`` (``n`` inequalities, ``n // 5`` equalities, float64,
CPU), times forward + backward of ``loss = Σ w ∘ z*`` (median of repeats, every method in the
same process, the order of the methods shuffled from repeat to repeat), the solution error
against ProxQP at 1e-14 per sample, and the error of the gradient with respect to ``h`` (one
random direction) against central differences of that reference. Peers that are not installed
are skipped with a note.
``python -m benchmarks.run`` runs the ``--quick`` case as its section ``qp`` (:func:`run_qp`).

Usage::

    python benchmarks/qp.py                     # B in 1, 32, 128; n in 10, 50, 100
    python benchmarks/qp.py --quick             # B = 128, n = 50 only (the target case)
    python benchmarks/qp.py --cases             # LP, degenerate and infeasible problems
    python benchmarks/qp.py --sizes 500 --batches 1 32 128 --repeats 1   # n = 500 (long)
    python benchmarks/qp.py --out benchmarks/results/qp.json
    python benchmarks/qp.py --quick --baseline ../other-checkout   # also time that checkout's il.qp
    python benchmarks/qp.py --quick --clock cpu   # process CPU time instead of wall time
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import implicit_layers as il  # noqa: E402
from benchmarks._common import Config, Section  # noqa: E402

F64 = torch.float64


def problem(seed: int, B: int, n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    m, p = n, n // 5
    M = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = M @ M.mT / n + 0.1 * torch.eye(n, dtype=F64)
    q = torch.randn(B, n, generator=g, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    z0 = torch.randn(B, n, generator=g, dtype=F64)
    slack = torch.rand(B, m, generator=g, dtype=F64) * (torch.arange(m) >= n // 3)  # a third tight
    h = (G @ z0[..., None]).squeeze(-1) + slack
    A = torch.randn(B, p, n, generator=g, dtype=F64)
    b = (A @ z0[..., None]).squeeze(-1)
    return Q, q, G, h, A, b


def reference(Q, q, G, h, A, b) -> torch.Tensor:
    import proxsuite

    out = []
    for i in range(q.shape[0]):
        s = proxsuite.proxqp.dense.QP(q.shape[1], b.shape[1], h.shape[1])
        s.settings.eps_abs, s.settings.eps_rel, s.settings.max_iter = 1e-14, 0.0, 100000
        s.init(*(t[i].numpy() for t in (Q, q, A, b, G)), None, h[i].numpy())
        s.solve()
        out.append(s.results.x.copy())
    return torch.tensor(np.array(out), dtype=F64)


BASELINE = "il.qp (baseline)"
_skipped: set[str] = set()  # peers left out (--skip)
_baseline: Any = None  # another checkout's implicit_layers (--baseline), timed beside this one


def load_baseline(root: Path) -> Any:
    """Import ``root/implicit_layers`` under another module name (the package imports relatively)."""
    init = root / "implicit_layers" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no implicit_layers package under {root}")
    spec = importlib.util.spec_from_file_location("implicit_layers_baseline", init,
                                                  submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def methods(missing: list[str] | None = None) -> dict[str, Callable[..., torch.Tensor]]:
    """il.qp and the installed peers; a missing peer is printed, and appended to ``missing``."""
    missing = [] if missing is None else missing
    found: dict[str, Callable[..., torch.Tensor]] = {"il.qp": lambda *d: il.qp(*d)}
    if _baseline is not None:
        found[BASELINE] = lambda *d: _baseline.qp(*d)
    try:
        from qpth.qp import QPFunction, QPSolvers

        found["qpth"] = lambda *d: QPFunction(verbose=-1, solver=QPSolvers.PDIPM_BATCHED, eps=1e-12,
                                              maxIter=50)(*d)
    except ImportError:
        missing.append("qpth not installed: pip install qpth")
        print(f"({missing[-1]})")
    try:
        from proxsuite.torch.qplayer import QPFunction as ProxFunction

        def prox(Q, q, G, h, A, b):
            lower = torch.full_like(h, -1e20)
            return ProxFunction(eps=1e-12, maxIter=1000)(Q, q, A, b, G, lower, h)[0]

        found["proxsuite"] = prox
    except ImportError:
        missing.append("proxsuite not installed: pip install proxsuite")
        print(f"({missing[-1]})")
    if importlib.util.find_spec("cvxpylayers") is None:
        missing.append("cvxpylayers not installed: pip install cvxpylayers")
        print(f"({missing[-1]})")
    else:
        found["cvxpylayers"] = cvxpylayers_qp
    return {name: fn for name, fn in found.items() if name not in _skipped}


_cvxpy_layers: dict[tuple[int, int, int], Any] = {}


def cvxpylayers_qp(Q, q, G, h, A, b):
    """The QP through cvxpylayers (SCS at eps 1e-10). The layer is built once per shape (its
    canonicalisation is not timed); Q enters as a factor Lᵀ with LLᵀ = Q (from its eigenvalues, so
    a singular Q works), as DPP requires."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    n, m, p = q.shape[-1], h.shape[-1], b.shape[-1]
    if (n, m, p) not in _cvxpy_layers:
        z = cp.Variable(n)
        Lt, q_, G_, h_, A_, b_ = (cp.Parameter(shape) for shape in ((n, n), n, (m, n), m, (p, n), p))
        constraints = ([G_ @ z <= h_] if m else []) + ([A_ @ z == b_] if p else [])
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lt @ z) + q_ @ z), constraints)
        params = [Lt, q_] + ([G_, h_] if m else []) + ([A_, b_] if p else [])
        _cvxpy_layers[n, m, p] = (CvxpyLayer(problem, parameters=params, variables=[z]), m, p)
    layer, m, p = _cvxpy_layers[n, m, p]
    evals, evecs = torch.linalg.eigh(Q)
    Lt = (evecs * evals.clamp(min=0.0).sqrt().unsqueeze(-2)).mT
    inputs = [Lt, q] + ([G, h] if m else []) + ([A, b] if p else [])
    return layer(*inputs, solver_args={"eps": 1e-10, "max_iters": 100000})[0]


def run(B: int, n: int, repeats: int, missing: list[str] | None = None,
        clock: Callable[[], float] = time.perf_counter) -> list[dict[str, Any]]:
    """Rows ``B, n, method, ms, sol_err, grad_err`` (``error`` for a method that raised); the
    errors are NaN when proxsuite, the reference, is missing (then noted in ``missing``).
    ``clock`` times each call: wall time by default, or ``time.process_time`` (the CPU time of
    every thread of the process, steadier than wall time on a machine shared with other work)."""
    missing = [] if missing is None else missing
    data = problem(0, B, n)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    D = torch.randn(data[3].shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    try:
        ref = reference(*data)
        e = 1e-6
        hp, hm = data[3] + e * D, data[3] - e * D
        diff = reference(*data[:3], hp, *data[4:]) - reference(*data[:3], hm, *data[4:])
        fd = float((diff * w).sum() / (2 * e))
    except ImportError:
        ref = None
        missing.append("solution and gradient errors: proxsuite (the reference) not installed")
    rows = []
    found = methods(missing)
    times: dict[str, list[float]] = {k: [] for k in found}
    nan = float("nan")
    results: dict[str, tuple[float, float]] = {k: (nan, nan) for k in found}
    failures: dict[str, str] = {}
    names = list(found)
    for r in range(repeats):
        # The order is shuffled from repeat to repeat (seeded): the call after another
        # library's pays for the caches and memory that library left behind (measured: up to
        # 25 % of il.qp's time), so no method may always follow the same one. (A rotation kept
        # each method's predecessor fixed: the baseline always ran after il.qp, and il.qp after
        # the last peer; two versions timed twice, their places swapped, read 12-15 % slower in
        # il.qp's place.)
        order = names[:]
        random.Random(r).shuffle(order)
        for name in order:
            fn = found[name]
            args = [t.clone().requires_grad_(k == 3) for k, t in enumerate(data)]
            t0 = clock()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    z = fn(*args)
                    (z * w).sum().backward()
            except Exception as exc:  # a peer that fails is reported, not fatal
                failures[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
                print(f"  {name} failed: {failures[name]}")
                continue
            times[name].append(clock() - t0)
            if r == 0 and ref is not None:
                sol = float((z.detach() - ref).norm() / ref.norm())
                grad = abs(float((args[3].grad * D).sum()) - fd) / max(1.0, abs(fd))
                results[name] = (sol, grad)
    for name in found:
        ms = 1e3 * statistics.median(times[name]) if times[name] else nan
        rows.append({"B": B, "n": n, "method": name, "ms": ms, "sol_err": results[name][0],
                     "grad_err": results[name][1], **({"error": failures[name]} if name in failures else {})})
    return rows


def run_qp(cfg: Config) -> Section:
    """The section of ``python -m benchmarks.run``: the ``--quick`` case (B = 128, n = 50, the
    issue's target) or, with ``cfg.tiny``, B = 8, n = 10; CPU whatever ``cfg.device``."""
    B, n = (8, 10) if cfg.tiny else (128, 50)
    case = f"B={B}, n={n}"
    section = Section("qp", "QP layers: il.qp against qpth and proxsuite (float64, CPU)")
    section.notes.append(
        "Forward + backward of Σ w∘z*, median wall time of alternating repeats; sol_rel_err against "
        "ProxQP at 1e-14, grad_err of a directional derivative in h against central differences of "
        "that reference. Full grid and the failure cases: python benchmarks/qp.py [--cases]."
    )
    missing: list[str] = []
    rows = run(B, n, cfg.repeats, missing)
    section.skipped += [f"skipped {m}" for m in missing]
    for r in rows:
        extra = {"error": r["error"]} if "error" in r else {}
        section.add(case=case, method=r["method"], time_ms=r["ms"], sol_rel_err=r["sol_err"],
                    grad_err=r["grad_err"], **extra)
    ours = next(r for r in rows if r["method"] == "il.qp")
    if ours["sol_err"] == ours["sol_err"]:  # measured (proxsuite present)
        section.target(f"qp {case}: il.qp solution error", "<= 1e-8", ours["sol_err"],
                       ours["sol_err"] <= 1e-8)
        section.target(f"qp {case}: il.qp gradient error", "<= 1e-6", ours["grad_err"],
                       ours["grad_err"] <= 1e-6)
    peers = {r["method"]: r["ms"] for r in rows if r["method"] != "il.qp" and r["ms"] == r["ms"]}
    if peers:
        fastest = min(peers, key=peers.__getitem__)
        ratio = ours["ms"] / peers[fastest]
        section.target(f"qp {case}: il.qp / fastest peer", "<= 0.5", ratio, ratio <= 0.5,
                       f"{ours['ms']:.1f} vs {fastest} {peers[fastest]:.1f} ms")
    return section


def special_cases() -> list[dict[str, Any]]:
    """An LP, a duplicated equality row, duplicated inequality rows, and one infeasible sample in a
    batch of six: what each method returns (error against the exact answer, or the exception)."""
    g = torch.Generator().manual_seed(3)
    n = 6
    box = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)])
    q = torch.randn(n, generator=g, dtype=F64)
    lp = (torch.zeros(n, n, dtype=F64), q, box, torch.ones(2 * n, dtype=F64),
          torch.zeros(0, n, dtype=F64), torch.zeros(0, dtype=F64))
    lp_exact = -torch.sign(q)  # the vertex of the box [-1, 1]^n
    Q = torch.eye(n, dtype=F64)
    A = torch.ones(1, n, dtype=F64).repeat(2, 1)
    dup_eq = (Q, q, box, 2 * torch.ones(2 * n, dtype=F64), A, torch.ones(2, dtype=F64))
    proj = -q - (float(-q.sum()) - 1.0) / n  # projection of -q on sum z = 1 (inside the box)
    dup_ineq = (Q, q, torch.cat([box, box]), 0.1 * torch.ones(4 * n, dtype=F64),
                torch.zeros(0, n, dtype=F64), torch.zeros(0, dtype=F64))
    dup_exact = (-q).clamp(-0.1, 0.1)
    B = 6
    qb = torch.randn(B, n, generator=g, dtype=F64)
    hb = torch.ones(B, 2 * n, dtype=F64)
    hb[2, 0], hb[2, n] = -1.0, -1.0  # z0 <= -1 and -z0 <= -1: infeasible
    feasible = [i for i in range(B) if i != 2]
    batch_exact = (-qb).clamp(-1.0, 1.0)
    cases = {
        "LP (Q = 0)": ((lp[0] + 1e-8 * Q,) + lp[1:], lp_exact, None),
        "duplicated equality": (dup_eq, proj, None),
        "duplicated inequalities": (dup_ineq, dup_exact, None),
        "1 infeasible of 6": ((Q, qb, box, hb, torch.zeros(0, n, dtype=F64), torch.zeros(0, dtype=F64)),
                              batch_exact, feasible),
    }
    rows = []
    for case, (data, exact, keep) in cases.items():
        for name, fn in methods().items():
            args = data if name != "il.qp" or case != "LP (Q = 0)" else lp
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    z = fn(*args).detach()
                    if keep is None:
                        answer = f"error {float((z.reshape(-1) - exact).norm() / exact.norm()):.1e}"
                    else:
                        answer = f"neighbours' error {rel_rows(z[keep], exact[keep]):.1e}"
                except Exception as exc:
                    answer = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            flagged = any("infeasible" in str(w.message) for w in caught)
            rows.append({"case": case, "method": name, "returns": answer, "flagged": flagged})
            print(f"  {case:>24} {name:>10}: {answer}{'  [flagged]' if flagged else ''}")
    return rows


def rel_rows(z: torch.Tensor, exact: torch.Tensor) -> float:
    return float((z - exact).norm() / exact.norm())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only B = 128, n = 50")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100],
                        help="problem sizes n (default 10 50 100; 500 takes minutes per method)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128], help="batch sizes B")
    parser.add_argument("--skip", nargs="*", default=[], choices=["qpth", "proxsuite", "cvxpylayers"],
                        help="peers not to run (cvxpylayers takes minutes per call at n = 500)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as proxsuite's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time calls by wall time (default) or by the process's CPU time, all threads")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--cases", action="store_true", help="only the LP / degenerate / infeasible cases")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout whose il.qp is timed beside this one (before/after figures)")
    args = parser.parse_args(argv)
    global _baseline, _skipped
    _skipped = set(args.skip)
    _baseline = None if args.baseline is None else load_baseline(args.baseline)
    torch.set_num_threads(args.threads)
    if args.cases:
        return special_cases()
    grid = [(128, 50)] if args.quick else [(B, n) for n in args.sizes for B in args.batches]
    rows: list[dict[str, Any]] = []
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"({args.clock} time, {torch.get_num_threads()} torch thread(s))")
    print(f"{'B':>4} {'n':>4} {'method':>16} {'fwd+bwd ms':>11} {'sol err':>9} {'grad err':>9} "
          f"{'x fastest peer':>14}")
    for B, n in grid:
        case = run(B, n, args.repeats, clock=clock)
        peers = [r["ms"] for r in case if r["method"] not in ("il.qp", BASELINE) and r["ms"] == r["ms"]]
        for r in case:
            ratio = r["ms"] / min(peers) if peers else float("nan")
            print(f"{B:>4} {n:>4} {r['method']:>16} {r['ms']:>11.1f} {r['sol_err']:>9.1e} "
                  f"{r['grad_err']:>9.1e} {ratio:>14.2f}")
        rows += case
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
