"""The compiled solve: a DEQ training step whose forward and adjoint loops are ``while_loop``.

A small DEQ (tanh cell, float32, forward + backward of ``z*.square().mean()``) trained four
ways, timed alternately in one run:

* eager, default solver (``Adaptive`` + its adjoint);
* eager, ``Picard`` + ``Neumann`` (the same iteration as the compiled solve);
* ``compiled_solve=True`` run eagerly (the same steps as Python loops);
* ``compiled_solve=True`` under ``torch.compile(fullgraph=True)`` with inductor (and the
  "eager" backend: graph capture only).

Also reported: the wall time of the first compiled call (tracing and code generation), the
graph breaks of one compiled-solve call (``torch._dynamo.explain``), and the gradient error of
each method against eager Picard + Neumann.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import implicit_layers as il

from ._common import BURST, Config, Section, time_bursts
from .compile import _step


class _Cell(torch.nn.Module):
    """``tanh(W z + x)`` with ``‖W‖₂ = 0.5`` (a contraction: a dozen Picard steps in float32)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / float(torch.linalg.matrix_norm(self.lin.weight, 2)))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def _deq(cell: torch.nn.Module, compiled_solve: bool, default: bool = False) -> il.nn.DEQ:
    if default:
        return il.nn.DEQ(cell)
    return il.nn.DEQ(
        cell, solver=il.solvers.Picard(max_steps=100), backward=il.linear.Neumann(100),
        compiled_solve=compiled_solve,
    )


def _loss(layer) -> Callable[[torch.Tensor], torch.Tensor]:  # noqa: ANN001
    """The training loss through ``layer`` (a DEQ or its compiled form)."""
    return lambda x: layer(x).square().mean()


def run_compiled_solve(cfg: Config) -> Section:
    section = Section("compiled_solve", "Compiled solve: DEQ training step (float32, CPU)")
    section.notes.append(
        "A DEQ step (forward + backward) with Picard + Neumann: eager, with compiled_solve=True "
        "run eagerly, and compiled_solve=True under torch.compile(fullgraph=True); time_ms per "
        f"step, timed over bursts of {BURST} consecutive steps (methods alternated burst by burst); "
        "first_call_s is the wall time of the first compiled step (tracing + code generation); "
        "grad_rel_err against eager Picard + Neumann."
    )
    torch.manual_seed(0)
    n, B = (16, 4) if cfg.tiny else (64, 8)
    backends = ["eager"] if cfg.tiny else ["inductor", "eager"]
    cell = _Cell(n).to(cfg.device)
    x = torch.randn(B, n, device=cfg.device)
    compiled_layer = _deq(cell, compiled_solve=True)
    methods = {
        "eager Picard + Neumann": lambda: _step(cell, _loss(_deq(cell, False)), x),
        "eager default": lambda: _step(cell, _loss(_deq(cell, False, default=True)), x),
        "compiled_solve, run eagerly": lambda: _step(cell, _loss(compiled_layer), x),
    }
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(compiled_layer)(x).graph_break_count
    first_call: dict[str, float] = {}
    for backend in backends:
        torch._dynamo.reset()
        # A layer of its own per backend (on the same cell): two compiled wrappers of one module
        # share dynamo's cache entries for its code, and alternating them measured the inductor
        # step 20-40 % slower than alone.
        compiled = torch.compile(_deq(cell, compiled_solve=True), backend=backend, fullgraph=True)
        t0 = time.perf_counter()
        _step(cell, _loss(compiled), x)
        first_call[backend] = time.perf_counter() - t0
        methods[f"compiled_solve + torch.compile({backend}, fullgraph)"] = (
            lambda c=compiled: _step(cell, _loss(c), x)
        )
    times, grads = time_bursts(methods, cfg)
    reference = grads["eager Picard + Neumann"]
    base = times["eager Picard + Neumann"]
    for method, seconds in times.items():
        err = max(
            float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
            for g, e in zip(grads[method], reference, strict=True)
        )
        backend = next((b for b in backends if f"({b}," in method), None)
        section.add(
            case=f"DEQ tanh n={n} B={B}", method=method, time_ms=1e3 * seconds,
            ratio_to_eager_picard=seconds / base, ratio_to_eager_default=seconds / times["eager default"],
            grad_rel_err=err, first_call_s=first_call.get(backend) if backend else None,
            breaks=breaks,
        )
    section.target("compiled solve: graph breaks of one call", "0", breaks, breaks == 0)
    best = backends[0]
    ratio = times[f"compiled_solve + torch.compile({best}, fullgraph)"] / base
    section.target(
        f"compiled solve ({best}) step / eager Picard + Neumann step", "<= 0.35", ratio,
        ratio <= 0.35,
    )
    torch._dynamo.reset()
    return section
