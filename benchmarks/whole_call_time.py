"""Thread CPU time of one whole call of the easy DEQ (forward + backward), this checkout
against another, interleaved in one process.

The ops counts of ``benchmarks/_whole_call.py`` say what a call dispatches; this says what it
costs on the CPU. Each configuration of ``call_configs`` (Picard + Neumann, the default,
Anderson + GMRES) is called in turn with the other checkout's, ``--repeats`` times, and the
median thread CPU time of each is printed with the ratio::

    python -m benchmarks.whole_call_time --baseline ../other-checkout
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import implicit_layers as il

from ._whole_call import _easy
from .qp import load_baseline


def _configs(lib: Any) -> dict[str, tuple[Any, Any]]:
    S, L = lib.solvers, lib.linear
    return {
        "Picard + Neumann": (S.Picard(max_steps=200), L.Neumann(200)),
        "default": (None, None),
        "Anderson + GMRES": (S.Anderson(max_steps=100), L.GMRES()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout's root")
    parser.add_argument("--repeats", type=int, default=61)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    libs = {"this checkout": il, "baseline": load_baseline(args.baseline)}
    d = {k: v.float() for k, v in _easy(False).items()}
    W, U, b = (torch.nn.Parameter(d[k].clone()) for k in ("W", "U", "b"))
    x = d["x"].clone().requires_grad_(True)

    def cell(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ U.T + b)

    def runner(lib: Any, solver: Any, backward: Any) -> Any:
        def run() -> None:
            z0 = torch.zeros(x.shape[0], W.shape[0])
            z = lib.fixed_point(cell, z0, x, solver=solver, backward=backward, batched=True)
            torch.autograd.grad(z.sum(), (x, W, U, b))
        return run

    for label in _configs(il):
        runs = {name: runner(lib, *_configs(lib)[label]) for name, lib in libs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():  # warm-up: lazy set-up, caches
            run(), run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.thread_time()
                run()
                times[name].append(time.thread_time() - start)
        med = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        print(f"{label}: this checkout {med['this checkout']:.2f} ms, baseline {med['baseline']:.2f} ms, "
              f"ratio {med['this checkout'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
