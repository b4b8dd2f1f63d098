"""Run the benchmark suite and write ``results.json`` and ``results.md``.

Usage::

    python -m benchmarks.run [--tiny] [--out DIR] [--device cpu|cuda] [--only NAME ...]

Peers (torchopt, torchdeq, jax + jaxopt, optimistix, qpth, proxsuite) are optional: a missing one
is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks._common import (  # noqa: E402
    Config,
    Section,
    add_output_arguments,
    output_dir,
    restore_threads,
    set_threads,
)

PROBLEMS = (
    "ridge", "deq", "memory", "linsolve", "batched", "imaml", "higher_order", "ops_per_iteration",
    "compile", "compiled_solve", "composite", "qp",
)


def _runner(name: str):
    from benchmarks import (
        batched,
        compile,
        compiled_solve,
        composite,
        deq,
        higher_order,
        imaml,
        linsolve,
        memory,
        ops_per_iteration,
        qp,
        ridge,
    )

    return {
        "ridge": ridge.run_ridge,
        "deq": deq.run_deq,
        "memory": memory.run_memory,
        "linsolve": linsolve.run_linsolve,
        "batched": batched.run_batched,
        "imaml": imaml.run_imaml,
        "higher_order": higher_order.run_higher_order,
        "ops_per_iteration": ops_per_iteration.run_ops_per_iteration,
        "compile": compile.run_compile,
        "compiled_solve": compiled_solve.run_compiled_solve,
        "composite": composite.run_composite,
        "qp": qp.run_qp,
    }[name]


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "numpy", "scipy", "torchopt", "torchdeq", "jax", "jaxlib", "jaxopt", "optimistix",
                "qpth", "proxsuite"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(cfg: Config, only: tuple[str, ...] = PROBLEMS) -> dict:
    """Run the selected problems and return the results dictionary."""
    sections: list[Section] = []
    t0 = time.perf_counter()
    prev = set_threads(cfg.threads)
    try:
        with warnings.catch_warnings():
            # peers' deprecation chatter; our own ConvergenceWarnings stay visible
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torchdeq")
            for name in only:
                t1 = time.perf_counter()
                print(f"[benchmarks] {name} ...", flush=True)
                sec = _runner(name)(cfg)
                sec.notes.append(f"section wall time {time.perf_counter() - t1:.1f} s")
                sections.append(sec)
    finally:
        restore_threads(prev)
    return {"meta": run_meta(cfg, t0, "benchmarks.run"),
            "sections": [s.to_dict() for s in sections]}


def run_meta(cfg: Config, t0: float, module: str) -> dict:
    """The ``meta`` block of a results file: when, where, with what, and the command."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "versions": _versions(),
        "device": cfg.device,
        "tiny": cfg.tiny,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "threads": cfg.threads,
        "timing": "median process CPU time, one pinned core" if cfg.device == "cpu"
        else "median wall time with device synchronisation",
        "total_seconds": time.perf_counter() - t0,
        "command": f"python -m {module}" + (" --tiny" if cfg.tiny else "")
        + ("" if cfg.device == "cpu" else f" --device {cfg.device}"),
    }


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-2:
            return f"{v:.1e}"
        return f"{v:.3g}"
    return str(v)


def to_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"- date: {m['date']}; machine: {m['machine']}, {m['cpu_count']} CPUs; device: {m['device']}",
        f"- timing: {m['timing']}; repeats {m['repeats']} after {m['warmup']} warm-up rounds",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- reproduce: `{m['command']}`",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met | detail |",
        "|---|---|---|---|---|",
    ]
    for s in results["sections"]:
        for t in s["targets"]:
            lines.append(f"| {t['name']} | {t['goal']} | {_fmt(t['measured'])} | "
                         f"{'yes' if t['met'] else 'NO'} | {t['detail']} |")
    for s in results["sections"]:
        lines += ["", f"## {s['title']}", ""]
        cols: list[str] = []
        for r in s["rows"]:
            cols += [k for k in r if k not in cols]
        if s["rows"]:
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in s["rows"]:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        for n in s["notes"]:
            lines.append(f"\n- {n}")
        for n in s["skipped"]:
            lines.append(f"\n- {n}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small sizes, few repeats (seconds)")
    add_output_arguments(p)
    p.add_argument("--device", default="cpu", help="torch device for our and torch peers' runs")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (default) also pins the process to one core; 0 leaves them")
    p.add_argument("--only", nargs="*", choices=PROBLEMS, default=list(PROBLEMS))
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    cfg = Config(tiny=a.tiny, device=a.device, threads=a.threads or None)
    if a.repeats:
        cfg.repeats = a.repeats
    results = run(cfg, tuple(a.only))
    out = output_dir(a)
    stem = "results_tiny" if a.tiny else "results"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    print(f"[benchmarks] wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return results


if __name__ == "__main__":
    main()
