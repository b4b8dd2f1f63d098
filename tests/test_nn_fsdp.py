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

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import implicit_layers as il

F64 = torch.float64
WORLD = 2
WRAPS = ("root", "deq", "map", "argmin")

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch without FSDP2
    fully_shard = None


class Cell(torch.nn.Module):
    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(0.3 * torch.randn(d, d) / d**0.5)
        self.U = torch.nn.Linear(p, d)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.U(x))


class Quadratic(torch.nn.Module):
    def __init__(self, n: int, p: int) -> None:
        super().__init__()
        self.L = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.P = torch.nn.Parameter(torch.randn(n, p))

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        Q = self.L @ self.L.T + 0.5 * torch.eye(self.L.shape[0], dtype=w.dtype)
        return 0.5 * ((w @ Q) * w).sum(-1) - (w * (x @ self.P.T)).sum(-1)


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


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=F64, generator=gen), torch.randn(8, 1, dtype=F64, generator=gen)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).sum(-1).mean()


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
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
            shard = slice(rank * 4, (rank + 1) * 4)  # equal shards: mean of shard means = mean
            for _ in range(2):  # a second iteration: FSDP2's state must be ready for it
                model.zero_grad()
                loss_fn(model, x[shard], y[shard]).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            torch.save(grads, os.path.join(out_dir, f"{wrap}{rank}.pt"))
            del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32" or fully_shard is None,
                    reason="needs torch.distributed with gloo and FSDP2 (fully_shard)")
def test_fsdp2_gradients_equal_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for wrap in WRAPS:
        model = build(wrap)
        x, y = data()
        loss_fn(model, x, y).backward()
        for rank in range(WORLD):
            grads = torch.load(tmp_path / f"{wrap}{rank}.pt")
            assert set(grads) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                assert p.grad.abs().sum() > 0
                assert torch.allclose(grads[name], p.grad, rtol=1e-7, atol=1e-12), (wrap, name)
