"""CUDA graphs: an implicit DEQ forward + backward replayed as CUDA graphs, against eager
execution and against autograd through the same number of map evaluations.

Usage::

    python -m benchmarks.cuda_graphs [--hidden 1024] [--batch 64] [--repeats 7] [--out DIR]

The tanh DEQ ``z = tanh(W z + U x + b)`` of :mod:`benchmarks.deq` ("easy" data, float32 on
CUDA, hidden n = 1024, batch B = 64, loss ``Σ (z* - t)² / B``, gradients with respect to
``W`` and ``x``), three ways:

* **implicit, eager**: ``il.fixed_point`` with the default solver (``Adaptive``: plain
  iteration, and the Neumann backward it picks), at the float32 default tolerance;
* **implicit, CUDA graphs**: the same with ``Adaptive(cuda_graph=True)`` (the backward it
  picks inherits the setting); the graphs are captured anew in every call, so their capture
  is part of the time;
* **autograd through K map evaluations**: ``K`` plain steps from zero, recorded by autograd,
  ``K`` the number of map evaluations of the implicit forward (its steps plus one).

Every method runs forward and backward on one side CUDA stream, but a fourth row: the graphed
layer on the default stream, where only the forward is replayed (the adjoint solve runs
eagerly there, see ``docs/guides/deq.md``, "CUDA graphs"). Times are medians of
wall time between device synchronisations, the methods alternating round by round.
Gradient errors are relative to the dense float64 implicit gradient at the float64 fixed
point. Without CUDA the benchmark says so and exits 0. Results go to ``out/`` (or ``--out``),
never over tracked files unless that path is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/cuda_graphs.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import implicit_layers as il  # noqa: E402
from benchmarks._common import LAST_FAILED, Config, Section, rel_err, time_alternating  # noqa: E402
from benchmarks.deq import f_inj, make_deq, reference  # noqa: E402

#: Target: implicit forward + backward with CUDA graphs / autograd through K map evaluations.
TARGET = 1.5


def run_cuda_graphs(cfg: Config, hidden: int = 1024, batch: int = 64) -> Section:
    """Time the three methods and compare the graphed results with the eager ones."""
    sec = Section(
        "cuda_graphs",
        f"CUDA graphs: implicit DEQ forward + backward (n={hidden}, B={batch}, float32)",
    )
    dev = torch.device(cfg.device)
    data = make_deq("easy", hidden=hidden, batch=batch)
    T64 = {k: torch.as_tensor(v, dtype=torch.float64, device=dev) for k, v in data.items()}
    dW_ref, dx_ref, _ = reference(T64)
    T = {k: v.float() for k, v in T64.items()}
    # (on the CPU, for the test suite's smoke run, every method runs where it is called)
    stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None

    def implicit(solver: il.solvers.ForwardSolver, side: bool = True):
        def run():
            W = T["W"].clone().requires_grad_(True)
            x = T["x"].clone().requires_grad_(True)
            inj = x @ T["U"].T + T["b"]
            z, info = il.fixed_point(f_inj, torch.zeros_like(T["t"]), inj, W, solver=solver,
                                     batched=True, return_info=True)
            loss = ((z - T["t"]) ** 2).sum() / batch
            with warnings.catch_warnings():
                # on the default stream the adjoint solve runs eagerly (warned once): known
                warnings.filterwarnings("ignore", "Neumann", RuntimeWarning)
                warnings.filterwarnings("ignore", "GMRES", RuntimeWarning)
                dW, dx = torch.autograd.grad(loss, (W, x))
            return z.detach(), dW, dx, info

        return on_stream(run) if side else run

    def on_stream(fn):
        if stream is None:
            return fn

        def wrapped():
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                out = fn()
            torch.cuda.current_stream(dev).wait_stream(stream)
            return out

        return wrapped

    eager_fn = implicit(il.solvers.Adaptive())
    graph_fn = implicit(il.solvers.Adaptive(cuda_graph=True))
    _, _, _, info = eager_fn()
    K = int(info.steps.max()) + 1

    def unrolled():
        W = T["W"].clone().requires_grad_(True)
        x = T["x"].clone().requires_grad_(True)
        inj = x @ T["U"].T + T["b"]
        z = torch.zeros_like(T["t"])
        for _ in range(K):
            z = f_inj(z, inj, W)
        loss = ((z - T["t"]) ** 2).sum() / batch
        dW, dx = torch.autograd.grad(loss, (W, x))
        return z.detach(), dW, dx, None

    methods = {
        "implicit, eager": eager_fn,
        "implicit, CUDA graphs": graph_fn,
        "implicit, CUDA graphs, default stream (forward only)": implicit(
            il.solvers.Adaptive(cuda_graph=True), side=False
        ),
        f"autograd through K={K} map evaluations": on_stream(unrolled),
    }
    times, results = time_alternating(methods, cfg)
    for name, why in LAST_FAILED.items():
        sec.notes.append(f"{name} failed: {why}")
    if len(times) < len(methods):
        sec.target("every method ran", "all", len(times), False, "; ".join(sec.notes))
        return sec
    base = times[f"autograd through K={K} map evaluations"]
    eager = results["implicit, eager"]
    for name, t in times.items():
        z, dW, dx, inf = results[name]
        diff = max(float((a - b).abs().max()) for a, b in zip((z, dW, dx), eager[:3], strict=True))
        sec.add(
            method=name, time_ms=1e3 * t, ratio_vs_autograd=t / base,
            forward_steps=None if inf is None else int(inf.steps.max()),
            backward_steps=None if inf is None or inf.backward is None
            else int(inf.backward.steps.max()),
            grad_W_rel_err=rel_err(dW, dW_ref), grad_x_rel_err=rel_err(dx, dx_ref),
            max_abs_diff_vs_eager=diff,
        )
    graphed = results["implicit, CUDA graphs"]
    ratio = times["implicit, CUDA graphs"] / base
    sec.target(
        "implicit DEQ fwd+bwd with CUDA graphs / autograd through K map evaluations",
        f"<= {TARGET}", ratio, ratio <= TARGET,
        f"eager implicit / autograd {times['implicit, eager'] / base:.2f}; K={K}",
    )
    diff = max(float((a - b).abs().max()) for a, b in zip(graphed[:3], eager[:3], strict=True))
    steps_equal = bool(torch.equal(graphed[3].steps, eager[3].steps))
    sec.target(
        "CUDA graphs vs eager: max abs difference of z*, dW, dx (float32 rounding)",
        "<= 1e-4, equal steps", diff, diff <= 1e-4 and steps_equal,
        f"forward steps equal: {steps_equal}",
    )
    sec.notes.append(
        "Forward and backward of every method run on one side CUDA stream (but the "
        "default-stream row); the graphed solves capture their graphs in each call (capture "
        "time included)."
    )
    return sec


def main(argv: list[str] | None = None) -> dict | None:
    from benchmarks.run import to_markdown

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size n (default 1024)")
    p.add_argument("--batch", type=int, default=64, help="batch size B (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    p.add_argument("--out", default="out", help="output directory (default out/)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("[benchmarks.cuda_graphs] CUDA is absent: nothing to measure (exit 0).")
        return None
    cfg = Config(device="cuda", threads=None)
    if a.repeats:
        cfg.repeats = a.repeats
    t0 = time.perf_counter()
    sec = run_cuda_graphs(cfg, a.hidden, a.batch)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": torch.cuda.get_device_name(), "cpu_count": __import__("os").cpu_count(),
            "python": sys.version.split()[0], "versions": {"torch": torch.__version__},
            "device": "cuda", "tiny": False, "repeats": cfg.repeats, "warmup": cfg.warmup,
            "threads": None, "timing": "median wall time with device synchronisation",
            "total_seconds": time.perf_counter() - t0,
            "command": "python -m benchmarks.cuda_graphs",
        },
        "sections": [sec.to_dict()],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_graphs.json").write_text(json.dumps(results, indent=1))
    (out / "cuda_graphs.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
