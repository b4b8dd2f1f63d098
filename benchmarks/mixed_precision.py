"""Accuracy of implicit layers in reduced precision, against a float64 reference.

A DEQ ``z = tanh(W z + U x + b)`` (``‖W‖₂ = 0.5``, hidden 64, batch 32) and a ridge argmin layer
are run with default settings in float32, under ``torch.autocast`` (bfloat16 on the CPU; float16
and bfloat16 on CUDA), and as bfloat16 / float16 modules. The solver iterates in float32 in every
reduced-precision case and holds the solve to the tolerance of the map's precision (bfloat16:
1e-2, float16: 1e-3). Printed: the relative error of the solution and of the parameter gradient
against float64 on the same rounded parameters and data (so that they measure the solve, not
the rounding of the inputs), and whether every solve converged without a warning.

Run ``python -m benchmarks.mixed_precision [--device cuda]``.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import implicit_layers as il


class Cell(torch.nn.Module):
    def __init__(self, n: int = 64, d: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, n, generator=g)
        self.W = torch.nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(n, d, generator=g) / d**0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(n, generator=g))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def deq_case(dtype: torch.dtype | None, autocast: torch.dtype | None, device: str) -> dict:
    """Solution and ``∂ loss / ∂W`` errors of the DEQ against float64 (``dtype=None``: float32
    module; ``autocast``: the autocast dtype, else none)."""
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    # The reference holds the same (rounded) parameters and input: the figures measure the
    # solve in reduced precision, not the rounding of the data.
    rounded = dtype or torch.float32
    ref = il.nn.DEQ(Cell().to(rounded).double().to(device), state_shape=(64,))
    z_ref = ref(x.to(rounded).double().to(device))
    (g_ref,) = torch.autograd.grad(z_ref.square().sum(), ref.f.W)
    layer = il.nn.DEQ(Cell().to(device), state_shape=(64,))
    if dtype is not None:
        layer = layer.to(dtype)
    xin = x.to(device, dtype or torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", il.ConvergenceWarning)
        if autocast is not None:
            with torch.autocast(torch.device(device).type, dtype=autocast):
                z, info = layer(xin, return_info=True)
        else:
            z, info = layer(xin, return_info=True)
        (g,) = torch.autograd.grad(z.float().square().sum(), layer.f.W)
    return {
        "solution": _rel(z, z_ref),
        "gradient": _rel(g, g_ref),
        "converged": bool(info.converged.all()) and not caught,
        "output dtype": str(z.dtype).replace("torch.", ""),
    }


def argmin_case(dtype: torch.dtype, device: str) -> dict:
    """Ridge ``argmin_w ‖Xw - y‖² + λ‖w‖²`` and ``∂ Σw* / ∂λ`` in ``dtype`` against float64."""
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(50, 10, generator=g), torch.randn(50, generator=g)
    X, y = X.to(dtype).double(), y.to(dtype).double()  # the same rounded data for the reference

    def solve(dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        lam = torch.tensor(0.5, dtype=dt, device=device, requires_grad=True)
        Xd, yd = X.to(device, dt), y.to(device, dt)
        w = il.argmin(lambda w, lam: (Xd @ w - yd).square().sum() + lam * w.square().sum(),
                      torch.zeros(10, dtype=dt, device=device), lam)
        (d,) = torch.autograd.grad(w.float().sum(), lam)
        return w, d

    w_ref, d_ref = solve(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", il.ConvergenceWarning)
        w, d = solve(dtype)
    return {"solution": _rel(w, w_ref), "gradient": _rel(d, d_ref), "converged": not caught,
            "output dtype": str(w.dtype).replace("torch.", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = args.device
    cases = [
        ("DEQ float32", lambda: deq_case(None, None, dev)),
        ("DEQ autocast bfloat16", lambda: deq_case(None, torch.bfloat16, dev)),
        ("DEQ bfloat16 module", lambda: deq_case(torch.bfloat16, None, dev)),
        ("DEQ float16 module", lambda: deq_case(torch.float16, None, dev)),
        ("argmin float32", lambda: argmin_case(torch.float32, dev)),
        ("argmin bfloat16", lambda: argmin_case(torch.bfloat16, dev)),
        ("argmin float16", lambda: argmin_case(torch.float16, dev)),
    ]
    if torch.device(dev).type == "cuda":
        cases.insert(2, ("DEQ autocast float16", lambda: deq_case(None, torch.float16, dev)))
    print(f"device {dev}, torch {torch.__version__}; errors relative to float64")
    print("| case | solution error | gradient error | converged, no warning | output dtype |")
    print("|---|---:|---:|---|---|")
    for name, run in cases:
        r = run()
        print(f"| {name} | {r['solution']:.1e} | {r['gradient']:.1e} | {r['converged']} | "
              f"{r['output dtype']} |")


if __name__ == "__main__":
    main()
