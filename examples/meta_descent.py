"""Meta-descent: learning the learning rate by unrolled hypergradients, and short-horizon bias.

The inner problem is least-squares regression with an ill-conditioned design (Hessian
eigenvalues spread over two decades), trained by ``T`` steps of gradient descent with a
learnable step size::

    w_T(η) = il.argmin(L, w0, solver=il.solvers.GradientDescent(step_size=η, max_steps=T,
                                                                rtol=0, on_failure="ignore"),
                       backward=il.backward.Unrolled())

``dL(w_T(η))/dη`` comes from backpropagating through the ``T`` steps (the meta-descent graph of
the lecture). ``log η`` is tuned by Adam to minimise the loss *after T steps* (the horizon).

Short-horizon bias (Wu et al., 2018): the greedy horizon (``T = 1``) rewards the step that
reduces the loss most right now, which is dominated by the high-curvature directions, so it
picks a small ``η``; a long horizon values progress along the low-curvature directions and
picks a larger ``η``, close to the stability limit ``2 / h_max``. Trained for the full budget
``N``, the greedy learning rate ends with a much worse loss. The second part adapts ``η``
online (re-tuned every ``K`` steps with a look-ahead of ``T`` steps), giving a learning-rate
*schedule* per horizon.

Truncated backprop (``backward=Truncated(k)``: only the last ``k`` of the ``T`` steps are
differentiated) is shown for the longest horizon as well. Also checked here: the hypergradient
through ``GradientDescent(step_size=<tensor>)`` against central finite differences.

Run ``python examples/meta_descent.py`` (``--tiny`` for a quick check).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from _outputs import output_dir

import implicit_layers as il


def make_problem(n: int = 200, d: int = 20, cond: float = 100.0, seed: int = 0) -> dict:
    """Least squares ``L(w) = ||X w - y||² / (2n)`` whose Hessian has eigenvalues in ``[1/cond, 1]``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=dt))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    h = torch.logspace(0, -math.log10(cond), d, dtype=dt)  # Hessian eigenvalues
    X = math.sqrt(n) * u @ torch.diag(h.sqrt()) @ v.T
    w_true = torch.randn(d, generator=g, dtype=dt)
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=dt)
    w_star = torch.linalg.lstsq(X, y.unsqueeze(-1)).solution[:, 0]
    prob = {"X": X, "y": y, "h": h, "w0": torch.zeros(d, dtype=dt)}
    prob["loss_star"] = float(loss_fn(w_star, X, y))
    prob["eta_max"] = 2.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max())
    return prob


def loss_fn(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (X @ w - y).square().mean()


def unrolled_loss(prob: dict, eta: torch.Tensor, steps: int, w0: torch.Tensor | None = None,
                  truncate: int | None = None) -> torch.Tensor:
    """Excess loss ``L(w_T(η)) - L*`` after ``steps`` GD steps, differentiable in ``eta``.

    ``truncate=k``: truncated backprop, only through the last ``k`` of the ``steps`` steps
    (``steps - k`` forward steps, then ``backward=Truncated(k)`` takes and differentiates ``k``
    more steps with the same tensor step size).
    """
    if truncate is None:
        max_steps, backward = steps, il.backward.Unrolled()
    else:
        max_steps, backward = steps - truncate, il.backward.Truncated(truncate)
    solver = il.solvers.GradientDescent(step_size=eta, max_steps=max_steps, rtol=0.0, on_failure="ignore")
    w = il.argmin(loss_fn, prob["w0"] if w0 is None else w0, prob["X"], prob["y"], solver=solver,
                  backward=backward)
    return loss_fn(w, prob["X"], prob["y"]) - prob["loss_star"]


def tune_eta(prob: dict, horizon: int, meta_steps: int, eta0: float, meta_lr: float = 0.1,
             w0: torch.Tensor | None = None, truncate: int | None = None) -> tuple[float, list[float]]:
    """Adam on ``a``, ``η = η_max σ(a)``, minimising ``log`` of the excess loss after ``horizon`` steps.

    ``η_max = 2 / h_max`` is the stability limit of GD on the quadratic. Keeping ``η`` below it
    keeps the gradient norm decreasing along the run, so the iterate the solver returns (the
    one with the smallest gradient norm) is the last one, ``w_T``. The log makes the meta-objective
    scale-free: the excess loss spans many decades across horizons.
    """
    eta_max = prob["eta_max"]
    a = torch.tensor(math.log(eta0 / (eta_max - eta0)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=meta_lr)
    trace = []
    for _ in range(meta_steps):
        opt.zero_grad()
        loss = unrolled_loss(prob, eta_max * torch.sigmoid(a), horizon, w0, truncate)
        loss.log().backward()
        opt.step()
        trace.append(float(eta_max * torch.sigmoid(a.detach())))
    return trace[-1], trace


def gd_curve(prob: dict, eta: float, steps: int) -> list[float]:
    """Excess loss along ``steps`` plain GD steps with a constant ``eta``."""
    X, y, w = prob["X"], prob["y"], prob["w0"].clone()
    out = [float(loss_fn(w, X, y)) - prob["loss_star"]]
    for _ in range(steps):
        w = w - eta * X.T @ (X @ w - y) / X.shape[0]
        out.append(float(loss_fn(w, X, y)) - prob["loss_star"])
    return out


def fd_check(prob: dict, eta: float = 0.8, steps: int = 15, h: float = 1e-6) -> dict:
    """Unrolled hypergradient ``d L(w_T(η)) / dη`` vs a central finite difference (float64)."""
    e = torch.tensor(eta, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(unrolled_loss(prob, e, steps), e)
    with torch.no_grad():
        plus = unrolled_loss(prob, torch.tensor(eta + h, dtype=torch.float64), steps)
        minus = unrolled_loss(prob, torch.tensor(eta - h, dtype=torch.float64), steps)
    fd = float((plus - minus) / (2 * h))
    return {"autograd": float(grad), "finite_difference": fd,
            "rel_error": abs(float(grad) - fd) / max(abs(fd), 1e-300)}


def online(prob: dict, horizon: int, total: int, every: int, meta_steps: int, eta0: float) -> dict:
    """Re-tune ``η`` every ``every`` steps with a look-ahead of ``horizon`` steps, then take them."""
    X, y = prob["X"], prob["y"]
    w = prob["w0"].clone()
    eta, etas, losses = eta0, [], [float(loss_fn(w, X, y)) - prob["loss_star"]]
    for _ in range(total // every):
        eta, _ = tune_eta(prob, horizon, meta_steps, eta, w0=w)
        for _ in range(every):
            w = w - eta * X.T @ (X @ w - y) / X.shape[0]
            etas.append(eta)
            losses.append(float(loss_fn(w, X, y)) - prob["loss_star"])
    return {"etas": etas, "losses": losses}


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
    parser.add_argument("--budget", type=int, default=256, help="total GD steps N")
    parser.add_argument("--meta-steps", type=int, default=150)
    parser.add_argument("--tiny", action="store_true", help="short run for tests")
    parser.add_argument("--out", default=None,
                        help="output folder (default: out/meta_descent, untracked)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the documentation's figures in docs/img (tracked files)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.out = output_dir(args.out, args.write_docs, "meta_descent")
    from tqdm.auto import tqdm

    if args.tiny:
        budget, meta_steps, horizons, d = 64, 40, [1, 64], 10
        online_cfg = {"every": 16, "meta_steps": 30, "horizons": []}  # skipped in tiny mode
    else:
        budget, meta_steps, d = args.budget, args.meta_steps, 20
        horizons = sorted({1, 4, 16, 64, budget})
        online_cfg = {"every": 16, "meta_steps": 30, "horizons": [1, 16, 64]}
    prob = make_problem(d=d)
    eta0 = 0.5
    result: dict = {"budget": budget, "h_max": float(prob["h"].max()), "h_min": float(prob["h"].min()),
                    "eta_max": prob["eta_max"]}
    result["fd_check"] = fd_check(prob)
    print(f"hypergradient check (GradientDescent tensor step size, Unrolled): autograd "
          f"{result['fd_check']['autograd']:.8e}  central FD {result['fd_check']['finite_difference']:.8e}"
          f"  rel. error {result['fd_check']['rel_error']:.1e}")

    start = time.perf_counter()
    sweep = {}
    for T in tqdm(horizons, desc="horizons", disable=args.tiny):
        eta, trace = tune_eta(prob, T, meta_steps, eta0)
        curve = gd_curve(prob, eta, budget)
        sweep[T] = {"eta": eta, "trace": trace, "loss_at_horizon": curve[min(T, budget)],
                    "final_loss": curve[-1], "curve": curve}
        print(f"horizon T={T:4d}: tuned η = {eta:.4f} (η/η_max = {eta / prob['eta_max']:.3f})  "
              f"excess loss after T steps {curve[min(T, budget)]:.3e}  after N={budget}: {curve[-1]:.3e}")
    result["sweep"] = {
        T: {k: v for k, v in r.items() if k not in ("trace", "curve")} for T, r in sweep.items()
    }
    result["sweep_seconds"] = time.perf_counter() - start

    # Truncated backprop over the longest horizon: only the last k steps are differentiated.
    k = 8
    eta_tr, _ = tune_eta(prob, budget, meta_steps, eta0, truncate=k)
    curve = gd_curve(prob, eta_tr, budget)
    e = torch.tensor(eta0, dtype=torch.float64, requires_grad=True)
    (g_full,) = torch.autograd.grad(unrolled_loss(prob, e, budget), e)
    (g_trunc,) = torch.autograd.grad(unrolled_loss(prob, e, budget, truncate=k), e)
    # On a quadratic with a constant η every step contributes the same term -(I-ηH)^(T-1) g0 to
    # the hypergradient, so truncation to k steps scales it by exactly k / T.
    result["truncated"] = {"k": k, "eta": eta_tr, "final_loss": curve[-1],
                           "grad_ratio": float(g_trunc / g_full)}
    print(f"truncated / unrolled hypergradient at η0: {float(g_trunc / g_full):.6f} (k/T = {k / budget:.6f})")
    print(f"horizon T={budget:4d} with Truncated({k}): tuned η = {eta_tr:.4f} "
          f"(η/η_max = {eta_tr / prob['eta_max']:.3f})  after N={budget}: {curve[-1]:.3e}")

    start = time.perf_counter()
    sched = {}
    for T in tqdm(online_cfg["horizons"], desc="online", disable=args.tiny):
        sched[T] = online(prob, T, budget, online_cfg["every"], online_cfg["meta_steps"], eta0)
        print(f"online, look-ahead T={T:3d}: mean η {sum(sched[T]['etas']) / budget:.4f}  "
              f"final excess loss {sched[T]['losses'][-1]:.3e}")
    result["online"] = {T: {"final_loss": s["losses"][-1], "mean_eta": sum(s["etas"]) / budget,
                            "etas": s["etas"][:: online_cfg["every"]]} for T, s in sched.items()}
    result["online_seconds"] = time.perf_counter() - start
    if not args.no_plot:
        result["plot"] = plot(prob, sweep, sched, budget, args.out, "meta_descent_tiny.png" if args.tiny
                              else "meta_descent.png")
    return result


def plot(prob: dict, sweep: dict, sched: dict, budget: int, out: str, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    cmap = plt.get_cmap("viridis")
    Ts = sorted(sweep)
    etas = torch.logspace(-2, math.log10(1.99 / float(prob["h"].max())), 60, dtype=torch.float64)
    for i, T in enumerate(Ts):
        c = cmap(i / max(len(Ts) - 1, 1))
        with torch.no_grad():
            vals = [float(unrolled_loss(prob, e, T)) for e in etas]
        axes[0].loglog(etas, vals, color=c, label=f"T={T}")
        axes[0].plot(sweep[T]["eta"], sweep[T]["loss_at_horizon"], "o", color=c)
        axes[1].semilogy(sweep[T]["curve"], color=c, label=f"η*(T={T}) = {sweep[T]['eta']:.3f}")
    axes[0].set(title="loss after T steps vs η (dot: meta-descent optimum)", xlabel="η",
                ylabel="excess loss L(w_T) - L*")
    axes[0].legend(fontsize=7)
    axes[1].set(title=f"training {budget} steps with the tuned constant η", xlabel="GD step",
                ylabel="excess loss")
    axes[1].legend(fontsize=7)
    ax2 = axes[2]
    for i, (T, s) in enumerate(sorted(sched.items())):
        c = plt.get_cmap("plasma")(i / max(len(sched) - 1, 1) * 0.8)
        ax2.plot(range(1, len(s["etas"]) + 1), s["etas"], color=c, ls=("-", "--", ":")[i % 3],
                 label=f"look-ahead {T}: final excess loss {s['losses'][-1]:.2e}")
    ax2.axhline(prob["eta_max"], color="k", lw=0.5)
    ax2.set(title="online: η re-tuned every 16 steps", xlabel="GD step",
            ylabel="η (line: stability limit 2/h_max)")
    if sched:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
