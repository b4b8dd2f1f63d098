"""Uncentered STN vs centered Δ-STN on the lecture's toy bilevel problem.

    J_val(λ, w) = λ² / 10 + w,    J_tr(λ, w) = w²,    optimum λ = w = 0.

The best response is ``w*(λ) = 0`` for every ``λ``: its Jacobian is zero, so λ should simply
slide to 0. The hypernetwork is one :class:`~implicit_layers.hyper.STNLinear` unit,
``w(λ) = φ0 + Φ u`` with ``u = λ`` (STN) or ``u = λ - λ0`` (Δ-STN). Early in training the
uncentered update ``Φ ← Φ - α (2w) λ`` makes ``Φ ≈ -c λ``: the response Jacobian claims that
raising λ lowers ``w`` (and hence J_val), so λ first moves *away* from 0 and then stays off
because ``φ0`` and ``Φ`` are nearly collinear (ill-conditioned) when λ is far from 0. The
centered layer only sees ``u = ε`` (zero mean), so ``Φ`` stays near 0 and λ goes to 0.

Run ``python examples/stn_toy.py`` (``--tiny`` for a quick check); the plot goes to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _outputs import output_dir

from implicit_layers import hyper

DEFAULTS = {"lam0": 1.0, "w0": 2.0, "lr": 0.01, "hyper_lr": 0.05, "sigma": 0.3}


def run(centered: bool, steps: int, seed: int = 0, progress: bool = False) -> dict:
    """Train one STN on the toy problem; returns the trajectories of λ, w(λ) and Φ."""
    torch.manual_seed(seed)
    hp = hyper.Hyperparameters({"lam": DEFAULTS["lam0"]}, sigma=DEFAULTS["sigma"])
    layer = hyper.STNLinear(1, 1, 1, centered=centered, bias=False)
    with torch.no_grad():
        layer.weight.fill_(DEFAULTS["w0"])
        layer.hyper_weight.fill_(1.0)
    x = torch.ones(16, 1)  # 16 perturbed draws of λ per step (one per "example")

    def w_of(sample: hyper.HyperSample) -> torch.Tensor:
        return layer(x, sample)[:, 0]

    def train_loss(batch: torch.Tensor, sample: hyper.HyperSample) -> torch.Tensor:
        return w_of(sample).square().mean()

    def val_loss(batch: torch.Tensor, sample: hyper.HyperSample) -> torch.Tensor:
        return (sample.raw[:, 0].square() / 10 + w_of(sample)).mean()

    opt = torch.optim.SGD(layer.parameters(), lr=DEFAULTS["lr"])
    # σ is kept fixed (sigma_lr=0, tau=0) so that both runs see the same perturbations.
    trainer = hyper.STNTrainer(hp, train_loss, val_loss, opt, hyper_lr=DEFAULTS["hyper_lr"],
                               sigma_lr=0.0, tau=0.0, t_train=5, t_valid=1)
    lam, w, phi = [], [], []

    def record(k: int, rec: dict) -> None:
        with torch.no_grad():
            lam_now = hp.raw.detach()
            lam.append(float(lam_now[0]))
            w.append(float(layer(x[:1], lam_now, center=lam_now)[0, 0]))
            phi.append(float(layer.hyper_scale[0, 0] * layer.hyper_weight[0, 0]))

    start = time.perf_counter()
    trainer.fit(lambda: x, lambda: x, steps, progress=progress, callback=record)
    return {"lam": lam, "w": w, "phi": phi, "seconds": time.perf_counter() - start}


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
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="short run for tests")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/stn_toy, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "stn_toy")
    steps = 300 if args.tiny else args.steps
    runs = {
        "uncentered": run(False, steps, args.seed, progress=not args.tiny),
        "centered": run(True, steps, args.seed, progress=not args.tiny),
    }
    result: dict = {"steps": steps, "lam0": DEFAULTS["lam0"]}
    for name, r in runs.items():
        result[name] = {
            "final_lam": r["lam"][-1],
            "final_w": r["w"][-1],
            "final_phi": r["phi"][-1],
            "max_lam": max(r["lam"]),
            "min_phi": min(r["phi"]),
            "seconds": r["seconds"],
            # first outer step with |λ| < 0.1 (None: never)
            "steps_to_0.1": next((k + 1 for k, v in enumerate(r["lam"]) if abs(v) < 0.1), None),
        }
        print(f"{name:>10}: final λ = {r['lam'][-1]:+.4f}  w(λ) = {r['w'][-1]:+.4f}  "
              f"Φ = {r['phi'][-1]:+.4f}  max λ = {max(r['lam']):.3f}  min Φ = {min(r['phi']):+.3f}  "
              f"first |λ|<0.1 at step {result[name]['steps_to_0.1']}  ({r['seconds']:.1f} s)")
    if not args.no_plot:
        result["plot"] = plot(runs, args.out)
    return result


def plot(runs: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = {"uncentered": "tab:red", "centered": "tab:blue"}
    labels = {"uncentered": "STN (uncentered: Φλ + φ0)", "centered": "Δ-STN (centered: Φ(λ-λ0) + w0)"}
    for name, r in runs.items():
        axes[0].plot(r["lam"], color=colors[name], label=labels[name])
        axes[1].plot(r["w"], color=colors[name])
        axes[2].plot(r["phi"], color=colors[name])
    axes[0].set_title("hyperparameter λ (optimum 0)")
    axes[1].set_title("weight w(λ) (optimum 0)")
    axes[2].set_title("response Jacobian Φ = ∂ŵ/∂λ (true: 0)")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("outer step (5 weight + 1 hyper update)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "stn_toy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
