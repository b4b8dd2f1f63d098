"""DEQ and ArgminLayer inside DistributedDataParallel: 2 CPU processes, gloo, localhost.

The implicit backward computes vector-Jacobian products with ``torch.autograd.grad`` inside a
custom ``autograd.Function.backward``. Those calls differentiate only with respect to the
equilibrium, so they never touch the parameters' ``.grad`` nor fire DDP's gradient hooks; the
parameter gradients arrive once, as the outputs of the layer's ``autograd.Function``.
DDP therefore works with its default settings (no ``find_unused_parameters``, no
``static_graph``), which this test checks.
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


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "deq":
        return torch.nn.Sequential(
            il.nn.DEQ(Cell(6, 3), state_shape=6), torch.nn.Linear(6, 2)
        ).to(F64)
    return il.nn.ArgminLayer(Quadratic(4, 3), w_shape=4, lower=-0.3, upper=0.3).to(F64)


KINDS = ("deq", "argmin")


def worker(rank: int, port: int, out_dir: str) -> None:
    init_group(rank, port)
    try:
        for kind in KINDS:  # one process group for both layers: spawning is the slow part
            model = torch.nn.parallel.DistributedDataParallel(build(kind))
            x, y = data()
            shard = rank_rows(rank)
            for _ in range(2):  # twice: DDP's reducer must also be ready for a second iteration
                model.zero_grad()
                loss_fn(model, x[shard], y[shard]).backward()
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            torch.save(grads, f"{out_dir}/{kind}{rank}.pt")
            del model  # release DDP's reducer before the process group goes away
        # Tearing gloo down while the peer is still exiting aborted a rank now and then.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                    reason="needs torch.distributed with gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert_rank_gradients_equal_single_process(tmp_path, build, KINDS)
