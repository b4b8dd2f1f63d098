"""Data poisoning by implicit differentiation: craft one training image that hurts the model.

The same bilevel program as influence functions, with the outer variable parameterising a
training *input* instead of example weights. An attacker adds one image ``x_p`` with label
``y_p`` to the training set of an L2-regularised logistic regression (digits "1" vs "7", pixels
scaled to [0, 1]):

    w*(x_p) = argmin_w  [sum_i loss(w; x_i, y_i) + loss(w; x_p, y_p)] / (n + 1) + lam/2 ||w||^2,

and climbs the validation loss ``L_val(w*(x_p))``. ``il.argmin`` gives ``d L_val / d x_p``
directly: ``x_p`` is an argument of the inner objective, the backward pass solves one CG system
with the Hessian at ``w*``. Projected gradient ascent keeps ``x_p`` a valid image (box [0, 1]).

Reported, with every model retrained from scratch by an independent dense Newton solver: the
clean test loss, the test loss after adding a random image or the unoptimised starting image
(a "7" labelled "1"), and after adding the poisoned image; the implicit gradient is also checked
against central finite differences of the retrained validation loss.

Usage::

    python examples/data_poisoning.py            # full mode, writes out/data_poisoning/poisoning_*.png
    python examples/data_poisoning.py --write-docs   # the same, into docs/img (tracked)
    python examples/data_poisoning.py --tiny     # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _outputs import output_dir
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicit_layers as il  # noqa: E402

__all__ = ["main"]

DTYPE = torch.float64


def mean_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss of ``w = (weights (d,), bias)`` of shape (d + 1,) on ``X`` (m, d)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w[:-1] + w[-1], y)


def accuracy(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(((X @ w[:-1] + w[-1] > 0).to(DTYPE) == y).to(DTYPE).mean())


def newton_retrain(X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Independent reference: train from scratch by Newton with a dense Hessian, no il."""
    n, d = X.shape
    A = torch.hstack([X, torch.ones(n, 1, dtype=DTYPE)])
    R = lam * torch.eye(d + 1, dtype=DTYPE)
    R[-1, -1] = 0.0  # the bias is not regularised
    w = torch.zeros(d + 1, dtype=DTYPE)
    for _ in range(100):
        p = torch.sigmoid(A @ w)
        g = A.T @ (p - y) / n + R @ w
        H = (A.T * (p * (1 - p))) @ A / n + R
        step = torch.linalg.solve(H, g)
        w = w - step
        if float(step.norm()) < 1e-12 * (1 + float(w.norm())):
            break
    return w


def main(argv: list[str] | None = None) -> dict:
    """Craft the poisoned point; return the measured losses (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/data_poisoning, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the problem is small, and thread "
                             "synchronisation dominates small products on a busy machine)")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "data_poisoning")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(result, indent=1))
    return result


def run(args: argparse.Namespace) -> dict:
    n_train, n_val = (100, 100) if not args.tiny else (60, 60)
    steps, step_size = (60, 0.1) if not args.tiny else (15, 0.2)
    lam = 1e-2

    X, y = load_digits(return_X_y=True)
    keep = (y == 1) | (y == 7)
    X, y = X[keep] / 16.0, (y[keep] == 7).astype(float)  # label 1 means "7"
    perm = np.random.default_rng(args.seed).permutation(len(y))
    X, y = torch.tensor(X[perm], dtype=DTYPE), torch.tensor(y[perm], dtype=DTYPE)
    Xtr, ytr = X[:n_train], y[:n_train]
    Xval, yval = X[n_train:n_train + n_val], y[n_train:n_train + n_val]
    Xte, yte = X[n_train + n_val:], y[n_train + n_val:]
    d = X.shape[1]

    def objective(w: torch.Tensor, x_p: torch.Tensor, y_p: torch.Tensor) -> torch.Tensor:
        Xa, ya = torch.cat([Xtr, x_p[None]]), torch.cat([ytr, y_p[None]])
        return mean_loss(w, Xa, ya) + 0.5 * lam * (w[:-1] @ w[:-1])

    def retrained_test(x_p: torch.Tensor | None, y_p: torch.Tensor) -> tuple[float, float]:
        """Test loss and accuracy after retraining from scratch with ``x_p`` added (or not)."""
        Xa, ya = (Xtr, ytr) if x_p is None else (torch.cat([Xtr, x_p[None]]), torch.cat([ytr, y_p[None]]))
        w = newton_retrain(Xa, ya, lam)
        return float(mean_loss(w, Xte, yte)), accuracy(w, Xte, yte)

    y_p = torch.tensor(0.0, dtype=DTYPE)  # the poisoned image is labelled "1"
    x_start = Xtr[int(torch.nonzero(ytr == 1)[0])].clone()  # ... but starts as a real "7"
    x_random = torch.rand(d, dtype=DTYPE, generator=torch.Generator().manual_seed(args.seed))

    # Projected gradient ascent on the validation loss; the inner model is warm-started.
    solver = il.solvers.Newton(atol=1e-10)  # atol: a warm start already has a tiny gradient
    x_p, w = x_start.clone(), torch.zeros(d + 1, dtype=DTYPE)
    val_curve, test_curve, cg_steps = [], [], []
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="poisoning (projected gradient ascent)", leave=False):
        x_p.requires_grad_(True)
        w, info = il.argmin(objective, w.detach(), x_p, y_p, solver=solver,
                            backward=il.linear.CG(), return_info=True)
        val_loss = mean_loss(w, Xval, yval)
        (grad,) = torch.autograd.grad(val_loss, x_p)
        cg_steps.append(int(info.backward.steps))
        val_curve.append(float(val_loss.detach()))
        test_curve.append(float(mean_loss(w.detach(), Xte, yte)))
        with torch.no_grad():  # a step of step_size on the largest pixel, then back into the box
            x_p = (x_p + step_size * grad / grad.abs().max().clamp_min(1e-30)).clamp(0.0, 1.0)
    t_attack = time.perf_counter() - t0
    x_p = x_p.detach()
    val_curve.append(float(mean_loss(newton_retrain(torch.cat([Xtr, x_p[None]]),
                                                    torch.cat([ytr, y_p[None]]), lam), Xval, yval)))

    # Check the implicit gradient at the final point against central finite differences of
    # the retrained validation loss (independent solver), on the pixels with the largest entries.
    x_chk = x_p.clone().requires_grad_(True)
    w_chk = il.argmin(objective, w.detach(), x_chk, y_p, solver=solver, backward=il.linear.CG())
    (g_impl,) = torch.autograd.grad(mean_loss(w_chk, Xval, yval), x_chk)
    h, g_fd = 1e-5, []
    pixels = torch.argsort(g_impl.abs(), descending=True)[:5]
    for j in pixels.tolist():
        vals = []
        for s in (1.0, -1.0):
            xs = x_p.clone()
            xs[j] += s * h
            vals.append(float(mean_loss(newton_retrain(torch.cat([Xtr, xs[None]]),
                                                       torch.cat([ytr, y_p[None]]), lam), Xval, yval)))
        g_fd.append((vals[0] - vals[1]) / (2 * h))
    g_fd = torch.tensor(g_fd, dtype=DTYPE)
    fd_rel_err = float((g_impl[pixels] - g_fd).norm() / g_fd.norm())

    clean, clean_acc = retrained_test(None, y_p)
    rand, rand_acc = retrained_test(x_random, y_p)
    start, start_acc = retrained_test(x_start, y_p)
    poison, poison_acc = retrained_test(x_p, y_p)
    result = {
        "n_train": n_train, "n_val": n_val, "n_test": len(yte), "lam": lam,
        "attack_steps": steps, "step_size": step_size,
        "test_loss": {"clean": clean, "random_point": rand, "unoptimised_point": start,
                      "poisoned_point": poison},
        "test_accuracy": {"clean": clean_acc, "random_point": rand_acc,
                          "unoptimised_point": start_acc, "poisoned_point": poison_acc},
        "poison_increase_over_clean": poison / clean - 1.0,
        "val_loss_start": val_curve[0], "val_loss_end": val_curve[-1],
        "grad_fd_rel_err": fd_rel_err,
        "cg_steps_mean": float(np.mean(cg_steps)),
        "time_attack_s": t_attack, "time_per_step_s": t_attack / steps,
    }
    result["plot"] = str(plot(val_curve, test_curve, x_start, x_p, result, args.out))
    return result


def plot(val_curve, test_curve, x_start, x_p, result, out: Path) -> Path:
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax[0].plot(val_curve[:-1], label="validation loss (attack objective)")
    ax[0].plot(test_curve, label="test loss")
    tl = result["test_loss"]
    for key, style in (("clean", ":"), ("random_point", "--")):
        ax[0].axhline(tl[key], color="gray", ls=style, lw=1,
                      label=f"test loss, {key.replace('_', ' ')} (retrained)")
    ax[0].set(xlabel="attack iteration", ylabel="mean logistic loss",
              title="one poisoned image among {} training points".format(result["n_train"]))
    ax[0].legend(fontsize=7)
    for a, img, title in ((ax[1], x_start, "start: a '7' labelled '1'"),
                          (ax[2], x_p, "poisoned, labelled '1'")):
        a.imshow(img.reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
        a.set_title(title, fontsize=9)
        a.axis("off")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "poisoning_attack.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
