"""Δ-STN on scikit-learn's digits: per-layer dropout rates and weight decay in one training run.

A 64-128-128-10 ReLU MLP with dropout after each hidden layer and an L2 weight decay. Three
hyperparameters — ``p1``, ``p2`` (dropout rates, ``Logit(0, 0.9)``) and ``wd`` (``Log``) — are
tuned on the validation loss in a single run of :class:`~implicit_layers.hyper.STNTrainer` with
centered :class:`~implicit_layers.hyper.STNLinear` layers (Δ-STN). Compared, on the same data
split, with the same architecture trained by Adam:

* random search and grid search over the same three hyperparameters, with the same total number
  of minibatch passes as the STN run (its weight steps plus its hyperparameter steps), split
  evenly across the configurations; the configuration with the best validation loss is reported;
* the implicit-differentiation tuner (weight decay only, no dropout): the weights are
  ``il.argmin`` of the regularised training loss (L-BFGS, warm-started), the hypergradient of
  the validation loss comes from the implicit backward with CG, and Adam updates ``log wd``.

Reported: final test cross-entropy and accuracy, wall time, the hyperparameters found, and the
STN's hyperparameter schedule (plot). Run ``python examples/stn_digits.py`` (``--tiny`` for a
quick check).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from _outputs import output_dir
from torch import nn

import implicit_layers as il
from implicit_layers import hyper

HIDDEN = 128
RANGES = {"p1": (0.0, 0.8), "p2": (0.0, 0.8), "wd": (1e-5, 1e-1)}


def load_data(seed: int = 0) -> dict:
    """Digits split into train (1000) / val (400) / test (397), standardised on train."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm]
    y = torch.tensor(y, dtype=torch.long)[perm]
    mu, sd = X[:1000].mean(0), X[:1000].std(0).clamp_min(1e-3)
    X = (X - mu) / sd
    return {"train": (X[:1000], y[:1000]), "val": (X[1000:1400], y[1000:1400]), "test": (X[1400:], y[1400:])}


def batches(data: tuple, batch_size: int, g: torch.Generator):
    """Endless shuffled minibatches."""
    X, y = data
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield X[idx], y[idx]


class STNMLP(nn.Module):
    """The MLP with Δ-STN layers; dropout rates and weight decay come from the sample."""

    def __init__(self, n_hyper: int, centered: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            hyper.STNLinear(64, HIDDEN, n_hyper, centered=centered),
            hyper.STNLinear(HIDDEN, HIDDEN, n_hyper, centered=centered),
            hyper.STNLinear(HIDDEN, 10, n_hyper, centered=centered),
        ])

    def forward(self, x: torch.Tensor, s: hyper.HyperSample) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, s)
            if i < 2:
                h = hyper.concrete_dropout(F.relu(h), s[f"p{i + 1}"], training=s.training)
        return h

    def weight_penalty(self, s: hyper.HyperSample) -> torch.Tensor:
        """``Σ_layers ‖W_l(λ_i)‖²`` per example, shape ``(B,)``."""
        return sum(layer.weight_sq_norm(s) for layer in self.layers)


def run_stn(data: dict, outer_steps: int, seed: int, progress: bool, init: dict) -> dict:
    torch.manual_seed(seed)
    hp = hyper.Hyperparameters(
        {"p1": (hyper.Logit(0.0, 0.9), init["p1"]), "p2": (hyper.Logit(0.0, 0.9), init["p2"]),
         "wd": (hyper.Log(), init["wd"])},
        sigma=0.5,
    )
    model = STNMLP(hp.n)

    def train_loss(batch: tuple, s: hyper.HyperSample) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(model(x, s), y, reduction="none")
        return (ce + s["wd"] * model.weight_penalty(s)).mean()

    def val_loss(batch: tuple, s: hyper.HyperSample) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x, s), y)  # s.training is False: no dropout, no penalty

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = hyper.STNTrainer(hp, train_loss, val_loss, opt, hyper_lr=0.01, t_train=5, t_valid=1,
                               tau=1e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    history = trainer.fit(batches(data["train"], 100, g), batches(data["val"], 100, g), outer_steps,
                          progress=progress)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        s = hp.sample(None, perturb=False, training=False)
        res = evaluate(lambda x: model(x, s), data)
    res.update(seconds=seconds, passes=outer_steps * 6, hparams=hp.values(), history=history)
    return res


class MLP(nn.Module):
    def __init__(self, p1: float, p2: float) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 10)
        self.p1, self.p2 = p1, p2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.l1(x)), self.p1, self.training)
        h = F.dropout(F.relu(self.l2(h)), self.p2, self.training)
        return self.l3(h)

    def weight_penalty(self) -> torch.Tensor:
        return sum(m.weight.square().sum() for m in (self.l1, self.l2, self.l3))


def evaluate(predict, data: dict) -> dict:
    out = {}
    for split in ("val", "test"):
        x, y = data[split]
        logits = predict(x)
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
        out[f"{split}_acc"] = float((logits.argmax(1) == y).float().mean())
    return out


def train_fixed(data: dict, cfg: dict, steps: int, seed: int) -> dict:
    """Plain training of the MLP with fixed hyperparameters for ``steps`` minibatch steps."""
    torch.manual_seed(seed)
    model = MLP(cfg["p1"], cfg["p2"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    it = batches(data["train"], 100, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y) + cfg["wd"] * model.weight_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return evaluate(model, data)


def search(data: dict, configs: list[dict], total_passes: int, seed: int, progress: bool) -> dict:
    """Train every config for ``total_passes / len(configs)`` steps; pick the best on validation."""
    from tqdm.auto import tqdm

    steps = max(1, total_passes // len(configs))
    start = time.perf_counter()
    results = [dict(cfg=cfg, **train_fixed(data, cfg, steps, seed))
               for cfg in tqdm(configs, desc="search", disable=not progress, leave=False)]
    best = min(results, key=lambda r: r["val_loss"])
    return {**{k: best[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc")},
            "hparams": best["cfg"], "seconds": time.perf_counter() - start, "steps_per_config": steps,
            "configs": len(configs), "passes": steps * len(configs)}


def random_configs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    lo, hi = math.log(RANGES["wd"][0]), math.log(RANGES["wd"][1])
    return [{"p1": RANGES["p1"][1] * float(a), "p2": RANGES["p2"][1] * float(b),
             "wd": math.exp(lo + (hi - lo) * float(c))} for a, b, c in u]


def grid_configs(per_axis: int) -> list[dict]:
    ps = [RANGES["p1"][1] * (i + 0.5) / per_axis for i in range(per_axis)]
    lo, hi = math.log(RANGES["wd"][0]), math.log(RANGES["wd"][1])
    wds = [math.exp(lo + (hi - lo) * (i + 0.5) / per_axis) for i in range(per_axis)]
    return [{"p1": a, "p2": b, "wd": c} for a in ps for b in ps for c in wds]


def implicit_tuner(data: dict, outer_steps: int, init_wd: float, seed: int, progress: bool,
                   inner_steps: int = 300) -> dict:
    """Weight decay only: ``w*(wd) = il.argmin`` of the training loss, implicit CG hypergradient."""
    from torch.func import functional_call
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = MLP(0.0, 0.0).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    is_weight = torch.cat([torch.full((n,), float(name.endswith("weight")), dtype=torch.float64)
                           for name, n in zip(names, sizes, strict=True)])
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    xtr, xva = xtr.double(), xva.double()

    def predict(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return functional_call(model, params, (x,))

    def inner(theta: torch.Tensor, log_wd: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predict(theta, xtr), ytr) + log_wd.exp() * (is_weight * theta.square()).sum()

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    log_wd = torch.tensor(math.log(init_wd), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_wd], lr=0.3)
    # Loose, budgeted inner solves (warm-started): the usual practice for hyperparameter tuning.
    solver = il.solvers.LBFGS(rtol=1e-6, max_steps=inner_steps, on_failure="ignore")
    backward = il.backward.Implicit(il.linear.CG(rtol=1e-6, max_steps=200, on_failure="ignore"))
    start = time.perf_counter()
    trace = []
    for _ in tqdm(range(outer_steps), desc="implicit", disable=not progress, leave=False):
        w = il.argmin(inner, theta, log_wd, solver=solver, backward=backward)
        val = F.cross_entropy(predict(w, xva), yva)
        opt.zero_grad()
        val.backward()
        opt.step()
        theta = w.detach()  # warm start the next inner solve
        trace.append({"wd": math.exp(float(log_wd.detach())), "val_loss": float(val.detach())})
    with torch.no_grad():
        w = il.argmin(inner, theta, log_wd.detach(), solver=solver)
        res = evaluate(lambda x: predict(w, x.double()), data)
    wd = math.exp(float(log_wd.detach()))
    res.update(seconds=time.perf_counter() - start, hparams={"wd": wd}, trace=trace)
    return res


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the measured results."""
    # These models are tiny: one thread avoids the heavy thread-contention slowdown seen on a
    # shared CPU; the previous setting is restored for the caller.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=1000, help="STN outer steps (5 + 1 passes each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="short run for tests")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/stn_digits, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "stn_digits")
    data = load_data(args.seed)
    outer = 80 if args.tiny else args.outer_steps
    progress = not args.tiny
    init = {"p1": 0.05, "p2": 0.05, "wd": 1e-4}
    results: dict = {}
    results["stn"] = run_stn(data, outer, args.seed, progress, init)
    passes = results["stn"]["passes"]
    n_cfg = 2 if args.tiny else 8
    results["random"] = search(data, random_configs(n_cfg, args.seed), passes, args.seed, progress)
    results["grid"] = search(data, grid_configs(1 if args.tiny else 2), passes, args.seed, progress)
    results["implicit"] = implicit_tuner(data, 2 if args.tiny else 15, init["wd"], args.seed, progress,
                                         inner_steps=60 if args.tiny else 300)
    print(f"{'method':<28} {'test CE':>8} {'test acc':>8} {'val CE':>8} {'time s':>7}  hyperparameters")
    labels = {"stn": "Δ-STN (1 run)", "random": f"random search ({n_cfg} cfg)",
              "grid": f"grid search ({results['grid']['configs']} cfg)", "implicit": "implicit (wd only)"}
    for k, lab in labels.items():
        r = results[k]
        hp = ", ".join(f"{n}={v:.3g}" for n, v in r["hparams"].items())
        print(f"{lab:<28} {r['test_loss']:8.4f} {r['test_acc']:8.4f} {r['val_loss']:8.4f} "
              f"{r['seconds']:7.1f}  {hp}")
    if not args.no_plot:
        results["plot"] = plot(results, args.out, "stn_digits_tiny.png" if args.tiny else "stn_digits.png")
    return results


def plot(results: dict, out: str, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    hist = results["stn"]["history"]
    steps = range(1, len(hist) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, [h["p1"] for h in hist], label="p1 (dropout, hidden 1)")
    axes[0].plot(steps, [h["p2"] for h in hist], label="p2 (dropout, hidden 2)")
    axes[0].set(title="Δ-STN dropout schedule", xlabel="outer step", ylim=(0, 0.9))
    axes[0].legend(fontsize=8)
    axes[1].semilogy(steps, [h["wd"] for h in hist], label="Δ-STN")
    tr = results["implicit"]["trace"]
    axes[1].set(title="weight decay schedule", xlabel="outer step (Δ-STN)")
    ax_top = axes[1].twiny()
    ax_top.semilogy(range(1, len(tr) + 1), [t["wd"] for t in tr], "C3o-", ms=3, label="implicit tuner")
    ax_top.set_xlabel("outer step (implicit tuner)", fontsize=8)
    axes[1].legend(loc="upper left", fontsize=8)
    ax_top.legend(loc="lower right", fontsize=8)
    axes[2].plot(steps, [h["val_loss"] for h in hist], alpha=0.6, label="Δ-STN val CE (perturbed λ)")
    for k, c in (("random", "C1"), ("grid", "C2"), ("implicit", "C3")):
        axes[2].axhline(results[k]["val_loss"], color=c, ls="--", label=f"{k}: best val CE")
    axes[2].set(title="validation cross-entropy", xlabel="outer step", ylim=(0, 1.0))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
