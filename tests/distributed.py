"""What the 2-process DDP and FSDP2 tests share: the layers' models, the data, the loss, the
process group on localhost (gloo) and the comparison with the single-process gradients."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

F64 = torch.float64
WORLD = 2


class Cell(torch.nn.Module):
    """``f(z, x) = tanh(W z + U x)`` with a contractive ``W``."""

    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(0.3 * torch.randn(d, d) / d**0.5)
        self.U = torch.nn.Linear(p, d)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.U(x))


class Quadratic(torch.nn.Module):
    """``L(w, x) = ½ wᵀ Q w - wᵀ P x`` with ``Q = L Lᵀ + I/2`` (strictly convex in ``w``)."""

    def __init__(self, n: int, p: int) -> None:
        super().__init__()
        self.L = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.P = torch.nn.Parameter(torch.randn(n, p))

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        Q = self.L @ self.L.T + 0.5 * torch.eye(self.L.shape[0], dtype=w.dtype)
        return 0.5 * ((w @ Q) * w).sum(-1) - (w * (x @ self.P.T)).sum(-1)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=F64, generator=gen), torch.randn(8, 1, dtype=F64, generator=gen)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).sum(-1).mean()


def rank_rows(rank: int) -> slice:
    """This rank's equal share of the 8 samples (so the mean of shard means is the mean)."""
    return slice(rank * 4, (rank + 1) * 4)


def init_group(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_rank_gradients_equal_single_process(
    out_dir: Path, build: Callable[[str], torch.nn.Module], kinds: tuple[str, ...]
) -> None:
    """Every rank's saved gradients ``{kind}{rank}.pt`` equal those of one process on all data."""
    for kind in kinds:
        model = build(kind)
        x, y = data()
        loss_fn(model, x, y).backward()
        for rank in range(WORLD):
            grads = torch.load(out_dir / f"{kind}{rank}.pt")
            assert set(grads) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                assert p.grad.abs().sum() > 0
                assert torch.allclose(grads[name], p.grad, rtol=1e-7, atol=1e-12), (kind, name)
