"""Memory and time of the default adjoint solver against Dense and CG on batched argmin.

Usage::

    python -m benchmarks.default_backward            # the full grid (a minute or two)
    python -m benchmarks.default_backward --tiny     # two small shapes (seconds)

Each case is a batch of ``B`` independent quadratics ``½ wᵀ A_b w - c_bᵀ w`` with a per-sample
Hessian ``A_b`` (``n × n``, eigenvalues log-spaced in ``[1, 100]``); the hypergradient is taken
with respect to ``c``. Every (case, backward) pair runs in a fresh subprocess, so that its peak
resident memory (``ru_maxrss``, the whole process: Python, torch and the problem) is its own.
Printed: the backward's CPU time (median of ``--repeats`` passes) and the process's peak RSS
for ``il.linear.Dense()``, ``il.linear.CG()`` and the default (``backward=None``), and the
default's ratios to CG's, which the default must keep below about 2 wherever CG converges.

``Dense`` builds the Jacobian from ``n`` vectorised Hessian-vector products; with per-sample
data (``A_b``) the vectorised products hold ``n`` copies of the batch's data at once, hence its
memory ``~ B n³``. The default solver (``Problem.default_adjoint_solver``) is
chosen from these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

F64 = torch.float64
GRID = [(1, 32), (1, 64), (1, 128), (8, 64), (16, 32), (64, 32), (32, 64), (16, 128),
        (256, 128), (1000, 64)]
TINY_GRID = [(1, 32), (64, 32)]
METHODS = ("Dense", "CG", "default")


def _child(B: int, n: int, method: str, repeats: int) -> dict:
    import implicit_layers as il

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=F64))[0]
    eigs = torch.logspace(0, 2, n, dtype=F64)
    A = (Q * eigs) @ Q.mT
    c = torch.randn(B, n, generator=g, dtype=F64).requires_grad_(True)

    def fun(w, c):
        return 0.5 * (w.unsqueeze(1) @ A @ w.unsqueeze(-1)).reshape(B) - (c * w).sum(-1)

    backward = {"Dense": il.linear.Dense(), "CG": il.linear.CG(), "default": None}[method]
    solver = il.solvers.Newton(rtol=1e-10)
    w = il.argmin(fun, torch.zeros(B, n, dtype=F64), c, solver=solver, backward=backward,
                  batched=True)
    loss = (w**2).sum()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        (grad,) = torch.autograd.grad(loss, c, retain_graph=True)
        times.append(time.process_time() - t0)
    seconds = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Independent check: dL/dc = A⁻¹ (2 w*) per sample.
    ref = torch.linalg.solve(A, 2 * w.detach())
    err = float((grad - ref).norm() / ref.norm())
    from implicit_layers._problem import Problem

    chosen = Problem(
        "argmin", fun, (c,), torch.zeros(B, n, dtype=F64), batched=True, name="fun"
    ).default_adjoint_solver().name
    return {"seconds": seconds, "peak_mb": peak / 1024, "before_mb": rss_before / 1024,
            "rel_err": err, "default_is": chosen}


def _run_case(B: int, n: int, method: str, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.default_backward", "--child", str(B), str(n), method,
         str(repeats)],
        capture_output=True, text=True, check=True, env=os.environ.copy(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="two small shapes only")
    parser.add_argument("--repeats", type=int, default=5, help="timed backward passes per case")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        B, n, method, repeats = args.child
        print(json.dumps(_child(int(B), int(n), method, int(repeats))))
        return []
    rows = []
    print("B | n | default is | Dense s | CG s | default s | Dense MB | CG MB | default MB | "
          "default/CG time | default/CG memory | Dense/CG memory")
    for B, n in TINY_GRID if args.tiny else GRID:
        repeats = 1 if B * n**3 > 2**26 else args.repeats  # the slow cases: once is enough
        res = {m: _run_case(B, n, m, repeats) for m in METHODS}
        for m, r in res.items():
            if r["rel_err"] > 1e-6:
                raise RuntimeError(f"{m} at B={B}, n={n}: gradient error {r['rel_err']:.1e}")
        d, cg, de = res["Dense"], res["CG"], res["default"]
        row = {
            "B": B, "n": n, "default_is": de["default_is"],
            "time_ratio": de["seconds"] / cg["seconds"],
            "memory_ratio": de["peak_mb"] / cg["peak_mb"],
            "dense_memory_ratio": d["peak_mb"] / cg["peak_mb"],
        }
        rows.append(row)
        print(f"{B} | {n} | {de['default_is']} | {d['seconds']:.3f} | {cg['seconds']:.3f} | "
              f"{de['seconds']:.3f} | {d['peak_mb']:.0f} | {cg['peak_mb']:.0f} | "
              f"{de['peak_mb']:.0f} | {row['time_ratio']:.2f} | {row['memory_ratio']:.2f} | "
              f"{row['dense_memory_ratio']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
