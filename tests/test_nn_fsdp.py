"""Models containing ``il.nn.DEQ`` or ``il.nn.ArgminLayer`` under FSDP2 (``fully_shard``): 2 CPU
processes, gloo.

FSDP2 shards every parameter across the ranks and gathers them around the forward and the
backward of each module it wraps. The DEQ's forward solve calls ``f`` many times without a
graph, and its implicit backward runs vector-Jacobian products (``torch.autograd.grad`` with
respect to the equilibrium only) inside a custom ``autograd.Function.backward``. The parameter
gradients still arrive once, as outputs of that function, and FSDP2 reduce-scatters them as for
any module. The test checks that the gathered gradients of every rank equal the single-process
gradients on the union of the shards, with FSDP2 units at three levels (the whole model, the
DEQ module, and the DEQ's map ``f``), and for a box-constrained ``ArgminLayer``.

Each unit's forward gathers its parameters (a collective every rank must join equally often),
and the solver calls ``f`` a data-dependent number of times per rank. ``f`` as its own unit
therefore needs ``reshard_after_forward=False``; with the default (reshard after each call)
the ranks' gathers do not pair up and the job hangs in a collective.
"""

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import implicit_layers as il
from tests.distributed import (
    F64,
    WORLD,
    Cell,
    Quadratic,
    assert_rank_gradients_equal_single_process,
    data,
    free_port,
    init_group,
    loss_fn,
    rank_rows,
)

WRAPS = ("root", "deq", "map", "argmin")

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch without FSDP2
    fully_shard = None


def build(wrap: str = "root") -> torch.nn.Module:
    torch.manual_seed(0)
    if wrap == "argmin":
        layer = il.nn.ArgminLayer(Quadratic(4, 3), w_shape=4, lower=-0.3, upper=0.3)
        return torch.nn.Sequential(layer, torch.nn.Linear(4, 2)).to(F64)
    # f as its own unit: every vector-Jacobian product of the backward gathers f's parameters,
    # so every rank must run the same number of them: a fixed-length Neumann series (the
    # map contracts by ~0.3: 60 terms are exact to rounding) instead of a solve that stops
    # when each rank's own samples converge.
    backward = il.linear.Neumann(60, rtol=0.0, on_failure="ignore") if wrap == "map" else None
    deq = il.nn.DEQ(Cell(6, 3), state_shape=6, backward=backward)
    return torch.nn.Sequential(deq, torch.nn.Linear(6, 2)).to(F64)


def worker(rank: int, port: int, out_dir: str) -> None:
    init_group(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for wrap in WRAPS:
            model = build(wrap)
            if wrap in ("deq", "argmin"):
                fully_shard(model[0], mesh=mesh)
            elif wrap == "map":
                # f as its own unit: its parameters must stay gathered for the whole forward,
                # since every rank calls f a different, data-dependent number of times.
                fully_shard(model[0].f, mesh=mesh, reshard_after_forward=False)
            fully_shard(model, mesh=mesh)
            x, y = data()
            shard = rank_rows(rank)
            for _ in range(2):  # a second iteration: FSDP2's state must be ready for it
                model.zero_grad()
                loss_fn(model, x[shard], y[shard]).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            torch.save(grads, f"{out_dir}/{wrap}{rank}.pt")
            del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32" or fully_shard is None,
                    reason="needs torch.distributed with gloo and FSDP2 (fully_shard)")
def test_fsdp2_gradients_equal_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert_rank_gradients_equal_single_process(tmp_path, build, WRAPS)
