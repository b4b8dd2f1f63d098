"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, 2019) against MAML and first-order MAML.

Sinusoid regression (Finn et al., 2017): a task is ``y = A sin(x - φ)`` with amplitude
``A ~ U[0.1, 5]``, phase ``φ ~ U[0, π]``, inputs ``x ~ U[-5, 5]``; 10 support points adapt the
model, 25 query points score the adapted model. The model is an MLP 1-40-40-1 (tanh) written as
a function of one flat parameter vector, so a batch of tasks is a batch of parameter vectors.

* iMAML adapts by ``φ*(θ) = argmin_φ L_support(φ) + λ/2 ‖φ - θ‖²`` through ``il.argmin`` (``K``
  gradient steps forward, CG backward). The meta-gradient ``λ (H + λI)⁻¹ ∇L_query(φ*)`` needs
  only the final ``φ``, so its memory does not depend on ``K``.
* MAML differentiates the same ``K`` gradient steps on ``L_support`` by unrolling them
  (``il.argmin`` with ``backward=Unrolled()``): memory grows linearly in ``K``.
* First-order MAML (FOMAML) drops the second-order term: the meta-gradient is ``∇L_query(φ_K)``.

The example meta-trains all three with the same budget (meta-steps, meta-batch, ``K``), reports
post-adaptation test MSE on fresh tasks, and then measures, for ``K`` in 5, 20, 100, the time
of a meta-step and the memory autograd keeps for the meta-gradient: the bytes of the distinct
tensors saved for backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (exact
and deterministic, unlike process-level measures on a CPU).

Run ``python examples/imaml.py`` (full) or with ``--tiny``; ``--imaml-solver lbfgs`` makes iMAML's
K inner steps L-BFGS iterations (its gradient assumes a solved inner problem, which K small
gradient steps do not deliver), ``--steps K`` changes K for every method. Measured results and
their discussion: ``docs/hpo_imaml.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _outputs import output_dir
from tqdm import tqdm  # noqa: E402

import implicit_layers as il  # noqa: E402

__all__ = ["main", "mlp", "sample_tasks", "adapt", "METHODS"]

METHODS = ("iMAML", "MAML", "FOMAML")
HIDDEN = 40
# (shape of each parameter block of the MLP 1-40-40-1), in the order they sit in the flat vector
SHAPES = [(HIDDEN, 1), (HIDDEN,), (HIDDEN, HIDDEN), (HIDDEN,), (1, HIDDEN), (1,)]
N_PARAMS = sum(math.prod(s) for s in SHAPES)
# A smooth activation: the inner objective must be twice differentiable for the implicit
# function theorem (with ReLU the minimiser can sit on a kink where the gradient never vanishes).
ACTIVATION = torch.tanh


# --- model and tasks -------------------------------------------------------------------------
def init_params(gen: torch.Generator) -> torch.Tensor:
    """Flat ``(N_PARAMS,)`` initial parameters, uniform ``±1/sqrt(fan_in)`` like ``nn.Linear``."""
    fan_ins = [1, 1, HIDDEN, HIDDEN, HIDDEN, HIDDEN]  # each block's layer input size
    blocks = [(torch.rand(math.prod(s), generator=gen) * 2 - 1) / math.sqrt(f)
              for s, f in zip(SHAPES, fan_ins, strict=True)]
    return torch.cat(blocks)


def mlp(phi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The MLP with per-task parameters.

    Args:
        phi: ``(B, N_PARAMS)`` parameters, one row per task.
        x: ``(B, N, 1)`` inputs.

    Returns:
        ``(B, N, 1)`` predictions.
    """
    B = phi.shape[0]
    W1, b1, W2, b2, W3, b3 = (
        p.reshape(B, *s) for p, s in zip(phi.split([math.prod(s) for s in SHAPES], dim=1),
                                        SHAPES, strict=True)
    )
    h = ACTIVATION(torch.baddbmm(b1.unsqueeze(1), x, W1.transpose(1, 2)))
    h = ACTIVATION(torch.baddbmm(b2.unsqueeze(1), h, W2.transpose(1, 2)))
    return torch.baddbmm(b3.unsqueeze(1), h, W3.transpose(1, 2))


def sample_tasks(n_tasks: int, n_support: int, n_query: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Sinusoid tasks: support ``xs, ys`` of shape ``(B, n_support, 1)``, query ``xq, yq``."""
    amp = 0.1 + 4.9 * torch.rand(n_tasks, 1, 1, generator=gen)
    phase = math.pi * torch.rand(n_tasks, 1, 1, generator=gen)
    xs = 10 * torch.rand(n_tasks, n_support, 1, generator=gen) - 5
    xq = 10 * torch.rand(n_tasks, n_query, 1, generator=gen) - 5
    return {"xs": xs, "ys": amp * torch.sin(xs - phase), "xq": xq, "yq": amp * torch.sin(xq - phase)}


def task_mse(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task mean squared error, shape ``(B,)``."""
    return (mlp(phi, x) - y).square().mean(dim=(1, 2))


def proximal_objective(phi: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       lam: float) -> torch.Tensor:
    """iMAML's inner objective ``L_support(φ) + λ/2 ‖φ - θ‖²`` per task, shape ``(B,)``."""
    return task_mse(phi, x, y) + 0.5 * lam * (phi - theta).square().sum(1)


# --- adaptation: the three meta-gradients -----------------------------------------------------------
def adapt(method: str, theta: torch.Tensor, tasks: dict, steps: int, step_size: float, lam: float,
          cg_steps: int, imaml_solver: str = "gd") -> tuple[torch.Tensor, il.SolveInfo]:
    """Adapt ``θ`` to every task of the batch with ``steps`` gradient steps.

    Args:
        method: ``"iMAML"``, ``"MAML"`` or ``"FOMAML"``.
        theta: ``(N_PARAMS,)`` meta-parameters.
        tasks: from :func:`sample_tasks`.
        steps: inner gradient steps ``K``.
        step_size: inner step size.
        lam: iMAML's proximal weight ``λ``.
        cg_steps: iMAML's CG iterations in the backward pass.
        imaml_solver: iMAML's inner solver: ``"gd"`` (the same ``K`` gradient steps as MAML) or
            ``"lbfgs"`` (``K`` L-BFGS iterations, each one or a few gradient evaluations): the
            implicit gradient only needs the solution, not how it was found.

    Returns:
        ``(φ, info)``: adapted parameters ``(B, N_PARAMS)`` whose gradient to ``θ`` is the
        method's meta-gradient, and the forward solve's statistics.
    """
    B = tasks["xs"].shape[0]
    phi0 = theta.expand(B, -1)
    # A fixed budget of K steps, as in MAML: no tolerance (rtol = atol = 0), no warning.
    gd = il.solvers.GradientDescent(step_size, rtol=0.0, max_steps=steps, on_failure="ignore")
    if method == "iMAML":
        if imaml_solver == "lbfgs":
            gd = il.solvers.LBFGS(rtol=0.0, max_steps=steps, on_failure="ignore")
        elif imaml_solver != "gd":
            raise ValueError(f"imaml_solver must be 'gd' or 'lbfgs', got {imaml_solver!r}.")
        # CG with a fixed small budget, as in the paper; H + λI is positive definite for λ
        # above the most negative curvature of the task loss, which CG checks as it goes.
        cg = il.linear.CG(rtol=0.0, max_steps=cg_steps, on_failure="ignore")
        return il.argmin(proximal_objective, phi0.detach(), theta, tasks["xs"], tasks["ys"], lam,
                         solver=gd, backward=il.backward.Implicit(cg), batched=True,
                         return_info=True)
    if method == "MAML":
        # φ0 = θ carries the gradient; autograd records all K steps.
        return il.argmin(task_mse, phi0, tasks["xs"], tasks["ys"], solver=gd,
                         backward=il.backward.Unrolled(), batched=True, return_info=True)
    if method == "FOMAML":
        with torch.no_grad():
            phi, info = il.argmin(task_mse, phi0, tasks["xs"], tasks["ys"], solver=gd,
                                  batched=True, return_info=True)
        # dφ/dθ replaced by the identity: the meta-gradient is ∇L_query at φ_K.
        return theta + (phi - theta).detach(), info
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def meta_loss(method: str, theta: torch.Tensor, tasks: dict, cfg: dict, steps: int) -> torch.Tensor:
    """Mean post-adaptation query MSE over the tasks (differentiable in ``θ``)."""
    phi, _ = adapt(method, theta, tasks, steps, cfg["step_size"], cfg["lam"], cfg["cg_steps"],
                   cfg["imaml_solver"])
    return task_mse(phi, tasks["xq"], tasks["yq"]).mean()


def evaluate(method: str, theta: torch.Tensor, tasks: dict, cfg: dict) -> float:
    """Post-adaptation query MSE on held-out tasks (each method adapts as it was trained)."""
    phi, _ = adapt(method, theta.detach(), tasks, cfg["steps"], cfg["step_size"], cfg["lam"],
                   cfg["cg_steps"], cfg["imaml_solver"])
    with torch.no_grad():
        return float(task_mse(phi, tasks["xq"], tasks["yq"]).mean())


def train(method: str, cfg: dict, seed: int, held_out: dict) -> tuple[torch.Tensor, list[float], float, list]:
    """Meta-train with Adam.

    Returns:
        ``θ``, the meta-loss per step (on that step's random tasks), seconds per meta-step
        (evaluations excluded), and ``[(step, post-adaptation MSE on held_out)]`` at ``eval_at``.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = init_params(gen).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg["meta_lr"])
    task_gen = torch.Generator().manual_seed(seed + 1)  # same task stream for every method
    losses, curve, spent = [], [], 0.0
    for step in tqdm(range(cfg["meta_steps"] + 1), desc=f"meta-train {method}", leave=False):
        if step % cfg["eval_every"] == 0:
            curve.append((step, evaluate(method, theta, held_out, cfg)))
        if step == cfg["meta_steps"]:
            break
        t0 = time.perf_counter()
        tasks = sample_tasks(cfg["meta_batch"], cfg["shots"], cfg["query"], task_gen)
        loss = meta_loss(method, theta, tasks, cfg, cfg["steps"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        spent += time.perf_counter() - t0
    return theta.detach(), losses, spent / cfg["meta_steps"], curve


# --- memory and time per meta-step ------------------------------------------------------------
def measure(method: str, theta: torch.Tensor, tasks: dict, cfg: dict, steps: int,
            repeats: int) -> dict[str, float]:
    """Memory held for one meta-gradient and the median time of a full meta-step.

    Returns:
        ``saved_bytes``: bytes saved for backward and still held when the forward pass (the
        adaptation and the query loss) ends; ``peak_saved_bytes``: the most held at any time
        during it; ``seconds``: median wall time of forward + backward.
    """
    times = []
    for r in range(repeats):
        th = theta.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        if r == 0:
            with il.memory.SavedTensorBytes() as saved:
                loss = meta_loss(method, th, tasks, cfg, steps)
            held, peak = saved.live, saved.peak
        else:
            loss = meta_loss(method, th, tasks, cfg, steps)
        loss.backward()
        times.append(time.perf_counter() - t0)
    return {"saved_bytes": held, "peak_saved_bytes": peak, "seconds": statistics.median(times)}


# --- report ------------------------------------------------------------------------------------
def plot(eval_curves: dict[str, list], scan: dict, ks: list[int], out: Path, suffix: str = "") -> Path:
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 4))
    for method, curve in eval_curves.items():
        ax1.plot(*zip(*curve, strict=True), "o-", ms=3, label=method)
    ax1.set_yscale("log")
    # Plain numbers at 1, 2, 5 x 10^k: the default labels every minor tick as "4 x 10^-1".
    ax1.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax1.set_xlabel("meta-step")
    ax1.set_ylabel("held-out query MSE after K steps")
    ax1.set_title("meta-training")
    ax1.legend()
    for method in METHODS:
        ax2.plot(ks, [scan[method][k]["saved_bytes"] / 2**20 for k in ks], "o-", label=method)
        ax3.plot(ks, [1e3 * scan[method][k]["seconds"] for k in ks], "o-", label=method)
    ax2.set_xlabel("inner steps K")
    ax2.set_ylabel("saved for backward (MiB)")
    ax2.set_title("memory per meta-step")
    ax3.set_xlabel("inner steps K")
    ax3.set_ylabel("time per meta-step (ms)")
    ax3.set_title("time per meta-step")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    for ax in (ax2, ax3):
        ax.legend()
    fig.tight_layout()
    path = out / f"imaml_sinusoid{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the measured results (also printed; the plot goes to ``--out``).

    Returns:
        ``losses`` (meta-loss per meta-step per method), ``eval_curves`` (``[(step, MSE)]`` on
        fixed held-out validation tasks, per method), ``test_mse`` (post-adaptation test MSE
        per method, and ``"no adaptation"`` for iMAML's θ), ``test_mse_init`` (the same for the
        initial θ, before meta-training), ``sec_per_step`` (training),
        ``scan`` (``scan[method][K]`` = ``saved_bytes``, ``peak_saved_bytes``, ``seconds``),
        ``ks``, ``plot`` path.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/imaml, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5,
                        help="inner steps K used for meta-training and evaluation (all methods)")
    parser.add_argument("--imaml-solver", choices=["gd", "lbfgs"], default="gd",
                        help="iMAML's inner solver for its K steps (MAML and FOMAML use gd)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: these small problems are faster serial)")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "imaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    """The body of :func:`main` for parsed arguments."""
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = dict(shots=10, query=25, steps=args.steps, step_size=0.01, lam=2.0, cg_steps=5,
               imaml_solver=args.imaml_solver)
    if args.tiny:
        cfg.update(meta_batch=5, meta_steps=40, meta_lr=3e-3, eval_every=10, test_tasks=50,
                   scan_batch=2, repeats=1)
    else:
        cfg.update(meta_batch=25, meta_steps=5000, meta_lr=1e-3, eval_every=250, test_tasks=500,
                   scan_batch=25, repeats=5)
    ks = [5, 20, 100]
    print(f"MLP 1-40-40-1: {N_PARAMS} parameters; {cfg['shots']}-shot sinusoid tasks, meta-batch "
          f"{cfg['meta_batch']}, K = {cfg['steps']} inner steps of size {cfg['step_size']}, "
          f"λ = {cfg['lam']}, {cfg['cg_steps']} CG steps")

    test_tasks = sample_tasks(cfg["test_tasks"], cfg["shots"], cfg["query"],
                              torch.Generator().manual_seed(args.seed + 1000))
    held_out = sample_tasks(cfg["test_tasks"], cfg["shots"], cfg["query"],
                            torch.Generator().manual_seed(args.seed + 3000))
    curves, thetas, test_mse, sec, eval_curves = {}, {}, {}, {}, {}
    theta_init = init_params(torch.Generator().manual_seed(args.seed))  # what train() starts from
    test_mse_init = {m: evaluate(m, theta_init, test_tasks, cfg) for m in METHODS}
    for method in METHODS:
        thetas[method], curves[method], sec[method], eval_curves[method] = train(
            method, cfg, args.seed, held_out)
        test_mse[method] = evaluate(method, thetas[method], test_tasks, cfg)
    with torch.no_grad():
        test_mse["no adaptation"] = float(task_mse(
            thetas["iMAML"].expand(cfg["test_tasks"], -1), test_tasks["xq"], test_tasks["yq"]).mean())

    scan_tasks = sample_tasks(cfg["scan_batch"], cfg["shots"], cfg["query"],
                              torch.Generator().manual_seed(args.seed + 2000))
    scan = {m: {} for m in METHODS}
    for method in METHODS:
        for k in tqdm(ks, desc=f"memory/time {method}", leave=False):
            scan[method][k] = measure(method, thetas[method], scan_tasks, cfg, k, cfg["repeats"])

    print("\n| method | test MSE after K steps | s / meta-step (training) | "
          + " | ".join(f"saved MiB, K={k}" for k in ks) + " | "
          + " | ".join(f"ms / meta-step, K={k}" for k in ks) + " |")
    print("|---|" + "---:|" * (2 + 2 * len(ks)))
    for m in METHODS:
        mem = " | ".join(f"{scan[m][k]['saved_bytes'] / 2**20:.2f}" for k in ks)
        tms = " | ".join(f"{1e3 * scan[m][k]['seconds']:.1f}" for k in ks)
        print(f"| {m} | {test_mse[m]:.3f} | {sec[m]:.4f} | {mem} | {tms} |")
    for m in METHODS:
        print(f"{m}: peak saved-for-backward MiB during the forward, K = {ks}: "
              + ", ".join(f"{scan[m][k]['peak_saved_bytes'] / 2**20:.2f}" for k in ks))
    print(f"(iMAML's θ without adaptation: test MSE {test_mse['no adaptation']:.3f}; before "
          "meta-training, after adaptation: "
          + ", ".join(f"{m} {v:.3f}" for m, v in test_mse_init.items()) + ")")
    suffix = "" if args.imaml_solver == "gd" else f"_{args.imaml_solver}"
    path = plot(eval_curves, scan, ks, args.out, suffix)
    print(f"plot: {path}")
    return {"losses": curves, "eval_curves": eval_curves, "test_mse": test_mse,
            "test_mse_init": test_mse_init,
            "sec_per_step": sec, "scan": scan, "ks": ks,
            "plot": str(path), "config": cfg}


if __name__ == "__main__":
    main()
