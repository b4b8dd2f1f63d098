"""Aten ops and host synchronisations of one whole implicit-layer call (forward + backward).

The easy tanh DEQ ``z = tanh(W z + U x + b)`` (float32) is solved by ``il.fixed_point`` and by
``il.nn.DEQ``, then differentiated once. Every aten op dispatched from the call's start to the
gradients' return is counted, except those of the map evaluations and of its VJPs: the map is an
``autograd.Function`` whose forward and backward pause the counter. What remains is the layer's
own cost: argument checks, capture of closed-over tensors, tolerances, the solver loops'
bookkeeping, the info, recording the linearisation and the backward set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import implicit_layers as il

from .ops_per_iteration import OpCounter, _count, _easy

#: Ops per whole call (forward + backward) beyond the map evaluations and VJPs: the targets, and
#: the same count on the code before the lean calls (full size; Picard + Neumann, default,
#: Anderson + GMRES), printed beside the new figures.
CALL_TARGETS = {"Picard + Neumann": 220, "default": 250, "Anderson + GMRES": 700}
CALL_BEFORE: dict[str, tuple[int, int, int]] = {
    # (forward, backward, total), the same for il.fixed_point and il.nn.DEQ
    "Picard + Neumann": (329, 190, 519),
    "default": (477, 192, 669),
    "Anderson + GMRES": (529, 866, 1395),
}


class _PausedCell(torch.autograd.Function):
    """``tanh(z Wᵀ + x Uᵀ + b)`` whose own ops (forward and VJP) the counter does not see."""

    counter: OpCounter | None = None

    @staticmethod
    def _paused(fn: Callable[..., Any], *args: Any) -> Any:
        c = _PausedCell.counter
        return fn(*args) if c is None else c.paused(fn)(*args)

    @staticmethod
    def forward(z, x, W, U, b):  # type: ignore[override]
        return _PausedCell._paused(lambda: torch.tanh(z @ W.T + x @ U.T + b))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        z, x, W, U, b = inputs
        ctx.save_for_backward(z, x, W, U, output)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, x, W, U, out = ctx.saved_tensors

        def vjp():
            gp = g * (1 - out * out)
            return gp @ W, gp @ U, gp.mT @ z, gp.mT @ x, gp.sum(0)

        return _PausedCell._paused(vjp)


class _Cell(torch.nn.Module):
    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(W)
        self.U = torch.nn.Parameter(U)
        self.b = torch.nn.Parameter(b)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _PausedCell.apply(z, x, self.W, self.U, self.b)


def call_configs() -> dict[str, tuple[Any, Any]]:
    S, L = il.solvers, il.linear
    return {
        "Picard + Neumann": (S.Picard(max_steps=200), L.Neumann(200)),
        "default": (None, None),
        "Anderson + GMRES": (S.Anderson(max_steps=100), L.GMRES()),
    }


def _runner(api: str, tiny: bool, solver: Any, backward: Any) -> Callable[[OpCounter], dict]:
    d = {k: v.float() for k, v in _easy(tiny).items()}
    cell = _Cell(d["W"].clone(), d["U"].clone(), d["b"].clone())
    x = d["x"].clone().requires_grad_(True)
    deq = il.nn.DEQ(cell, solver=solver, backward=backward, state_shape=(d["W"].shape[0],))
    leaves = (x, *cell.parameters())
    g = torch.ones(d["t"].shape)

    def run(counter: OpCounter) -> dict:
        _PausedCell.counter = counter
        try:
            z0 = counter.paused(torch.zeros_like)(g)  # the caller's initial guess
            start = (counter.ops, counter.syncs)
            if api == "il.fixed_point":
                z, info = il.fixed_point(cell, z0, x, solver=solver, backward=backward,
                                         batched=True, return_info=True)
            else:
                z, info = deq(x, return_info=True)
            mid = (counter.ops, counter.syncs)
            torch.autograd.grad(z, leaves, g)
            end = (counter.ops, counter.syncs)
        finally:
            _PausedCell.counter = None
        return {"fwd": mid[0] - start[0], "bwd": end[0] - mid[0], "syncs": end[1] - start[1],
                "info": info}

    return run


def count_call(api: str, tiny: bool, solver: Any, backward: Any) -> dict:
    """Ops forward, backward and syncs of one call, after a warm-up call (lazy set-up)."""
    run = _runner(api, tiny, solver, backward)
    run(OpCounter())
    result: dict = {}
    counter = _count(lambda c: result.update(run(c)))
    result["fwd_steps"] = int(result.pop("info").steps.max())  # read after counting
    result["names"] = dict(sorted(counter.names.items(), key=lambda t: -t[1]))
    return result


def whole_call_rows(tiny: bool) -> list[dict]:
    """Rows: API, configuration, ops forward / backward / total, syncs, target."""
    rows = []
    for api in ("il.fixed_point", "il.nn.DEQ"):
        for label, (solver, backward) in call_configs().items():
            r = count_call(api, tiny, solver, backward)
            total = r["fwd"] + r["bwd"]
            target = CALL_TARGETS[label]
            before = CALL_BEFORE.get(label) if not tiny else None
            top = ", ".join(f"{n} {v}" for n, v in list(r["names"].items())[:6])
            rows.append({
                "case": "whole call, easy DEQ", "method": f"{api}: {label}",
                "ops_before": None if before is None else f"{before[0]} + {before[1]} = {before[2]}",
                "ops_fwd": r["fwd"], "ops_bwd": r["bwd"], "ops_call": total,
                "syncs_call": r["syncs"], "fwd_steps": r["fwd_steps"],
                "target": target, "met": total <= target, "top_ops": top,
            })
    return rows


if __name__ == "__main__":
    import sys

    for row in whole_call_rows("--tiny" in sys.argv):
        print(row)
