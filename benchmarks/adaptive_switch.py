"""Adaptive's switch rule: forward steps and time against plain iteration and Anderson.

    python -m benchmarks.adaptive_switch [--tiny] [--repeats 7]

Four fixed-point maps, float64, default tolerance: the DEQ benchmark's easy, hard and MLP maps
(``benchmarks/deq.py``, batch 64, hidden 256) and the lasso proximal-gradient map on
scikit-learn's diabetes data (``w ← soft(w - η Xᵀ(Xw - y)/n, η λ)``, ``η = 1/L``, λ = 0.05,
standardised data). Each solver runs the forward solve only, alternating round by round; the
table gives the median time, the steps, what Adaptive did, and its time over the best fixed
solver's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import implicit_layers as il

from .deq import f_inj, f_mlp, make_deq, make_mlp

Map = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]


def lasso_map(alpha: float = 0.05) -> Map:
    from sklearn.datasets import load_diabetes

    X_np, y_np = load_diabetes(return_X_y=True)
    X = torch.tensor(X_np, dtype=torch.float64)
    y = torch.tensor(y_np, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    n = X.shape[0]
    step = 1.0 / float(torch.linalg.matrix_norm(X, 2) ** 2 / n)

    def prox_gradient(w: torch.Tensor) -> torch.Tensor:
        v = w - step * ((w @ X.T - y) @ X / n)
        return torch.sign(v) * torch.clamp(v.abs() - step * alpha, min=0.0)

    return prox_gradient, torch.zeros(1, X.shape[1], dtype=torch.float64)


def maps(tiny: bool) -> dict[str, Map]:
    hidden = 32 if tiny else 256
    out: dict[str, Map] = {}
    for kind in ("easy", "hard"):
        T = {k: torch.tensor(v) for k, v in make_deq(kind, hidden=hidden).items()}
        inj = T["x"] @ T["U"].T + T["b"]
        out[f"DEQ {kind}"] = (lambda z, inj=inj, W=T["W"]: f_inj(z, inj, W), torch.zeros_like(T["t"]))
    M = {k: torch.tensor(v) for k, v in make_mlp(hidden=hidden).items()}
    minj = M["x"] @ M["V"].T
    out["DEQ MLP"] = (lambda z: f_mlp(z, minj, M["W1"], M["W2"], M["c"]), torch.zeros_like(M["t"]))
    out["lasso (diabetes)"] = lasso_map()
    return out


def run(tiny: bool, repeats: int) -> str:
    solvers = {
        "Adaptive": il.solvers.Adaptive(max_steps=2000),
        "Picard": il.solvers.Picard(max_steps=2000),
        "Anderson": il.solvers.Anderson(max_steps=2000),
    }
    lines = ["| map | Adaptive did | steps (Adaptive / Picard / Anderson) | ms (Adaptive / Picard / "
             "Anderson) | Adaptive / best fixed |", "|---|---|---|---|---|"]
    for name, (f, z0) in maps(tiny).items():
        times: dict[str, list[float]] = {s: [] for s in solvers}
        steps: dict[str, int] = {}
        did = ""
        for _ in range(repeats):
            for sname, solver in solvers.items():
                start = time.perf_counter()
                _, info = il.fixed_point(f, z0, solver=solver, batched=True, return_info=True)
                times[sname].append(time.perf_counter() - start)
                steps[sname] = int(info.steps.max())
                if sname == "Adaptive":
                    did = info.solver.removeprefix("Adaptive ")
        med = {s: 1e3 * statistics.median(t) for s, t in times.items()}
        best = min(med["Picard"], med["Anderson"])
        lines.append(
            f"| {name} | {did} | {steps['Adaptive']} / {steps['Picard']} / {steps['Anderson']} | "
            f"{med['Adaptive']:.1f} / {med['Picard']:.1f} / {med['Anderson']:.1f} | "
            f"{med['Adaptive'] / best:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="hidden 32, one repeat (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = run(args.tiny, args.repeats or (1 if args.tiny else 7))
    print(text)
    return text


if __name__ == "__main__":
    main()
