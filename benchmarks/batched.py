"""Problem 5: per-sample vs whole-batch stopping on a batch with a few hard samples.

A batch of 64 DEQ problems ``z_i = tanh(s_i W z_i + U x_i + b)`` with ``W`` orthogonal; 60
samples are easy (``s_i = 0.5``) and 4 are hard (``s_i = 0.98``). ``batched=True`` gives every
sample its own tolerance, mixing weights and stopping; ``batched=False`` treats the batch as one
problem (one norm, one set of Anderson weights), the behaviour of solvers that stop on the
whole batch. Reported: steps (per-sample max / mean), time, and the worst per-sample relative
residual reached.
"""

from __future__ import annotations

import numpy as np
import torch

import implicit_layers as il

from ._common import Config, Section, time_alternating


def run_batched(cfg: Config) -> Section:
    section = Section("batched", "Batch of 64 with 4 hard samples: per-sample vs whole-batch stopping")
    n, B = (32, 16) if cfg.tiny else (256, 64)
    rng = np.random.default_rng(0)
    W = np.linalg.qr(rng.standard_normal((n, n)))[0]
    U = rng.standard_normal((n, 64)) / 8.0
    b = 0.1 * rng.standard_normal(n)
    x = rng.standard_normal((B, 64))
    s = np.full((B, 1), 0.5)
    s[:4] = 0.98
    T = {k: torch.as_tensor(v, device=cfg.torch_device) for k, v in dict(W=W, U=U, b=b, x=x, s=s).items()}

    def f(z, x, W, U, b, s):
        return torch.tanh(s * (z @ W.T) + x @ U.T + b)

    def run(solver_cls, batched):
        def go():
            z, info = il.fixed_point(
                f, torch.zeros(B, n, dtype=torch.float64, device=cfg.torch_device),
                T["x"], T["W"], T["U"], T["b"], T["s"],
                solver=solver_cls(rtol=1e-10, max_steps=3000), batched=batched, return_info=True,
            )
            return z, info

        return go

    methods = {}
    for name, cls in (("Picard", il.solvers.Picard), ("Anderson", il.solvers.Anderson)):
        methods[f"{name} per-sample (batched=True)"] = run(cls, True)
        methods[f"{name} whole-batch (batched=False)"] = run(cls, False)
    with torch.no_grad():
        times, outs = time_alternating(methods, cfg, repeats=max(1, cfg.repeats // 2))
    for k, t in times.items():
        z, info = outs[k]
        res = torch.linalg.vector_norm(z - f(z, T["x"], T["W"], T["U"], T["b"], T["s"]), dim=-1)
        rel = res / torch.linalg.vector_norm(z, dim=-1)
        steps = info.steps.reshape(-1).double()
        section.add(case=f"n={n} B={B}", method=k, time_ms=1e3 * t, max_steps=int(steps.max()),
                    mean_steps=float(steps.mean()), easy_worst_rel_residual=float(rel[4:].max()),
                    hard_worst_rel_residual=float(rel[:4].max()))
    return section
