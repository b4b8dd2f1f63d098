"""DEQ and ArgminLayer sharded by FSDP2 (``fully_shard``): 2 CPU processes, gloo, localhost.

FSDP2 all-gathers a module's parameters before its forward and again before its backward, and
reduce-scatters the gradients afterwards. The implicit backward differentiates one more
evaluation of ``f`` at the detached equilibrium; this test checks that the sharded gradients,
gathered, equal the single-process gradients on the union of the shards. The documentation's
distributed-training guide relies on it.
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import implicit_layers as il

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 has FSDP2 only under torch.distributed._composable
    fully_shard = None

F64 = torch.float64
WORLD = 2
KINDS = ("deq", "argmin")


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


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "deq":
        return torch.nn.Sequential(il.nn.DEQ(Cell(6, 3), state_shape=6), torch.nn.Linear(6, 2)).to(F64)
    return il.nn.ArgminLayer(Quadratic(4, 3), w_shape=4, lower=-0.3, upper=0.3).to(F64)


def shard(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    if kind == "deq":
        fully_shard(model[0])  # the DEQ is its own FSDP unit, as a block of a larger model would be
    fully_shard(model)
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=F64, generator=gen), torch.randn(8, 1, dtype=F64, generator=gen)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # out + 0 turns FSDP's view output into a fresh tensor (FSDP2 warns about views).
    return ((model(x) + 0) - y).pow(2).sum(-1).mean()


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for kind in KINDS:
            model = shard(kind, build(kind))
            x, y = data()
            rows = slice(rank * 4, (rank + 1) * 4)  # equal shards: mean of shard means = mean
            for _ in range(2):  # a second iteration re-gathers and re-shards
                model.zero_grad()
                loss_fn(model, x[rows], y[rows]).backward()
            grads = {n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}
            torch.save(grads, os.path.join(out_dir, f"{kind}{rank}.pt"))
            del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.skipif(fully_shard is None or not dist.is_available() or sys.platform == "win32",
                    reason="needs torch.distributed.fsdp.fully_shard with gloo")
def test_fsdp2_gradients_equal_single_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for kind in KINDS:
        model = build(kind)
        x, y = data()
        loss_fn(model, x, y).backward()
        for rank in range(WORLD):
            grads = torch.load(tmp_path / f"{kind}{rank}.pt")
            assert set(grads) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                assert p.grad.abs().sum() > 0
                assert torch.allclose(grads[name], p.grad, rtol=1e-7, atol=1e-12), (kind, name)
