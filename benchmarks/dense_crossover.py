"""Where the Dense adjoint stops beating CG: backward-only times on two argmin families.

Usage::

    python -m benchmarks.dense_crossover

Prints, for each size ``n``, the CPU time of one hypergradient backward pass (the forward
solve is done once, outside the timing) with ``il.linear.CG()``, ``il.linear.Dense()`` and the
default (after its first, measuring backward, which the warm-up pass takes), with the solver
the default chose:

* ridge regression with one weight decay per feature (``make_ridge``, condition number ~17,
  about 45 CG steps at rtol 1e-10);
* softmax regression on the first ``C`` digit classes (64 features x C weights, weight decay
  1 per input feature; well conditioned, about 15 CG steps).

The default adjoint solver (``Problem.default_adjoint_solver``) takes Dense up
to n = 128 and measures the choice above (``implicit_layers.linear.DenseOrCG``): no
size threshold serves both families.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits

import implicit_layers as il

from ._common import restore_threads, set_threads
from .ridge import make_ridge

F64 = torch.float64


def _median_backward(loss: torch.Tensor, theta: torch.Tensor, repeats: int = 9) -> float:
    torch.autograd.grad(loss, theta, retain_graph=True)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        torch.autograd.grad(loss, theta, retain_graph=True)
        times.append(time.process_time() - t0)
    return float(np.median(times))


def ridge_case(d: int, backward) -> float:
    data = {k: torch.as_tensor(v, dtype=F64) for k, v in make_ridge(d).items()}
    X, y, Xv, yv = data["X"], data["y"], data["Xv"], data["yv"]
    G, Xty = X.T @ X / X.shape[0], X.T @ y / X.shape[0]

    def optimality(w, theta):
        return G @ w - Xty + theta.exp() * w

    @il.custom_root(optimality, backward=backward, symmetric=True, rtol=1e-10)
    def inner(w0, theta):
        return torch.linalg.solve(G + torch.diag(theta.exp()), Xty)

    theta = data["theta"].clone().requires_grad_(True)
    w = inner(torch.zeros(d, dtype=F64), theta)
    return _median_backward(0.5 * ((Xv @ w - yv) ** 2).mean(), theta)


def softmax_case(classes: int, backward) -> tuple[int, float]:
    Xn, yn = load_digits(return_X_y=True)
    keep = yn < classes
    X = torch.tensor(Xn[keep] / 16.0, dtype=F64)
    y = torch.tensor(yn[keep])
    p = X.shape[1]

    def fun(w, theta):
        W = w.view(p, classes)
        penalty = 0.5 * (theta.exp().unsqueeze(1) * W**2).sum()
        return torch.nn.functional.cross_entropy(X @ W, y) + penalty

    theta = torch.zeros(p, dtype=F64, requires_grad=True)
    solver = il.solvers.LBFGS(rtol=1e-10, max_steps=3000)
    w = il.argmin(fun, torch.zeros(p * classes, dtype=F64), theta, solver=solver,
                  backward=backward)
    return p * classes, _median_backward((w**2).sum(), theta)


def _last_choice(n: int) -> str:
    """The solver the default used for the last problem (Dense below the measured band)."""
    if n <= 128:
        return "Dense"
    choices = il.linear.timed_choices.choices
    return list(choices.values())[-1] if choices else "CG"


def main() -> None:
    prev = set_threads(1)
    try:
        print("problem | n | CG ms | Dense ms | default ms (choice)")
        for d in (100, 200, 300, 400, 600, 1000):
            cg, dense, default = (ridge_case(d, b) for b in (il.linear.CG(), il.linear.Dense(), None))
            print(f"ridge | {d} | {1e3 * cg:.2f} | {1e3 * dense:.2f} | {1e3 * default:.2f} "
                  f"({_last_choice(d)})")
        for c in (2, 4, 6):
            n, cg = softmax_case(c, il.linear.CG())
            _, dense = softmax_case(c, il.linear.Dense())
            _, default = softmax_case(c, None)
            print(f"digits softmax | {n} | {1e3 * cg:.2f} | {1e3 * dense:.2f} | "
                  f"{1e3 * default:.2f} ({_last_choice(n)})")
    finally:
        restore_threads(prev)


if __name__ == "__main__":
    main()
