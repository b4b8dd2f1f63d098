"""Bytes saved for backward by one DEQ training step, against the number of forward iterations.

Deterministic (no timing): autograd's saved tensors are counted with
``torch.autograd.graph.saved_tensors_hooks`` (distinct storages), for every backward mode, with
the forward solver forced to run exactly ``k`` Picard iterations (``rtol=0``). Writes a table
to stdout and, with ``--plot``, a PNG.

Usage::

    python examples/deq_memory.py --plot docs/img/deq_saved_bytes.png
"""

from __future__ import annotations

import argparse

import torch

import implicit_layers as il

MODES = {
    "implicit (GMRES)": lambda: il.backward.Implicit(il.linear.GMRES(on_failure="ignore")),
    "phantom (5 steps)": lambda: il.backward.Phantom(steps=5),
    "jacobian-free": lambda: il.backward.JacobianFree(),
    "unrolled": lambda: il.backward.Unrolled(),
}


class Cell(torch.nn.Module):
    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.W = torch.nn.Linear(d, d, bias=False)
        self.U = torch.nn.Linear(p, d)
        with torch.no_grad():
            self.W.weight.mul_(0.9 / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


def saved_bytes(backward: il.backward.BackwardMode, steps: int, batch: int, hidden: int) -> int:
    torch.manual_seed(0)
    solver = il.solvers.Picard(max_steps=steps, rtol=0.0, on_failure="ignore")
    deq = il.nn.DEQ(Cell(hidden, 64), state_shape=hidden, solver=solver, backward=backward)
    x = torch.randn(batch, 64)
    with il.memory.SavedTensorBytes() as saved:
        z, info = deq(x, return_info=True)
    assert int(info.steps.min()) == steps
    z.pow(2).sum().backward()
    return saved.total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--plot", type=str, default=None, help="write a PNG here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = {name: [saved_bytes(make(), k, args.batch, args.hidden) for k in args.steps]
             for name, make in MODES.items()}
    print(f"KiB saved for backward (batch {args.batch}, hidden {args.hidden}, float32)")
    print(f"{'forward steps':>20}" + "".join(f"{k:>9}" for k in args.steps))
    for name, row in table.items():
        print(f"{name:>20}" + "".join(f"{b / 1024:9.0f}" for b in row))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, row in table.items():
            ax.plot(args.steps, [b / 2**20 for b in row], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("forward iterations")
        ax.set_ylabel("MiB saved for backward")
        ax.set_title(f"DEQ training step, batch {args.batch}, hidden {args.hidden}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return table


if __name__ == "__main__":
    main()
