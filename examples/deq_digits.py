"""A DEQ classifier on scikit-learn's bundled 8x8 digits (no download), plain PyTorch loop.

The hidden state is the equilibrium ``z* = tanh(W z* + U x + b)`` of one ``il.nn.DEQ`` layer;
a linear head reads the class from ``z*``. ``--backward`` switches how gradients flow through
the equilibrium so the trade-off between the modes can be measured:

* ``implicit``      — implicit function theorem, GMRES adjoint solve (exact at convergence);
* ``phantom``       — 5 damped steps from the equilibrium (Geng et al., 2021);
* ``jacobian_free`` — one step from the equilibrium (Fung et al., 2022);
* ``unrolled``      — backpropagation through every Anderson iteration.

Reported per run: test accuracy, seconds per epoch, mean forward steps per sample, mean
backward (adjoint) steps per sample for the implicit mode, the largest number of bytes kept for
backward by one training step (distinct tensor storages saved by autograd, counted with
``torch.autograd.graph.saved_tensors_hooks`` on the first batch of each epoch: deterministic,
and the quantity that grows with unrolling), and the process's peak resident set size
(``resource.getrusage``, includes the Python interpreter and libraries).

Usage::

    python examples/deq_digits.py --backward implicit
    python examples/deq_digits.py --tiny            # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import implicit_layers as il

MODES = ("implicit", "phantom", "jacobian_free", "unrolled")


class Cell(torch.nn.Module):
    """The equilibrium map ``f(z, x) = tanh(W z + U x + b)``."""

    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.inject = torch.nn.Linear(n_in, hidden)
        self.W = torch.nn.Linear(hidden, hidden, bias=False)
        # Start well inside the contractive regime (spectral norm about 0.5).
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.inject(x))


class DEQClassifier(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int, n_classes: int, backward: object,
                 max_steps: int, eval_max_steps: int) -> None:
        super().__init__()
        self.deq = il.nn.DEQ(
            Cell(n_in, hidden),
            solver=il.solvers.Anderson(memory=5, rtol=1e-4, max_steps=max_steps, on_failure="ignore"),
            eval_solver=il.solvers.Anderson(
                memory=5, rtol=1e-4, max_steps=eval_max_steps, on_failure="ignore"
            ),
            backward=backward,
            state_shape=(hidden,),
        )
        self.head = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, il.SolveInfo]:
        z, info = self.deq(x, return_info=True)
        return self.head(z), z, info


def make_backward(name: str) -> object:
    if name == "implicit":
        # Training tolerates an inexact gradient; a failed adjoint solve (rare) falls back to the
        # phantom gradient with a warning instead of handing a garbage gradient to Adam.
        return il.backward.Implicit(
            il.linear.GMRES(max_steps=60, on_failure="ignore"), fallback=il.backward.Phantom()
        )
    if name == "phantom":
        return il.backward.Phantom(steps=5, damping=0.5)
    if name == "jacobian_free":
        return il.backward.JacobianFree()
    if name == "unrolled":
        return il.backward.Unrolled()
    raise ValueError(f"--backward must be one of {MODES}, got {name!r}.")


def load_data(tiny: bool, seed: int) -> tuple[torch.Tensor, ...]:
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    if tiny:
        Xtr, ytr, Xte, yte = Xtr[:256], ytr[:256], Xte[:128], yte[:128]
    return Xtr, ytr, Xte, yte


def evaluate(model: DEQClassifier, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits, _, info = model(X)
    model.train()
    return float((logits.argmax(-1) == y).float().mean()), float(info.steps.float().mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backward", choices=MODES, default="implicit")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-steps", type=int, default=40, help="forward iteration limit (train)")
    p.add_argument("--eval-max-steps", type=int, default=80, help="forward iteration limit (eval)")
    p.add_argument("--jac-reg", type=float, default=0.0,
                   help="weight of the Jacobian penalty (Bai et al. 2021), 0 = off")
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="clip the gradient norm to this value, 0 = off (helps --backward unrolled)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads; the matrices are small, so 1 is fastest (and robust to load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="small data and model: runs in seconds")
    p.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs, args.hidden, args.lr = 3, 32, 1e-2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Xtr, ytr, Xte, yte = load_data(args.tiny, args.seed)
    model = DEQClassifier(Xtr.shape[1], args.hidden, 10, make_backward(args.backward),
                          args.max_steps, args.eval_max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(args.seed)

    epoch_times, fwd_steps, bwd_steps, peak_saved, losses = [], [], [], 0, []
    # Per-epoch curves: test accuracy (eval mode, after the epoch), mean steps of the epoch.
    history: dict[str, list[float]] = {"test_accuracy": [], "forward_steps": [], "backward_steps": []}
    bar = tqdm(range(args.epochs), desc=f"DEQ digits [{args.backward}]", file=sys.stdout)
    for _ in bar:
        t0 = time.perf_counter()
        first_step = len(fwd_steps), len(bwd_steps)
        perm = torch.randperm(len(Xtr), generator=gen)
        epoch_loss = 0.0
        for i in range(0, len(Xtr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            # Saved bytes are counted on the first batch of each epoch only: a pack hook that
            # returns its tensor makes reference cycles for saved outputs, freed only by gc.
            counter = il.memory.SavedTensorBytes() if i == 0 else None
            with counter if counter else contextlib.nullcontext():
                logits, z, info = model(Xtr[idx])
                loss = torch.nn.functional.cross_entropy(logits, ytr[idx])
                if args.jac_reg > 0:
                    pen = il.nn.jacobian_penalty(model.deq.f, z.detach(), Xtr[idx], normalize=True)
                    loss = loss + args.jac_reg * pen.mean()
            opt.zero_grad()
            loss.backward()
            epoch_loss += float(loss.detach()) * len(idx)
            if counter:
                peak_saved = max(peak_saved, counter.total)
                del logits, z, loss
                gc.collect()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            fwd_steps.append(float(info.steps.float().mean()))
            if info.backward is not None:
                bwd_steps.append(float(info.backward.steps.float().mean()))
        sched.step()
        epoch_times.append(time.perf_counter() - t0)
        losses.append(epoch_loss / len(Xtr))
        epoch_fwd, epoch_bwd = fwd_steps[first_step[0]:], bwd_steps[first_step[1]:]
        history["forward_steps"].append(sum(epoch_fwd) / len(epoch_fwd))
        history["backward_steps"].append(sum(epoch_bwd) / len(epoch_bwd) if epoch_bwd else float("nan"))
        history["test_accuracy"].append(evaluate(model, Xte, yte)[0])
        bar.set_postfix(loss=f"{losses[-1]:.3f}", fwd=f"{fwd_steps[-1]:.1f}")

    acc, eval_steps = evaluate(model, Xte, yte)
    result = {
        "backward": args.backward,
        "epochs": args.epochs,
        "hidden": args.hidden,
        "clip_grad": args.clip_grad,
        "test_accuracy": acc,
        "train_loss_first_epoch": losses[0],
        "train_loss_last_epoch": losses[-1],
        "seconds_per_epoch": sum(epoch_times) / len(epoch_times),
        "total_train_seconds": sum(epoch_times),
        "mean_forward_steps_train": sum(fwd_steps) / len(fwd_steps),
        "mean_forward_steps_eval": eval_steps,
        "mean_backward_steps": (sum(bwd_steps) / len(bwd_steps)) if bwd_steps else None,
        "peak_saved_for_backward_MiB": peak_saved / 2**20,
        "history": {"train_loss": losses, **history},
        # ru_maxrss is in KiB on Linux.
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
