"""iMAML meta-gradient on sinusoid regression (Rajeswaran et al., 2019), ours vs torchopt.

MLP 1-40-40-1 (1761 parameters, one flat vector; tanh, and ReLU as a second case), proximal inner problem
``φ*(θ) = argmin_φ L_train(φ) + λ/2 ‖φ - θ‖²`` with λ = 2, solved by 20 gradient steps that
every method shares; the meta-gradient ``∇_θ L_test(φ*)`` is then obtained by implicit
differentiation with CG. Reference: the dense solve ``λ (H + λ I)⁻¹ ∇L_test`` with the exact
Hessian ``H`` at the same ``φ``.
"""

from __future__ import annotations

import numpy as np
import torch

import implicit_layers as il

from ._common import (
    COMPILED,
    Config,
    Section,
    add_failures,
    first_calls,
    paired_times,
    peer_or_note,
    rel_err,
    time_alternating,
)

LAM = 2.0
SIZES = [(1, 40), (40, 40), (40, 1)]
TINY_SIZES = [(1, 8), (8, 8), (8, 1)]
FORWARD_ALONE = "forward alone (shared by all)"


def mlp(phi: torch.Tensor, x: torch.Tensor, act=torch.tanh) -> torch.Tensor:
    """The MLP whose flat parameter vector is ``phi`` (its length picks the width)."""
    sizes = SIZES if phi.numel() == n_params(SIZES) else TINY_SIZES
    i = 0
    h = x
    for k, (a, b) in enumerate(sizes):
        W = phi[i:i + a * b].view(b, a)
        i += a * b
        c = phi[i:i + b]
        i += b
        h = h @ W.T + c
        if k < len(sizes) - 1:
            h = act(h)
    return h


def n_params(sizes: list[tuple[int, int]] = SIZES) -> int:
    return sum(a * b + b for a, b in sizes)


def make_task(seed: int, device: torch.device, tiny: bool = False, act=torch.tanh) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    xs = rng.uniform(-5, 5, (20, 1))
    ys = amp * np.sin(xs + phase)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    theta = torch.as_tensor(rng.standard_normal(n_params(TINY_SIZES if tiny else SIZES)) * 0.1,
                            device=device)
    D = {"xs": t(xs[:10]), "ys": t(ys[:10]), "xq": t(xs[10:]), "yq": t(ys[10:])}
    # Meta-parameters pre-fit on the support set (a stand-in for a meta-trained θ): at a random
    # θ the training-loss Hessian has eigenvalues near -11 < -λ, the proximal problem is not
    # convex there and no CG-based meta-gradient (ours or a peer's) is defined.
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((mlp(theta, D["xs"], act) - D["ys"]) ** 2).mean().backward()
        opt.step()
    D["theta"] = theta.detach()
    return D


def run_imaml(cfg: Config) -> Section:
    section = Section("imaml", "iMAML sinusoid meta-gradient per task (MLP 1-40-40-1, λ=2, 20 inner steps)")
    for act_name in ("tanh",) if cfg.tiny else ("tanh", "relu"):
        _imaml_case(cfg, section, act_name)
    return section


def _imaml_case(cfg: Config, section: Section, act_name: str) -> None:
    act = getattr(torch, act_name)
    D = make_task(0, cfg.torch_device, tiny=cfg.tiny, act=act)
    xs, ys, xq, yq, theta0 = D["xs"], D["ys"], D["xq"], D["yq"], D["theta"]
    inner_steps, lr = (5 if cfg.tiny else 20), 0.02

    def train_loss(phi):
        return ((mlp(phi, xs, act) - ys) ** 2).mean()

    def test_loss(phi):
        return ((mlp(phi, xq, act) - yq) ** 2).mean()

    def optimality(phi, theta):
        # torch.func.grad composes with both autograd (ours) and functorch.vjp (torchopt)
        return torch.func.grad(train_loss)(phi) + LAM * (phi - theta)

    def forward(theta):
        phi = theta.detach().clone()
        theta = theta.detach()
        with torch.enable_grad():  # torchopt runs the solver under no_grad
            for _ in range(inner_steps):
                p = phi.requires_grad_(True)
                (g,) = torch.autograd.grad(train_loss(p) + 0.5 * LAM * ((p - theta) ** 2).sum(), p)
                phi = (p - lr * g).detach()
        return phi

    # dense reference at the same φ
    phi = forward(theta0)
    H = torch.func.hessian(train_loss)(phi)
    gq = torch.func.grad(test_loss)(phi)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    ref = LAM * torch.linalg.solve(H + LAM * eye, gq)

    def ours(backward):
        @il.custom_root(optimality, backward=backward, symmetric=True, rtol=1e-10)
        def solve(phi0, theta):
            return forward(theta)

        def run():
            theta = theta0.clone().requires_grad_(True)
            return torch.autograd.grad(test_loss(solve(theta0, theta)), theta)[0]

        return run

    lam_min = float(torch.linalg.eigvalsh(H)[0]) + LAM
    section.notes.append(
        f"{act_name} MLP: smallest eigenvalue of H + λI at φ: {lam_min:.3g}"
        + (" (indefinite: CG is not guaranteed; ours CG stops at negative curvature and warns, "
           "MINRES is the matching solver)" if lam_min <= 0 else "")
    )
    methods = {"ours CG 1e-10": ours(il.linear.CG(rtol=1e-10, max_steps=400, on_failure="ignore")),
               "ours MINRES 1e-10": ours(il.linear.MINRES(rtol=1e-10, max_steps=400)),
               "ours Dense": ours(il.linear.Dense())}
    if not cfg.tiny:  # the tiny run (the test suite's) skips its compilation (tens of seconds)
        methods[COMPILED] = ours(il.backward.CompiledImplicit(
            il.linear.CG(rtol=1e-10, max_steps=400, on_failure="ignore")))
    peers = peer_or_note(section, "torchopt")
    if peers is not None:
        (torchopt,) = peers

        def topt(solve_fn):
            @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve_fn)
            def solve(phi0, theta):
                return forward(theta)

            def run():
                theta = theta0.clone().requires_grad_(True)
                return torch.autograd.grad(test_loss(solve(theta0, theta)), theta)[0]

            return run

        methods["torchopt CG 1e-10"] = topt(torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=200))
        methods["torchopt CG maxiter 20"] = topt(torchopt.linear_solve.solve_cg(maxiter=20))
        methods["torchopt default (normal CG)"] = topt(None)
    # The shared forward alone, timed in the same rounds: the floor of every method's time.
    methods[FORWARD_ALONE] = lambda: forward(theta0)
    first = first_calls(methods)
    times, outs = time_alternating(methods, cfg)
    forward_t = times.pop(FORWARD_ALONE, None)
    for k, t in times.items():
        section.add(case=f"{act_name} MLP, one task", method=k, time_ms=1e3 * t,
                    grad_rel_err=rel_err(outs[k], ref), first_call_s=first.get(k))
    if forward_t is not None:
        section.add(case=f"{act_name} MLP, one task", method=FORWARD_ALONE,
                    time_ms=1e3 * forward_t, grad_rel_err=None)
    add_failures(section, f"{act_name} MLP, one task")
    errs = {r["method"]: r["grad_rel_err"] for r in section.rows
            if r.get("grad_rel_err") is not None and r["case"].startswith(act_name)}
    if "torchopt CG 1e-10" in times:
        bar = max(errs["torchopt CG 1e-10"], 1e-8)
        ok = {k: times[k] for k in times if k.startswith("ours") and errs[k] <= bar}
        if ok:
            best = min(ok, key=ok.get)
            r = ok[best] / times["torchopt CG 1e-10"]
            floor = (f"; floor: the shared forward alone is {forward_t / times['torchopt CG 1e-10']:.2f}x"
                     if forward_t is not None else "")
            section.target(f"iMAML ({act_name} MLP): ours/torchopt CG 1e-10 (equal accuracy)", "<= 0.5",
                           r, r <= 0.5,
                           f"{best} (err {errs[best]:.1e}) vs torchopt (err {errs['torchopt CG 1e-10']:.1e})"
                           + floor)
        if COMPILED in ok:
            t_c, t_t = paired_times(methods, COMPILED, "torchopt CG 1e-10", cfg)
            section.target(f"iMAML ({act_name} MLP): ours (compiled solve) / torchopt CG 1e-10", "<= 0.7",
                           t_c / t_t, t_c / t_t <= 0.7,
                           f"{1e3 * t_c / 2:.2f} vs {1e3 * t_t / 2:.2f} ms (paired re-timing); first "
                           f"call {first[COMPILED]:.1f} s")
    if act_name == "tanh":
        section.notes.append(
            f"Forward (shared by all methods): {inner_steps} gradient steps of size {lr}; times include it."
        )
