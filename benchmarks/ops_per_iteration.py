"""Aten ops and host synchronisations per iteration of every solver loop.

Usage::

    python -m benchmarks.ops_per_iteration [--tiny] [--out DIR]

On a GPU each dispatched aten op is (at least) one kernel launch, so the ops a loop spends on
its own bookkeeping, beyond the map (or the operator product), bound how fast it can run when
the problem is small. A :class:`~torch.utils._python_dispatch.TorchDispatchMode` counts every
aten op dispatched by a solve, except those dispatched inside the map, its VJP or the operator
product (counting pauses there). Each loop runs twice without converging (``rtol = 0``), for
``K`` and ``2K`` iterations; the difference divided by ``K`` is the cost of one iteration,
free of set-up and result assembly. ``aten._local_scalar_dense`` is the host synchronisation
(``.item()``, ``bool()``); it, ``Tensor.tolist`` and ``Tensor.numpy`` (which read the data
without a kernel, and copy to the host on an accelerator) are counted as synchronisations
(and also among the ops, one each).

Two settings: ``check_every=1`` (the CPU default: a convergence check every step) and
``check_every=8`` (the accelerator default), where synchronisations happen only at checks.

Problems: forward solvers on a tanh DEQ ``z = tanh(W z + U x + b)`` (B = 64, n = 256, float64,
the "easy" data of :mod:`benchmarks.deq`); linear solvers on the adjoint operator of that DEQ
at its fixed point, ``u ↦ u - J_fᵀ u`` (a VJP), and CG / MINRES on an SPD matrix operator
(n = 300, B = 64).

A second part counts the ops of one whole call (forward + backward) of the easy DEQ, beyond the
map evaluations and their VJPs (:mod:`benchmarks._whole_call`).

A third part compiles an ``il.nn.DEQ`` forward with ``torch.compile`` and counts its graph
breaks (``torch._dynamo.explain``), and times compiled against eager forward + backward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):  # run as a script: python benchmarks/ops_per_iteration.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import implicit_layers as il  # noqa: E402
from benchmarks._common import (  # noqa: E402
    Config,
    Section,
    add_output_arguments,
    output_dir,
    restore_threads,
    set_threads,
)
from benchmarks.deq import make_deq  # noqa: E402

#: Targets of ops per iteration beyond the map / VJP / operator product.
TARGETS = {
    "Picard": 8, "Neumann": 8, "CG": 15, "Anderson": 25, "GMRES": 35,
    # Picard's 8 plus the contraction estimate at the checks
    "Adaptive (Picard phase)": 10, "Adaptive (Anderson phase)": 25,
}
#: The same counts on the code before the lean loops (commit 26629c9), full size: (ops, syncs)
#: per iteration for (loop, check_every), printed beside the new figures.
BEFORE = {
    ("Picard", 1): (27.25, 2.0),
    ("Picard", 8): (27.25, 0.125),
    ("Picard (damped 0.8)", 1): (29.0, 2.0),
    ("Picard (damped 0.8)", 8): (29.25, 0.125),
    ("Anderson", 1): (61.75, 4.0),
    ("Anderson", 8): (62.5, 0.125),
    ("Broyden", 1): (107.25, 3.062),
    ("Broyden", 8): (124.44, 0.25),
    ("Neumann", 1): (15.0, 1.0),
    ("Neumann", 8): (12.38, 0.125),
    ("GMRES", 1): (81.0, 1.0),
    ("GMRES", 8): (73.12, 0.125),
    ("BiCGStab", 1): (80.0, 1.0),
    ("BiCGStab", 8): (72.12, 0.125),
    ("Broyden (linear)", 1): (90.88, 1.0),
    ("Broyden (linear)", 8): (83.56, 0.188),
    ("CG", 1): (19.0, 2.0),
    ("CG", 8): (25.25, 0.125),
    ("MINRES", 1): (62.0, 1.0),
    ("MINRES", 8): (54.12, 0.125),
    # Adaptive before it moved to the windowed monitor (commit 9a71d80), each phase alone
    ("Adaptive (Picard phase)", 1): (39.25, 3.0),
    ("Adaptive (Picard phase)", 8): (27.88, 0.25),
    ("Adaptive (Anderson phase)", 1): (55.75, 2.0),
    ("Adaptive (Anderson phase)", 8): (55.25, 0.125),
}
SYNC = torch.ops.aten._local_scalar_dense.default
#: The functions that hold the convergence checks (the intended graph breaks).
CHECKS = {
    "stop", "_judge", "_judge_one", "_count_flags", "_flush", "check_done", "check_active", "proceed",
    "next_round",
}


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host synchronisations; :meth:`paused` hides a callable's own ops."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.names: dict[str, int] = {}
        self._pause = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._pause:
            self.ops += 1
            key = str(func.overloadpacket.__name__)
            self.names[key] = self.names.get(key, 0) + 1
            if func is SYNC:
                self.syncs += 1
        return func(*args, **(kwargs or {}))

    def paused(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            self._pause += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._pause -= 1

        return wrapper


def _count(run: Callable[[OpCounter], object]) -> OpCounter:
    counter = OpCounter()
    # ``Tensor.tolist`` and ``Tensor.numpy`` read the data without a kernel (on an
    # accelerator the read copies to the host, a synchronisation): each counted by hand as one
    # op and one sync. ``numpy`` makes an alias first (an aten ``detach``, no kernel): part of
    # the read, not counted apart.
    reads = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name: str, read: Callable) -> Callable:
        def read_counted(self, *args, **kwargs):
            if not counter._pause:
                counter.ops += 1
                counter.syncs += 1
                counter.names[name] = counter.names.get(name, 0) + 1
            return counter.paused(read)(self, *args, **kwargs)

        return read_counted

    for name, read in reads.items():
        setattr(torch.Tensor, name, counted(name, read))
    try:
        with counter:
            run(counter)
    finally:
        for name, read in reads.items():
            setattr(torch.Tensor, name, read)
    return counter


def per_iteration(run: Callable[[OpCounter, int], object], k: int) -> tuple[float, float, dict]:
    """Ops and syncs per iteration from runs of ``k`` and ``2k`` iterations."""
    run(OpCounter(), 2)  # warm-up: lazy initialisations are not per-iteration costs
    a = _count(lambda c: run(c, k))
    b = _count(lambda c: run(c, 2 * k))
    names = {n: (b.names.get(n, 0) - a.names.get(n, 0)) / k for n in set(a.names) | set(b.names)}
    names = {n: v for n, v in sorted(names.items(), key=lambda t: -t[1]) if v}
    return (b.ops - a.ops) / k, (b.syncs - a.syncs) / k, names


def _easy(tiny: bool) -> dict[str, torch.Tensor]:
    d = make_deq("easy", hidden=64 if tiny else 256, batch=16 if tiny else 64)
    return {k: torch.from_numpy(v) for k, v in d.items()}


def _deq_data(tiny: bool):
    d = _easy(tiny)
    W, U, b, x = d["W"], d["U"], d["b"], d["x"]
    inj = x @ U.T + b
    return W, inj


def _forward_runner(solver_cls, check_every: int, tiny: bool, **kw):
    W, inj = _deq_data(tiny)

    def run(counter: OpCounter, steps: int):
        f = counter.paused(lambda z: torch.tanh(z @ W.T + inj))
        solver = solver_cls(
            **kw, rtol=0.0, atol=0.0, max_steps=steps, check_every=check_every,
            on_failure="ignore",
        )
        with torch.no_grad():
            il.fixed_point(f, torch.zeros_like(inj), solver=solver, batched=True,
                           backward=il.backward.Implicit())

    return run


def _adjoint_operator(tiny: bool):
    """``u ↦ u - J_fᵀ u`` at the DEQ's fixed point, and a right-hand side."""
    W, inj = _deq_data(tiny)
    with torch.no_grad():
        z = il.fixed_point(lambda z: torch.tanh(z @ W.T + inj), torch.zeros_like(inj),
                           solver=il.solvers.Picard(max_steps=400), batched=True)
    d = 1 - torch.tanh(z @ W.T + inj) ** 2  # tanh' at the fixed point

    def mv(u):
        return u - (u * d) @ W

    g = torch.randn(inj.shape, generator=torch.Generator().manual_seed(1), dtype=inj.dtype)
    return mv, g


def _spd_operator(tiny: bool):
    n, batch = (60, 8) if tiny else (300, 64)
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.logspace(0, 4, n, dtype=torch.float64)) @ Q.T
    A = (A + A.T) / 2
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return A, b


def _linear_runner(solver_cls, check_every: int, tiny: bool, spd: bool, **kw):
    if spd:
        A, b = _spd_operator(tiny)
        mv = A.__rmatmul__  # v @ A (A symmetric)
    else:
        mv, b = _adjoint_operator(tiny)

    def run(counter: OpCounter, steps: int):
        op = il.linear.FunctionOperator(
            counter.paused(mv), b.shape[0], b.shape[1], b.dtype, b.device,
            symmetric=spd or None, positive_definite=True if spd else None,
        )
        solver = solver_cls(
            **kw, rtol=0.0, atol=0.0, max_steps=steps, check_every=check_every,
            on_failure="ignore",
        )
        with torch.no_grad():
            solver.solve(op, b)

    return run


class _NeverSwitch(il.solvers.Adaptive):
    """Adaptive kept in its Picard phase (with ``rtol = 0`` the budget rule would switch, or
    try Anderson): plain steps plus the contraction estimate at every check."""

    def _switch(self, worst: float, rho: float, needed: float, left: int) -> bool:
        return False

    @staticmethod
    def _try(needed: float) -> bool:
        return False


class _SwitchAtOnce(il.solvers.Adaptive):
    """Adaptive switching to Anderson at its first look at the contraction (after ``window``
    plain steps, or the first check after them): the runs of ``K`` and ``2K`` iterations share
    that Picard prefix, so their difference is the Anderson phase alone."""

    def _switch(self, worst: float, rho: float, needed: float, left: int) -> bool:
        return True


def _cases(tiny: bool):
    S, L = il.solvers, il.linear
    return [
        ("Picard", "forward, tanh DEQ", lambda ce: _forward_runner(S.Picard, ce, tiny)),
        ("Picard (damped 0.8)", "forward, tanh DEQ",
         lambda ce: _forward_runner(S.Picard, ce, tiny, damping=0.8)),
        ("Anderson", "forward, tanh DEQ", lambda ce: _forward_runner(S.Anderson, ce, tiny)),
        ("Broyden", "forward, tanh DEQ", lambda ce: _forward_runner(S.Broyden, ce, tiny)),
        # the default forward solver, each phase alone (Picard, then Anderson on slow contraction)
        ("Adaptive (Picard phase)", "forward, tanh DEQ",
         lambda ce: _forward_runner(_NeverSwitch, ce, tiny)),
        ("Adaptive (Anderson phase)", "forward, tanh DEQ",
         lambda ce: _forward_runner(_SwitchAtOnce, ce, tiny)),
        ("Neumann", "adjoint of the DEQ", lambda ce: _linear_runner(L.Neumann, ce, tiny, False)),
        # restart larger than the iterations counted: the inner Arnoldi steps are measured
        ("GMRES", "adjoint of the DEQ",
         lambda ce: _linear_runner(L.GMRES, ce, tiny, False, restart=40)),
        ("BiCGStab", "adjoint of the DEQ",
         lambda ce: _linear_runner(L.BiCGStab, ce, tiny, False)),
        ("Broyden (linear)", "adjoint of the DEQ",
         lambda ce: _linear_runner(L.Broyden, ce, tiny, False)),
        ("CG", "SPD matrix", lambda ce: _linear_runner(L.CG, ce, tiny, True)),
        ("MINRES", "SPD matrix", lambda ce: _linear_runner(L.MINRES, ce, tiny, True)),
    ]


def count_ops(tiny: bool = False, k: int = 16) -> list[dict]:
    """Rows: case (the problem), method (the loop), check_every, ops and syncs per
    iteration, target, most frequent ops."""
    rows = []
    for name, problem, make in _cases(tiny):
        for ce in (1, 8):
            try:
                ops, syncs, names = per_iteration(make(ce), k)
            except Exception as exc:  # a loop that fails is reported, not fatal
                rows.append({"case": problem, "method": name, "check_every": ce,
                             "error": f"{type(exc).__name__}: {exc}"})
                continue
            target = TARGETS.get(name)
            top = ", ".join(f"{n} {v:g}" for n, v in list(names.items())[:6])
            before = BEFORE.get((name, ce), (None, None)) if not tiny else (None, None)
            rows.append({
                "case": problem, "method": name, "check_every": ce,
                "ops_before": before[0], "ops_per_iter": round(ops, 2),
                "syncs_before": before[1], "syncs_per_iter": round(syncs, 3),
                "target": target, "met": None if target is None else ops <= target,
                "top_ops": top,
            })
    return rows


# -- torch.compile of a DEQ module ---------------------------------------------------------


class _Cell(torch.nn.Module):
    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(W.clone())
        self.U = torch.nn.Parameter(U.clone())
        self.b = torch.nn.Parameter(b.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _deq_module(tiny: bool, solver, backward):
    d = _easy(tiny)
    deq = il.nn.DEQ(_Cell(d["W"], d["U"], d["b"]), solver=solver, backward=backward,
                    state_shape=(d["W"].shape[0],))
    return deq, d["x"].clone().requires_grad_(True)


def compile_available() -> str | None:
    """``None`` if ``torch.compile`` works here, else why not."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        fn(torch.ones(3))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def graph_breaks(tiny: bool, configs: dict) -> list[dict]:
    """Graph breaks of a DEQ forward under ``torch._dynamo.explain`` for each configuration."""
    rows = []
    for label, (solver, backward) in configs.items():
        deq, x = _deq_module(tiny, solver, backward)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex = torch._dynamo.explain(deq)(x)
        reasons: dict[str, int] = {}
        at_checks = 0
        for br in ex.break_reasons:
            where = br.user_stack[-1] if br.user_stack else None
            key = f"{Path(where.filename).name}:{where.name}" if where else "?"
            reasons[key] = reasons.get(key, 0) + 1
            at_checks += bool(where) and where.name in CHECKS
        rows.append({"case": "compiled DEQ forward", "method": label, "graph_breaks": ex.graph_break_count,
                     "graphs": ex.graph_count, "distinct_breaks": len(ex.break_reasons),
                     "distinct_at_checks": at_checks,
                     "break_sites": ", ".join(f"{k} ×{v}" for k, v in sorted(reasons.items()))})
    return rows


def compiled_vs_eager(tiny: bool, configs: dict, repeats: int) -> list[dict]:
    """Median wall time of a DEQ forward + backward, eager and ``torch.compile``-d."""
    rows = []
    for label, (solver, backward) in configs.items():
        deq, x = _deq_module(tiny, solver, backward)
        torch._dynamo.reset()
        compiled = torch.compile(deq)

        def step(mod, x=x):
            out = mod(x)
            out.square().sum().backward()
            return out.detach()

        ref = step(deq)
        t0 = time.perf_counter()
        out = step(compiled)  # compilation
        t_compile = time.perf_counter() - t0
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for name, mod in (("eager", deq), ("compiled", compiled)):
                t0 = time.perf_counter()
                step(mod)
                times[name].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append({
            "case": "DEQ forward + backward", "method": label,
            "eager_ms": 1e3 * med["eager"], "compiled_ms": 1e3 * med["compiled"],
            "compiled_over_eager": med["compiled"] / med["eager"],
            "first_call_s": t_compile,
            "max_abs_diff": float((out - ref).abs().max()),
        })
    return rows


def _deq_configs():
    S, L = il.solvers, il.linear
    return {
        "Picard + Neumann": (S.Picard(max_steps=200), L.Neumann(200)),
        "Anderson + GMRES": (S.Anderson(max_steps=100), L.GMRES()),
        "Anderson + GMRES, check_every=8": (
            S.Anderson(max_steps=100, check_every=8), L.GMRES(check_every=8)
        ),
    }


def run_ops_per_iteration(cfg: Config) -> Section:
    """The section for :mod:`benchmarks.run`."""
    from benchmarks._whole_call import whole_call_rows

    sec = Section("ops_per_iteration", "Ops and host synchronisations per iteration")
    for row in count_ops(cfg.tiny, k=8 if cfg.tiny else 16):
        sec.add(**row)
    for row in sec.rows:
        if row.get("target") is not None and row["check_every"] == 8:
            sec.target(f"{row['method']} ops per iteration", f"<= {row['target']}",
                       row["ops_per_iter"], bool(row["met"]),
                       f"check_every=8; {row['syncs_per_iter']} syncs per iteration")
    targeted = [r for r in sec.rows if r.get("check_every") == 8 and r["method"] in TARGETS]
    syncs8 = max((r["syncs_per_iter"] for r in targeted), default=0.0)
    sec.target("host syncs per iteration of the loops above, check_every=8", "<= 1/8", syncs8,
               syncs8 <= 0.125 + 1e-9, "one per check, none between checks")
    for row in whole_call_rows(cfg.tiny):
        sec.add(**row)
        if row["method"].startswith("il.fixed_point"):
            label = row["method"].split(": ", 1)[1]
            sec.target(f"ops per whole call (forward + backward), {label}", f"<= {row['target']}",
                       row["ops_call"], bool(row["met"]),
                       f"{row['ops_fwd']} forward + {row['ops_bwd']} backward; {row['syncs_call']} syncs")
    sec.notes.append(
        "Whole call: one il.fixed_point (or il.nn.DEQ) forward and backward of the easy DEQ "
        "(float32), counting every op outside the map evaluations and their VJPs."
    )
    sec.notes.append(
        "Broyden (forward) synchronises twice per check (the check and its restart test, both "
        "at the check step); Broyden (linear) also at its round boundaries."
    )
    if cfg.tiny:
        # Compiling takes tens of seconds: not in the quick run.
        sec.skipped.append("torch.compile rows skipped in --tiny mode")
        return sec
    why = compile_available()
    if why is not None:
        sec.skipped.append(f"torch.compile rows skipped: torch.compile is unavailable ({why})")
        return sec
    configs = _deq_configs()
    for row in graph_breaks(cfg.tiny, configs):
        sec.add(**row)
    for row in compiled_vs_eager(cfg.tiny, configs, cfg.repeats):
        sec.add(**row)
    sec.notes.append(
        "ops_per_iter excludes the ops of the map, its VJP and the operator product; "
        "syncs_per_iter counts aten._local_scalar_dense (host synchronisations). "
        "Timings of compiled vs eager are wall-clock medians."
    )
    return sec


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import to_markdown

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small sizes (seconds)")
    add_output_arguments(p)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (compiled vs eager)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (default) also pins the process to one core")
    a = p.parse_args(argv)
    cfg = Config(tiny=a.tiny, threads=a.threads or None)
    if a.repeats:
        cfg.repeats = a.repeats
    prev = set_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        sec = run_ops_per_iteration(cfg)
    finally:
        restore_threads(prev)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": "cpu", "cpu_count": __import__("os").cpu_count(),
            "python": sys.version.split()[0], "versions": {"torch": torch.__version__},
            "device": "cpu", "tiny": cfg.tiny, "repeats": cfg.repeats, "warmup": 1,
            "threads": cfg.threads, "timing": "op counts; wall-clock medians for compile rows",
            "total_seconds": time.perf_counter() - t0,
            "command": "python -m benchmarks.ops_per_iteration" + (" --tiny" if cfg.tiny else ""),
        },
        "sections": [sec.to_dict()],
    }
    out = output_dir(a)
    stem = "ops_per_iteration_tiny" if cfg.tiny else "ops_per_iteration"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
