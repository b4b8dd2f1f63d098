"""Problem 3: memory of a hypergradient as the number of inner steps grows.

Inner problem: L2-regularised logistic regression on the bundled breast-cancer data with one
weight decay per feature, solved by ``K`` gradient-descent steps (K = 10, 100, 1000). The
memory measured is the number of bytes autograd keeps for the backward pass: every tensor
saved by the graph, counted once per storage through
:func:`torch.autograd.graph.saved_tensors_hooks` (deterministic, unlike process RSS). Saved
tensors that are the inputs themselves (the data matrix) are excluded, as every method keeps
them anyway. On CUDA the peak allocated memory is reported too.
"""

from __future__ import annotations

import numpy as np
import torch

import implicit_layers as il

from ._common import Config, Section, rel_err


def make_logistic(device: torch.device) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, va = idx[:400], idx[400:]
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    return {"X": as_t(X[tr]), "y": as_t(y[tr]), "Xv": as_t(X[va]), "yv": as_t(y[va]),
            "theta": as_t(np.full(X.shape[1], np.log(0.1)))}


def logistic_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)


def run_memory(cfg: Config) -> Section:
    section = Section("memory", "Memory kept for the backward pass vs inner steps (logistic regression)")
    section.notes.append(
        "saved_MB = bytes of the distinct storages the autograd graph holds when the loss is "
        "computed (excluding the data), i.e. what backward needs. "
        "Implicit: GD forward under no_grad + CG backward; unrolled: autograd through every GD step."
    )
    D = make_logistic(cfg.torch_device)
    X, y, Xv, yv, theta0 = D["X"], D["y"], D["Xv"], D["yv"], D["theta"]
    step = 4.0 / (float(torch.linalg.matrix_norm(X, 2)) ** 2 / X.shape[0] + 0.4)

    def inner(w, theta):
        return logistic_loss(w, X, y) + 0.5 * (theta.exp() * w * w).sum()

    steps_list = [10, 30] if cfg.tiny else [10, 100, 1000]
    per_mode: dict[str, dict[int, float]] = {"implicit": {}, "unrolled": {}}
    for K in steps_list:
        for mode, backward in (("implicit", il.linear.CG(rtol=1e-10)), ("unrolled", il.backward.Unrolled())):
            meter = il.memory.SavedTensorBytes(exclude=(X, y, Xv, yv))
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            theta = theta0.clone().requires_grad_(True)
            with meter:
                w = il.argmin(
                    inner, torch.zeros(X.shape[1], dtype=X.dtype, device=X.device), theta,
                    solver=il.solvers.GradientDescent(step_size=step, max_steps=K, rtol=0.0,
                                                      on_failure="ignore"),
                    backward=backward,
                )
                loss = logistic_loss(w, Xv, yv)
                held = meter.collect()
                (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
                after = meter.collect()
            peak_cuda = (torch.cuda.max_memory_allocated() / 2**20
                         if torch.device(cfg.device).type == "cuda" else None)
            per_mode[mode][K] = held
            section.add(case=f"K={K}", method=mode, saved_MB=held / 2**20,
                        held_after_backward_MB=after / 2**20, cuda_peak_MB=peak_cuda,
                        grad_norm=float(g.norm()))
        # the two gradients differ only through the non-converged inner solve
        section.rows[-1]["grad_rel_diff_vs_implicit"] = rel_err(
            section.rows[-1]["grad_norm"], section.rows[-2]["grad_norm"])
    lo, hi = steps_list[0], steps_list[-1]
    r = per_mode["implicit"][hi] / max(per_mode["implicit"][lo], 1)
    section.target(f"implicit memory K={hi} / K={lo}", "<= 1.1", r, r <= 1.1)
    r_u = per_mode["unrolled"][hi] / max(per_mode["unrolled"][lo], 1)
    section.notes.append(f"unrolled memory grows {r_u:.0f}x from K={lo} to K={hi}.")
    return section
