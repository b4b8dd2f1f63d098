"""Problem 4: the linear solvers against theory and scipy.

* CG iterations to ``rtol = 1e-8`` vs the condition number ``κ`` (SPD matrices with a prescribed,
  log-uniform spectrum, ``n = 400``), beside ``scipy.sparse.linalg.cg`` at the same tolerance
  and the classical bound ``½ √κ ln(2 / rtol)``.
* Neumann (Richardson with step ``1 / λ_max``) iterations vs ``κ`` (theory ``κ ln(1 / rtol)``).
* GMRES and Broyden on non-symmetric systems ``(I - J) x = b`` with ``‖J‖₂ = ρ``, beside
  ``scipy.sparse.linalg.gmres``.
* The cost of a Hessian-vector product relative to a gradient (double backward), for the
  digits softmax-regression loss.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse.linalg as spla
import torch

import implicit_layers as il

from ._common import Config, Section, rel_err, time_alternating

RTOL = 1e-8


def spd_with_condition(n: int, kappa: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    eig = np.logspace(0, math.log10(kappa), n)
    return (Q * eig) @ Q.T


def _scipy_iters(fn, A: np.ndarray, b: np.ndarray, **kw) -> tuple[int, np.ndarray]:
    count = [0]

    def cb(_):
        count[0] += 1

    x, _ = fn(A, b, rtol=RTOL, atol=0.0, callback=cb, **kw)
    return count[0], x


def run_linsolve(cfg: Config) -> Section:
    section = Section("linsolve", f"Linear solvers vs theory and scipy (rtol {RTOL:g})")
    dev = cfg.torch_device
    n = 60 if cfg.tiny else 400
    kappas = [10, 1e3] if cfg.tiny else [10, 100, 1e3, 1e4]
    worst_gap = 0
    gaps = []
    for kappa in kappas:
        A = spd_with_condition(n, kappa)
        b = np.random.default_rng(1).standard_normal(n)
        At = torch.as_tensor(A, device=dev)
        bt = torch.as_tensor(b, device=dev).unsqueeze(0)
        op = il.linear.MatrixOperator(At, 1, symmetric=True, positive_definite=True)
        x_ref = np.linalg.solve(A, b)
        its_sp, x_sp = _scipy_iters(spla.cg, A, b, maxiter=20 * n)
        cg = il.linear.CG(rtol=RTOL, max_steps=20 * n)
        neu = il.linear.Neumann(rtol=RTOL, alpha=1.0 / kappa, max_steps=200_000, on_failure="ignore")
        methods = {
            "ours CG": lambda cg=cg, op=op, bt=bt: cg.solve(op, bt),
            "scipy cg": lambda A=A, b=b: spla.cg(A, b, rtol=RTOL, atol=0.0, maxiter=20 * n),
        }
        if kappa <= 1e3:
            methods["ours Neumann(1/λmax)"] = lambda neu=neu, op=op, bt=bt: neu.solve(op, bt)
        times, outs = time_alternating(methods, cfg, repeats=max(1, cfg.repeats // 2))
        bound = 0.5 * math.sqrt(kappa) * math.log(2 / RTOL)
        ours_its = int(outs["ours CG"][1].steps)
        worst_gap = max(worst_gap, abs(ours_its - its_sp))
        gaps.append(f"κ={kappa:g}: {ours_its} vs {its_sp}")
        case = f"SPD n={n} κ={kappa:g}"
        section.add(case=case, method="ours CG", steps=ours_its, scipy_steps=its_sp,
                    sqrt_kappa_bound=bound, time_ms=1e3 * times["ours CG"],
                    rel_err=rel_err(outs["ours CG"][0], x_ref))
        section.add(case=case, method="scipy cg", steps=its_sp, time_ms=1e3 * times["scipy cg"],
                    rel_err=rel_err(x_sp, x_ref))
        if "ours Neumann(1/λmax)" in outs:
            x, info = outs["ours Neumann(1/λmax)"]
            section.add(case=case, method="ours Neumann(1/λmax)", steps=int(info.steps),
                        kappa_bound=kappa * math.log(1 / RTOL),
                        time_ms=1e3 * times["ours Neumann(1/λmax)"], rel_err=rel_err(x, x_ref))
    section.target("CG iterations vs scipy cg (max |difference|)", "<= 1", worst_gap, worst_gap <= 1,
                   "; ".join(gaps))

    # non-symmetric: (I - J) x = b with ‖J‖ = rho
    for rho in [0.5, 0.95]:
        rng = np.random.default_rng(2)
        J = rng.standard_normal((n, n))
        J = rho * J / np.linalg.norm(J, 2)
        M = np.eye(n) - J
        b = rng.standard_normal(n)
        x_ref = np.linalg.solve(M, b)
        Mt = torch.as_tensor(M, device=dev)
        op = il.linear.MatrixOperator(Mt, 1, symmetric=False)
        bt = torch.as_tensor(b, device=dev).unsqueeze(0)
        solvers = {
            "ours GMRES(20)": il.linear.GMRES(rtol=RTOL, restart=20),
            "ours Broyden": il.linear.Broyden(rtol=RTOL, max_steps=20 * n),
            "ours Neumann": il.linear.Neumann(rtol=RTOL, max_steps=20 * n),
        }
        methods = {k: (lambda s=s, op=op, bt=bt: s.solve(op, bt)) for k, s in solvers.items()}
        methods["scipy gmres(20)"] = lambda M=M, b=b: spla.gmres(M, b, rtol=RTOL, atol=0.0, restart=20,
                                                                   maxiter=20 * n)
        times, outs = time_alternating(methods, cfg, repeats=max(1, cfg.repeats // 2))
        its_sp, _ = _scipy_iters(spla.gmres, M, b, restart=20, maxiter=20 * n, callback_type="pr_norm")
        case = f"non-symmetric n={n} ‖J‖={rho}"
        for k in solvers:
            x, info = outs[k]
            section.add(case=case, method=k, steps=int(info.steps), time_ms=1e3 * times[k],
                        rel_err=rel_err(x, x_ref))
        section.add(case=case, method="scipy gmres(20)", steps=its_sp,
                    time_ms=1e3 * times["scipy gmres(20)"],
                    rel_err=rel_err(outs["scipy gmres(20)"][0], x_ref))

    # HVP vs gradient cost
    from sklearn.datasets import load_digits

    Xd, yd = load_digits(return_X_y=True)
    X = torch.as_tensor(Xd / 16.0, device=dev)
    y = torch.as_tensor(yd, device=dev)
    w = torch.zeros(X.shape[1] * 10, dtype=X.dtype, device=dev)
    v = torch.randn(w.shape, dtype=X.dtype, device=dev, generator=torch.Generator(device=dev).manual_seed(0))

    def loss(w):
        return torch.nn.functional.cross_entropy(X @ w.view(X.shape[1], 10), y) + 1e-3 * (w * w).sum()

    def grad_only():
        wr = w.clone().requires_grad_(True)
        return torch.autograd.grad(loss(wr), wr)[0]

    def hvp_double_backward():
        wr = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(wr), wr, create_graph=True)
        return torch.autograd.grad(g, wr, v)[0]

    def hvp_func_jvp():
        return torch.func.jvp(torch.func.grad(loss), (w,), (v,))[1]

    times, outs = time_alternating(
        {"gradient": grad_only, "HVP double backward": hvp_double_backward,
         "HVP torch.func jvp(grad)": hvp_func_jvp},
        cfg,
    )
    for k in times:
        section.add(case="digits softmax regression (650 params)", method=k, time_ms=1e3 * times[k],
                    ratio_to_gradient=times[k] / times["gradient"])
    section.add(case="digits softmax regression (650 params)", method="HVP agreement",
                rel_err=rel_err(outs["HVP double backward"], outs["HVP torch.func jvp(grad)"]))
    return section
