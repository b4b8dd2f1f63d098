"""Shared helpers of the benchmark suite: alternating timings, peers, errors, results.

Every comparison runs all methods of one case in the same process, alternating them round
by round (so a burst of load from other processes hits every method alike), and reports the
median of the repeats. Errors are relative to a dense float64 reference computed once.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Config",
    "Section",
    "import_peer",
    "rel_err",
    "time_alternating",
    "time_bursts",
    "sync",
    "to_numpy",
]

#: Peer libraries: import name -> distribution name (for the "pip install" hint).
PEERS = {"torchopt": "torchopt", "torchdeq": "torchdeq", "jax": "jax jaxlib", "jaxopt": "jaxopt",
         "optimistix": "optimistix"}


@dataclass
class Config:
    """Run settings shared by every problem.

    Attributes:
        tiny: small sizes and few repeats (seconds), for the test suite.
        device: torch device the torch methods run on (JAX peers always run on the CPU).
        repeats: timed rounds per case (the median is reported).
        warmup: untimed rounds before timing (also triggers JAX compilation).
        threads: torch intra-op threads (1 also pins the process to one core; None leaves the
            settings alone); applied by :func:`benchmarks.run.main`.
    """

    tiny: bool = False
    device: str = "cpu"
    repeats: int = 7
    warmup: int = 3
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.tiny:
            self.repeats = min(self.repeats, 2)
            self.warmup = min(self.warmup, 1)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class Section:
    """The results of one benchmark problem: table rows, notes and skipped peers."""

    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append({k: _plain(v) for k, v in row.items()})

    def target(self, name: str, goal: str, measured: float, met: bool, detail: str = "") -> None:
        self.targets.append(
            {"name": name, "goal": goal, "measured": _plain(measured), "met": bool(met),
             "detail": detail}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "rows": self.rows,
            "notes": self.notes,
            "skipped": self.skipped,
            "targets": self.targets,
        }


#: The published results (tracked files), written only when asked (``--write-results``).
RESULTS = Path(__file__).resolve().parent / "results"
#: Where a run writes by default: a folder git ignores.
SCRATCH = Path(__file__).resolve().parents[1] / "out" / "benchmarks"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--write-results``: see :func:`output_dir`."""
    parser.add_argument("--out", default=None,
                        help="output directory (default out/benchmarks, ignored by git)")
    parser.add_argument("--write-results", action="store_true",
                        help="write into benchmarks/results, the tracked results the docs cite")


def output_dir(args: argparse.Namespace) -> Path:
    """``--out`` if given, ``benchmarks/results`` with ``--write-results`` (tracked files),
    else ``out/benchmarks`` (ignored): a run never overwrites the published results unless
    asked to."""
    if args.out is not None and args.write_results:
        raise SystemExit("give either --out or --write-results, not both")
    out = Path(args.out) if args.out is not None else RESULTS if args.write_results else SCRATCH
    out.mkdir(parents=True, exist_ok=True)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def set_threads(n: int | None) -> tuple[int, set[int] | None]:
    """Use ``n`` intra-op threads in torch; with ``n == 1`` also pin the process to one core.

    On a small machine shared with other jobs, thread pools that spin-wait for a busy sibling
    core (OpenMP in torch, the XLA runtime in JAX) make small kernels 10-1000x slower and the
    timings meaningless; one pinned core gives every library the same, quiet conditions.

    Returns:
        The previous ``(torch threads, CPU affinity)``, for :func:`restore_threads`.
    """
    prev_aff = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    prev = (torch.get_num_threads(), prev_aff)
    if n is None:
        return prev
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if n == 1 and prev_aff:
        os.sched_setaffinity(0, {min(prev_aff)})
    return prev


def restore_threads(prev: tuple[int, set[int] | None]) -> None:
    threads, aff = prev
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if aff:
        os.sched_setaffinity(0, aff)


def import_peer(name: str) -> Any:
    """Import a peer library, or raise ImportError naming the package to install."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # any import-time failure means the peer is unusable
        raise ImportError(
            f"{name} unavailable ({type(exc).__name__}: {exc}); "
            f"pip install {PEERS.get(name, name)} or pip install -e '.[bench]'"
        ) from exc
    if name == "jax":
        module.config.update("jax_enable_x64", True)
        module.config.update("jax_platforms", "cpu")
    return module


def peer_or_note(section: Section, *names: str) -> list[Any] | None:
    """Import the peers ``names``; on failure record a skip note and return None."""
    mods = []
    for n in names:
        try:
            mods.append(import_peer(n))
        except ImportError as exc:
            msg = f"skipped {'+'.join(names)}: {exc}"
            if msg not in section.skipped:
                section.skipped.append(msg)
            return None
    return mods


def sync(device: torch.device | str) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(x: Any, ref: Any) -> float:
    """``‖x - ref‖ / ‖ref‖`` over flattened arrays."""
    a, b = to_numpy(x).ravel(), to_numpy(ref).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def paired_times(
    methods: dict[str, Callable[[], Any]], a: str, b: str, cfg: Config, repeats: int | None = None
) -> tuple[float, float]:
    """Seconds of ``a`` and ``b`` re-timed as a pair, once in each order (the sum of the two
    medians each): in a round of many methods, the one that runs right after a long one was
    measured up to 15% slower for the same work, so a ratio of two close methods is taken from
    this re-timing rather than from the big round."""
    total = {a: 0.0, b: 0.0}
    for order in ((a, b), (b, a)):
        paired, _ = time_alternating({k: methods[k] for k in order}, cfg, repeats=repeats)
        for k in order:
            total[k] += paired.get(k, float("nan"))
    return total[a], total[b]


COMPILED = "ours (compiled solve)"
#: The same layer inside a function compiled as a whole by ``torch.compile`` (the counterpart
#: of ``jax.jit`` around a jaxopt layer): with ``CompiledImplicit`` it traces into the graph.
WHOLE = "ours (whole call compiled)"


def first_calls(
    methods: dict[str, Callable[[], Any]], names: tuple[str, ...] = (COMPILED,)
) -> dict[str, float]:
    """Wall seconds of the first call of each of ``names`` present in ``methods`` (for a
    compiled method: tracing and compiling included), made before any timing, so that the
    timed rounds measure the steady state and the compile cost is reported on its own."""
    out = {}
    for name in names:
        if name in methods:
            t0 = time.perf_counter()
            _block(methods[name]())
            out[name] = time.perf_counter() - t0
    return out


def time_alternating(
    methods: dict[str, Callable[[], Any]],
    cfg: Config,
    repeats: int | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Time each method, alternating them round by round.

    On the CPU the reported figure is the median *process CPU time* of a call (the process is
    pinned to one core, see :func:`set_threads`): on a machine shared with other jobs, wall
    time mostly measures how long the scheduler kept us waiting. The wall-clock medians are
    kept in :data:`LAST_WALL`. On CUDA the figure is wall time between synchronisations.

    Args:
        methods: name -> zero-argument callable doing the whole measured work (e.g. forward +
            backward) and returning its result (a gradient), which must be materialised.
        cfg: run settings (warm-up rounds, repeats, device to synchronise).
        repeats: override of ``cfg.repeats``.

    Returns:
        ``(median seconds per method, last result per method)``.
    """
    reps = cfg.repeats if repeats is None else repeats
    out: dict[str, Any] = {}
    LAST_FAILED.clear()
    for _ in range(max(cfg.warmup, 1)):
        for name, fn in list(methods.items()):
            try:
                out[name] = fn()
            except Exception as exc:  # a failing method is reported, not fatal to the suite
                LAST_FAILED[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                methods = {k: v for k, v in methods.items() if k != name}
    cpu_clock = torch.device(cfg.device).type == "cpu"
    times: dict[str, list[float]] = {name: [] for name in methods}
    walls: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            sync(cfg.device)
            t0, c0 = time.perf_counter(), time.process_time()
            res = fn()
            _block(res)
            sync(cfg.device)
            wall = time.perf_counter() - t0
            walls[name].append(wall)
            times[name].append(time.process_time() - c0 if cpu_clock else wall)
            out[name] = res
    LAST_WALL.clear()
    LAST_WALL.update({k: statistics.median(v) for k, v in walls.items()})
    return {k: statistics.median(v) for k, v in times.items()}, out


#: Wall-clock medians of the last :func:`time_alternating` call.
LAST_WALL: dict[str, float] = {}
#: Methods of the last :func:`time_alternating` call that raised: name -> error message.
LAST_FAILED: dict[str, str] = {}


#: Consecutive calls per timed burst in :func:`time_bursts`.
BURST = 10


def time_bursts(
    methods: dict[str, Callable[[], Any]], cfg: Config
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`time_alternating` over bursts of :data:`BURST` consecutive calls of each method
    (one call each with ``cfg.tiny``); the time per call.

    For steps of about a millisecond: timed one at a time right after another method's, a step
    also reads that method's cache traffic (20-40 % more for a compiled step), where a training
    loop runs its steps back to back.
    """
    burst = 1 if cfg.tiny else BURST

    def bursts(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            for _ in range(burst - 1):
                fn()
            return fn()

        return run

    times, out = time_alternating({name: bursts(fn) for name, fn in methods.items()}, cfg)
    return {name: t / burst for name, t in times.items()}, out


def add_failures(section: Section, case: str) -> None:
    """Record the methods that raised in the last timing as rows with an ``error`` field."""
    for name, msg in LAST_FAILED.items():
        section.add(case=case, method=name, time_ms=None, grad_rel_err=None, error=msg)


def _block(res: Any) -> None:
    """Wait for asynchronous (JAX) results."""
    if hasattr(res, "block_until_ready"):
        res.block_until_ready()
    elif isinstance(res, (tuple, list)):
        for r in res:
            _block(r)
