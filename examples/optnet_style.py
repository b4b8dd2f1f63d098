"""A box-constrained quadratic-program layer, trained end to end (a first step towards OptNet).

Targets come from a hidden ground-truth box QP

    y(x) = argmin_{0 <= w <= 1}  ½ wᵀ Q* w - (P* x + q*)ᵀ w,      Q* = L* L*ᵀ + ½ I,

solved per sample by scipy's bounded least squares (BVLS, an independent exact solver). A
large share of the targets' coordinates sit on the box, and because Q* is not diagonal the
targets are *not* a clipped linear function of x. Three models are fitted to (x, y) by Adam
on the mean squared error:

* ``box QP``        — ``il.nn.ArgminLayer`` with a learnable quadratic and the box [0, 1];
* ``unconstrained`` — the same layer without the box (its output is linear in x);
* ``clipped linear``— ``clamp(A x + b, 0, 1)``.

Only the box QP layer can represent the data; it should reach a test error near zero and
recover the identifiable parts of the ground truth (the QP is invariant to scaling Q, P, q by
the same factor, so we compare Q⁻¹P, Q⁻¹q and Q/‖Q‖).

Usage::

    python examples/optnet_style.py           # about a minute on one CPU core
    python examples/optnet_style.py --tiny    # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.optimize import lsq_linear

import implicit_layers as il

F64 = torch.float64


class LearnedQuadratic(torch.nn.Module):
    """``L(w, x) = ½ wᵀ Q w - (P x + q)ᵀ w`` with ``Q = L Lᵀ + ε I`` positive definite."""

    def __init__(self, n: int, p: int, eps: float = 0.1) -> None:
        super().__init__()
        self.L = torch.nn.Parameter(torch.eye(n) + 0.1 * torch.randn(n, n))
        self.P = torch.nn.Parameter(0.1 * torch.randn(n, p))
        self.q = torch.nn.Parameter(torch.zeros(n))
        self.eps = eps

    def Q(self) -> torch.Tensor:
        n = self.L.shape[0]
        return self.L @ self.L.T + self.eps * torch.eye(n, dtype=self.L.dtype, device=self.L.device)

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((w @ self.Q()) * w).sum(-1) - (w * (x @ self.P.T + self.q)).sum(-1)


def box_qp_scipy(R: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``argmin_{0<=w<=1} ½ wᵀQw - cᵀw`` for ``Q = RᵀR``, exactly.

    ``½ wᵀQw - cᵀw = ½ ‖R w - R⁻ᵀ c‖² + const``: a bounded least-squares problem, solved by
    scipy's active-set BVLS method.
    """
    target = np.linalg.solve(R.T, c)
    return lsq_linear(R, target, bounds=(0.0, 1.0), method="bvls", tol=1e-14).x


def make_data(n: int, p: int, n_train: int, n_test: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    L = rng.normal(size=(n, n)) / np.sqrt(n)
    Q = L @ L.T + 0.5 * np.eye(n)
    P = rng.normal(size=(n, p)) / np.sqrt(p)
    q = 0.5 * np.ones(n)
    X = rng.normal(size=(n_train + n_test, p))
    R = np.linalg.cholesky(Q).T  # Q = Rᵀ R
    Y = np.stack([box_qp_scipy(R, P @ x + q) for x in X])
    t = lambda a: torch.tensor(a, dtype=F64)  # noqa: E731
    return {"Q": t(Q), "P": t(P), "q": t(q), "Xtr": t(X[:n_train]), "Ytr": t(Y[:n_train]),
            "Xte": t(X[n_train:]), "Yte": t(Y[n_train:])}


class ClippedLinear(torch.nn.Module):
    def __init__(self, n: int, p: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(p, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).clamp(0.0, 1.0)


def fit(model: torch.nn.Module, data: dict, steps: int, lr: float, label: str) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    first = None
    for k in range(steps):
        loss = (model(data["Xtr"]) - data["Ytr"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        first = float(loss.detach()) if first is None else first
        if k % max(1, steps // 5) == 0 or k == steps - 1:
            print(f"  [{label}] step {k:4d}  train MSE {float(loss.detach()):.3e}")
    model.eval()
    with torch.no_grad():
        test = float((model(data["Xte"]) - data["Yte"]).pow(2).mean())
    model.train()
    return {"train_mse_first": first, "train_mse_last": float(loss.detach()), "test_mse": test,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6, help="dimension of w")
    ap.add_argument("--p", type=int, default=8, help="dimension of x")
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small problem: runs in seconds")
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.p, args.train, args.test, args.steps = 4, 5, 64, 64, 60
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    data = make_data(args.n, args.p, args.train, args.test, args.seed)
    Y = torch.cat([data["Ytr"], data["Yte"]])
    on_box = float(((Y < 1e-9) | (Y > 1 - 1e-9)).float().mean())
    print(f"{args.n}-dim box QP, {args.p} inputs: {on_box:.0%} of the target coordinates lie on "
          "the box")

    solver = il.solvers.Anderson(max_steps=300, rtol=1e-10)
    box = il.nn.ArgminLayer(LearnedQuadratic(args.n, args.p), w_shape=args.n, lower=0.0, upper=1.0,
                            solver=solver).double()
    free = il.nn.ArgminLayer(LearnedQuadratic(args.n, args.p), w_shape=args.n).double()
    clipped = ClippedLinear(args.n, args.p).double()

    results = {"fraction_on_box": on_box}
    for label, model in (("box QP", box), ("unconstrained", free), ("clipped linear", clipped)):
        results[label] = fit(model, data, args.steps, args.lr, label)

    with torch.no_grad():
        obj = box.objective
        Q, Qt = obj.Q(), data["Q"]
        err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        results["recovery"] = {
            "Q^-1 P": err(torch.linalg.solve(Q, obj.P), torch.linalg.solve(Qt, data["P"])),
            "Q^-1 q": err(torch.linalg.solve(Q, obj.q), torch.linalg.solve(Qt, data["q"])),
            "Q/|Q|": err(Q / Q.norm(), Qt / Qt.norm()),
        }
    print("\ntest MSE:  " + "   ".join(f"{k} {results[k]['test_mse']:.2e}"
                                     for k in ("box QP", "unconstrained", "clipped linear")))
    print("relative error of the recovered ground truth (box QP layer): "
          + ", ".join(f"{k} {v:.2e}" for k, v in results["recovery"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
