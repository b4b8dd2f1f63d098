"""Problem 2: deep-equilibrium layers, forward + backward, against torchdeq and jaxopt.

``z* = tanh(W z* + U x + b)`` for a batch of 64 inputs, as in the team's reference
measurements of the peers: numpy ``default_rng(0)`` draws ``G`` (hidden × hidden), then ``U``,
``b``, ``x`` and the target ``t`` in that order; easy ``W = 0.9 G / ‖G‖₂``, hard
``W = 0.95 Q`` (``Q`` the orthogonal factor of ``G``), ``U = s N(0,1) / √64`` with ``s = 1``
(easy) or ``0.3`` (hard), ``b = 0.1 N(0,1)``; loss ``Σ (z* - t)² / 64``; gradients with
respect to ``W`` and ``x``.

Plus a small DEQ MLP block ``z* = tanh(W₂ relu(W₁ z* + V x) + c)`` (inner width = hidden,
batch 64, input 64): numpy ``default_rng(1)`` draws ``G₁``, ``G₂``, ``V``, ``c``, ``x``, ``t``
in that order; ``W₁ = Q₁`` and ``W₂ = 0.9 Q₂`` (``Qᵢ`` the orthogonal factor of ``Gᵢ``), so
the map is a contraction with Lipschitz constant <= 0.9 (all singular values of ``W₁`` are 1
and of ``W₂`` are 0.9; relu and tanh are 1-Lipschitz) and Picard needs a few dozen steps at
1e-10. ``V = N(0,1) / √64``, ``c = 0.1 N(0,1)``; loss ``Σ (z* - t)² / 64``; gradients with
respect to ``W₁``, ``W₂`` and ``x``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

import implicit_layers as il

from ._common import (
    Config,
    Section,
    add_failures,
    paired_times,
    peer_or_note,
    rel_err,
    time_alternating,
    to_numpy,
)
from .deq_reuse import run_reuse

TOL = 1e-10


def make_deq(kind: str, hidden: int = 256, batch: int = 64, inp: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    G = rng.standard_normal((hidden, hidden))
    s = 1.0 if kind == "easy" else 0.3
    U = s * rng.standard_normal((hidden, inp)) / np.sqrt(inp)
    b = 0.1 * rng.standard_normal(hidden)
    x = rng.standard_normal((batch, inp))
    t = 0.5 * rng.standard_normal((batch, hidden))
    if kind == "easy":
        W = 0.9 * G / np.linalg.norm(G, 2)
    else:
        W = 0.95 * np.linalg.qr(G)[0]
    return {"W": W, "U": U, "b": b, "x": x, "t": t}


def f_tanh(z: torch.Tensor, x: torch.Tensor, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor):
    return torch.tanh(z @ W.T + x @ U.T + b)


def f_inj(z: torch.Tensor, inj: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The same map with the input injection ``U x + b`` computed once outside the solver
    loop (as every method here does; the gradient reaches ``x`` through ``inj``)."""
    return torch.tanh(z @ W.T + inj)


def reference(T: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Machine-precision fixed point (Picard) and the dense IFT gradient ``(dW, dx, z*)``."""
    W, U, b, x, t = T["W"], T["U"], T["b"], T["x"], T["t"]
    z = torch.zeros_like(t)
    with torch.no_grad():
        for _ in range(5000):
            zn = f_tanh(z, x, W, U, b)
            if float((zn - z).abs().max()) < 1e-15:
                z = zn
                break
            z = zn
    g = 2 * (z - t) / t.shape[0]
    D = 1 - z**2  # (B, n): J_i = diag(D_i) W
    n = z.shape[1]
    A = torch.eye(n, dtype=z.dtype, device=z.device) - D[:, :, None] * W[None]  # I - J_i
    u = torch.linalg.solve(A.mT, g.unsqueeze(-1)).squeeze(-1)
    Wr, xr = W.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fz = f_tanh(z, xr, Wr, U, b)
    dW, dx = torch.autograd.grad((fz * u).sum(), (Wr, xr))
    return dW, dx, z


def _grads(z: torch.Tensor, t: torch.Tensor, W: torch.Tensor, x: torch.Tensor):
    loss = ((z - t) ** 2).sum() / t.shape[0]
    return torch.autograd.grad(loss, (W, x))


def deq_methods(T: dict[str, torch.Tensor], cfg: Config, section: Section, full: bool = True):
    """name -> callable returning ``((dW, dx), forward steps)``."""
    W0, U, b, x0, t = T["W"], T["U"], T["b"], T["x"], T["t"]
    fwd_cap = 2000

    def ours(solver, backward):
        def run():
            W, x = W0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
            z, info = il.fixed_point(
                f_inj, torch.zeros_like(t), x @ U.T + b, W, solver=solver, backward=backward,
                batched=True, return_info=True,
            )
            return _grads(z, t, W, x), int(info.steps.max())

        return run

    A = functools.partial(il.solvers.Anderson, rtol=TOL, max_steps=fwd_cap)
    methods = {
        # the defaults: float64's default tolerance is TOL
        "ours default": ours(None, None),
        "ours Anderson+GMRES": ours(A(), il.linear.GMRES(rtol=TOL)),
        "ours Anderson+Broyden": ours(A(), il.linear.Broyden(rtol=TOL, max_steps=fwd_cap)),
        "ours Anderson+Neumann": ours(A(), il.linear.Neumann(rtol=TOL, max_steps=fwd_cap)),
        "ours Picard+Neumann": ours(
            il.solvers.Picard(rtol=TOL, max_steps=fwd_cap), il.linear.Neumann(rtol=TOL, max_steps=fwd_cap)
        ),
    }
    if full:
        methods["ours Broyden+GMRES"] = ours(
            il.solvers.Broyden(rtol=TOL, max_steps=fwd_cap), il.linear.GMRES(rtol=TOL)
        )

    def unrolled(K: int):
        def run():
            W, x = W0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
            z = torch.zeros_like(t)
            inj = x @ U.T + b
            for _ in range(K):
                z = f_inj(z, inj, W)
            return _grads(z, t, W, x), K

        return run

    methods["unrolled Picard K=30"] = unrolled(30)

    peers = peer_or_note(section, "torchdeq")
    if peers is not None:
        (torchdeq,) = peers

        def tdeq(**kw):
            deq = torchdeq.get_deq(**kw)

            def run():
                W, x = W0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
                inj = x @ U.T + b
                zs, info = deq(lambda z: torch.tanh(z @ W.T + inj), torch.zeros_like(t))
                return _grads(zs[-1], t, W, x), int(info["nstep"].max())

            return run

        tight = dict(ift=True, f_tol=TOL, b_tol=TOL, f_max_iter=fwd_cap // 4, b_max_iter=fwd_cap // 4,
                     f_stop_mode="rel", b_stop_mode="rel")
        for name in (["anderson", "broyden", "fixed_point_iter"] if full else ["fixed_point_iter"]):
            methods[f"torchdeq {name} IFT 1e-10"] = tdeq(f_solver=name, b_solver=name, **tight)
        methods["torchdeq defaults"] = tdeq()
        methods["torchdeq defaults + ift"] = tdeq(ift=True)
    peers = peer_or_note(section, "jax", "jaxopt")
    if peers is not None:
        methods.update(_jax_deq(T, *peers, fwd_cap))
    return methods


def _jax_deq(T: dict[str, torch.Tensor], jax, jaxopt, maxiter: int) -> dict:
    jnp = jax.numpy
    W0, U, b, x0, t = (jnp.asarray(T[k].cpu().numpy()) for k in ("W", "U", "b", "x", "t"))
    # jaxopt stops on the whole-batch norm ‖z_{k+1} - z_k‖ <= tol (absolute): scale it by ‖z*‖
    # so that it matches a relative tolerance of 1e-10.
    znorm = float(np.linalg.norm(T["_z"].cpu().numpy()))
    solve = functools.partial(jaxopt.linear_solve.solve_gmres, tol=TOL)

    def T_map(z, W, inj):
        return jnp.tanh(z @ W.T + inj)

    out = {}
    for name, cls in (("FixedPointIteration", jaxopt.FixedPointIteration),
                      ("AndersonAcceleration", jaxopt.AndersonAcceleration)):
        solver = cls(fixed_point_fun=T_map, tol=TOL * znorm, maxiter=maxiter, implicit_diff_solve=solve)

        def loss(W, x, solver=solver):
            z = solver.run(jnp.zeros_like(t), W, x @ U.T + b).params
            return jnp.sum((z - t) ** 2) / t.shape[0]

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        out[f"jaxopt {name} (jit)"] = functools.partial(lambda g: (g(W0, x0), -1), grad)
    return out


def make_mlp(hidden: int = 256, batch: int = 64, inp: int = 64) -> dict[str, np.ndarray]:
    """Data of the DEQ MLP block (inner width = ``hidden``), see the module docstring."""
    rng = np.random.default_rng(1)
    G1 = rng.standard_normal((hidden, hidden))
    G2 = rng.standard_normal((hidden, hidden))
    V = rng.standard_normal((hidden, inp)) / np.sqrt(inp)
    c = 0.1 * rng.standard_normal(hidden)
    x = rng.standard_normal((batch, inp))
    t = 0.5 * rng.standard_normal((batch, hidden))
    # orthogonal factors: ‖W2‖ ‖W1‖ = 0.9 bounds the Lipschitz constant, and with all singular
    # values equal the contraction is slow enough (a few dozen Picard steps at 1e-10) to
    # exercise the solvers; Gaussian matrices scaled to norm 0.9 converge in ~13 steps
    W1 = np.linalg.qr(G1)[0]
    W2 = 0.9 * np.linalg.qr(G2)[0]
    return {"W1": W1, "W2": W2, "V": V, "c": c, "x": x, "t": t}


def f_mlp(z: torch.Tensor, inj: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
          c: torch.Tensor) -> torch.Tensor:
    """The MLP block with the injection ``V x`` computed once outside the solver loop.

    Args:
        z: (B, n) state. inj: (B, m) ``x Vᵀ``. W1: (m, n). W2: (n, m). c: (n,).

    Returns:
        (B, n) ``tanh(relu(z W1ᵀ + inj) W2ᵀ + c)``.
    """
    return torch.tanh(torch.relu(z @ W1.T + inj) @ W2.T + c)


def reference_mlp(T: dict[str, torch.Tensor]):
    """Machine-precision fixed point (Picard) and the dense IFT gradient ``(dW1, dW2, dx, z*)``.

    Per sample ``J_i = P_i Q_i`` with ``P_i = diag(1 - z_i²) W2[:, a]`` and ``Q_i = W1[a]`` over
    the active inner units ``a = {h_i > 0}`` (``h_i = W1 z_i + V x_i``), and
    ``(I - J_i)ᵀ u_i = ∂L/∂z_i`` is solved exactly through the Woodbury identity
    ``u_i = g_i + Q_iᵀ (I - Q_i P_i)⁻ᵀ P_iᵀ g_i``: one dense LU of size ``|a|`` (about n/2)
    instead of n, five times fewer flops than forming ``I - J_i``.
    """
    W1, W2, V, c, x, t = (T[k] for k in ("W1", "W2", "V", "c", "x", "t"))
    inj = x @ V.T
    z = torch.zeros_like(t)
    best, since = float("inf"), 0
    with torch.no_grad():
        for _ in range(5000):
            zn = f_mlp(z, inj, W1, W2, c)
            diff = float((zn - z).abs().max())
            z = zn
            # at n = 1024 rounding keeps the step at a few 1e-15: stop once it stops shrinking
            best, since = (diff, 0) if diff < best else (best, since + 1)
            if diff < 1e-15 or since >= 20:
                break
    g = 2 * (z - t) / t.shape[0]
    active = (z @ W1.T + inj) > 0
    D = 1 - z**2
    u = torch.empty_like(z)
    for i in range(z.shape[0]):  # one sample at a time: (k, k) memory instead of (B, n, n)
        a = active[i]
        P, Q = D[i, :, None] * W2[:, a], W1[a]
        S = torch.eye(Q.shape[0], dtype=z.dtype, device=z.device) - Q @ P
        u[i] = g[i] + Q.T @ torch.linalg.solve(S.T, P.T @ g[i])
    W1r, W2r, xr = (T[k].clone().requires_grad_(True) for k in ("W1", "W2", "x"))
    fz = f_mlp(z, xr @ V.T, W1r, W2r, c)
    dW1, dW2, dx = torch.autograd.grad((fz * u).sum(), (W1r, W2r, xr))
    return dW1, dW2, dx, z


def mlp_methods(T: dict[str, torch.Tensor], cfg: Config, section: Section, full: bool = True):
    """name -> callable returning ``((dW1, dW2, dx), forward steps)`` for the MLP block."""
    W10, W20, V, c, x0, t = (T[k] for k in ("W1", "W2", "V", "c", "x", "t"))
    fwd_cap = 2000

    def leaves():
        return tuple(v.clone().requires_grad_(True) for v in (W10, W20, x0))

    def grads(z, params):
        loss = ((z - t) ** 2).sum() / t.shape[0]
        return torch.autograd.grad(loss, params)

    def ours(solver, backward):
        def run():
            W1, W2, x = leaves()
            z, info = il.fixed_point(
                f_mlp, torch.zeros_like(t), x @ V.T, W1, W2, c, solver=solver, backward=backward,
                batched=True, return_info=True,
            )
            return grads(z, (W1, W2, x)), int(info.steps.max())

        return run

    A = functools.partial(il.solvers.Anderson, rtol=TOL, max_steps=fwd_cap)
    methods = {
        "ours default": ours(None, None),
        "ours Picard+Neumann": ours(il.solvers.Picard(rtol=TOL, max_steps=fwd_cap),
                                    il.linear.Neumann(rtol=TOL, max_steps=fwd_cap)),
        "ours Anderson+GMRES": ours(A(), il.linear.GMRES(rtol=TOL)),
        "ours Anderson+Neumann": ours(A(), il.linear.Neumann(rtol=TOL, max_steps=fwd_cap)),
    }

    peers = peer_or_note(section, "torchdeq")
    if peers is not None:
        (torchdeq,) = peers

        def tdeq(**kw):
            deq = torchdeq.get_deq(**kw)

            def run():
                W1, W2, x = leaves()
                inj = x @ V.T
                zs, info = deq(lambda z: f_mlp(z, inj, W1, W2, c), torch.zeros_like(t))
                return grads(zs[-1], (W1, W2, x)), int(info["nstep"].max())

            return run

        tight = dict(ift=True, f_tol=TOL, b_tol=TOL, f_max_iter=fwd_cap // 4, b_max_iter=fwd_cap // 4,
                     f_stop_mode="rel", b_stop_mode="rel")
        for name in (["fixed_point_iter", "anderson"] if full else ["fixed_point_iter"]):
            methods[f"torchdeq {name} IFT 1e-10"] = tdeq(f_solver=name, b_solver=name, **tight)
        methods["torchdeq defaults"] = tdeq()
        methods["torchdeq defaults + ift"] = tdeq(ift=True)
    peers = peer_or_note(section, "jax", "jaxopt")
    if peers is not None:
        methods.update(_jax_mlp(T, *peers, fwd_cap))
    return methods


def _jax_mlp(T: dict[str, torch.Tensor], jax, jaxopt, maxiter: int) -> dict:
    jnp = jax.numpy
    W10, W20, V, c, x0, t = (jnp.asarray(T[k].cpu().numpy()) for k in ("W1", "W2", "V", "c", "x", "t"))
    # absolute whole-batch stopping rule scaled by ‖z*‖, as in _jax_deq
    znorm = float(np.linalg.norm(T["_z"].cpu().numpy()))
    solve = functools.partial(jaxopt.linear_solve.solve_gmres, tol=TOL)

    def T_map(z, W1, W2, inj):
        return jnp.tanh(jnp.maximum(z @ W1.T + inj, 0) @ W2.T + c)

    solver = jaxopt.FixedPointIteration(fixed_point_fun=T_map, tol=TOL * znorm, maxiter=maxiter,
                                        implicit_diff_solve=solve)

    def loss(W1, W2, x):
        z = solver.run(jnp.zeros_like(t), W1, W2, x @ V.T).params
        return jnp.sum((z - t) ** 2) / t.shape[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return {"jaxopt FixedPointIteration (jit)": lambda: (grad(W10, W20, x0), -1)}


def run_deq(cfg: Config) -> Section:
    section = Section("deq", "DEQ z = tanh(Wz + Ux + b): forward + backward at rtol 1e-10")
    section.notes.append(
        "Forward and backward tolerance 1e-10 (relative) for every tight configuration; "
        "'torchdeq defaults' is get_deq() as shipped (40 Picard steps, tol 1e-3, no IFT). "
        "Errors: relative error of (dL/dW, dL/dx) against the dense IFT gradient at a "
        "machine-precision fixed point. 'steps' = forward steps of the worst sample."
    )
    cases = [("easy", 32, 16)] if cfg.tiny else [("easy", 256, 64), ("hard", 256, 64), ("easy", 1024, 64)]
    for kind, hidden, batch in cases:
        data = make_deq(kind, hidden=hidden, batch=batch)
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=cfg.torch_device) for k, v in data.items()}
        dW_ref, dx_ref, zref = reference(T)
        T["_z"] = zref
        full = hidden <= 256
        methods = deq_methods(T, cfg, section, full=full)
        times, outs = time_alternating(methods, cfg, repeats=None if full else max(1, cfg.repeats // 2))
        case = f"{kind} n={hidden} B={batch}"
        for name, sec in times.items():
            (dW, dx), steps = outs[name]
            err = rel_err(np.concatenate([to_numpy(dW).ravel(), to_numpy(dx).ravel()]),
                          np.concatenate([dW_ref.cpu().numpy().ravel(), dx_ref.cpu().numpy().ravel()]))
            section.add(case=case, method=name, time_ms=1e3 * sec, grad_rel_err=err,
                        fwd_steps=steps if steps >= 0 else None)
        add_failures(section, case)
        _default_target(section, case, times, section.rows, methods, cfg,
                        repeats=None if full else max(1, cfg.repeats // 2))
        if hidden == (32 if cfg.tiny else 256):
            _deq_targets(section, case, times, section.rows)
    _run_mlp(cfg, section)
    run_reuse(cfg, section)
    return section


def _run_mlp(cfg: Config, section: Section) -> None:
    """The DEQ MLP block rows (errors against :func:`reference_mlp`)."""
    section.notes.append(
        "MLP block z = tanh(W2 relu(W1 z + V x) + c), inner width = hidden: gradients of "
        "(W1, W2, x) against the dense IFT gradient (per-sample exact solve of (I - J)^T u = g, "
        "Woodbury over the active relu units) at a machine-precision fixed point."
    )
    for hidden, batch in ([(32, 16)] if cfg.tiny else [(256, 64), (1024, 64)]):
        data = make_mlp(hidden=hidden, batch=batch)
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=cfg.torch_device) for k, v in data.items()}
        *ref, zref = reference_mlp(T)
        T["_z"] = zref
        ref_flat = np.concatenate([to_numpy(r).ravel() for r in ref])
        methods = mlp_methods(T, cfg, section, full=not cfg.tiny)
        reps = None if hidden <= 256 else max(1, cfg.repeats // 2)
        times, outs = time_alternating(methods, cfg, repeats=reps)
        case = f"mlp n={hidden} B={batch}"
        for name, sec in times.items():
            grads, steps = outs[name]
            err = rel_err(np.concatenate([to_numpy(g).ravel() for g in grads]), ref_flat)
            section.add(case=case, method=name, time_ms=1e3 * sec, grad_rel_err=err,
                        fwd_steps=steps if steps >= 0 else None)
        add_failures(section, case)
        _default_target(section, case, times, section.rows, methods, cfg, repeats=reps)
        if hidden == (32 if cfg.tiny else 256):
            _deq_targets(section, case, times, section.rows)


def _default_target(
    section: Section, case: str, times: dict, rows: list, methods: dict | None = None,
    cfg: Config | None = None, repeats: int | None = None,
) -> None:
    """The defaults against the fastest of our configurations at the same accuracy (given
    ``methods`` and ``cfg``, the two re-timed as a pair, see ``paired_times``)."""
    errs = {r["method"]: r["grad_rel_err"] for r in rows if r["case"] == case}
    if "ours default" not in times:
        return
    # equal accuracy: within 10x of the default's error (all are ~1e-10 at rtol 1e-10)
    ok = {k: v for k, v in times.items() if k.startswith("ours") and k != "ours default"
          and errs[k] <= 10 * max(errs["ours default"], 1e-12)}
    if not ok:
        return
    best = min(ok, key=ok.get)
    r, how = times["ours default"] / ok[best], ""
    if methods is not None and cfg is not None:
        t_default, t_best = paired_times(methods, "ours default", best, cfg, repeats=repeats)
        r, how = t_default / t_best, ", paired re-timing"
    section.target(f"DEQ {case}: ours default/best ours", "<= 1.1", r, r <= 1.1,
                   f"vs {best} (default err {errs['ours default']:.1e}, {best} {errs[best]:.1e}"
                   f"{how})")


def _deq_targets(section: Section, case: str, times: dict, rows: list) -> None:
    errs = {r["method"]: r["grad_rel_err"] for r in rows if r["case"] == case}
    ours = {k: v for k, v in times.items() if k.startswith("ours") and errs[k] <= 1e-9}
    if not ours and any(k.startswith("ours") for k in times):
        section.target(f"DEQ {case}: ours grad err <= 1e-9", "<= 1e-9",
                       min(errs[k] for k in times if k.startswith("ours")), False)
        return
    if not ours:
        return
    best_ours = min(ours, key=ours.get)
    tdeq = {k: v for k, v in times.items() if k.startswith("torchdeq") and "1e-10" in k}
    if tdeq:
        best = min(tdeq, key=tdeq.get)
        r = ours[best_ours] / tdeq[best]
        section.target(f"DEQ {case}: ours/best torchdeq", "<= 0.5", r, r <= 0.5,
                       f"{best_ours} vs {best} (torchdeq err {errs[best]:.1e})")
    jx = {k: v for k, v in times.items() if k.startswith("jaxopt")}
    if jx:
        best = min(jx, key=jx.get)
        r = ours[best_ours] / jx[best]
        section.target(f"DEQ {case}: ours/best jaxopt", "<= 1.0", r, r <= 1.0,
                       f"{best_ours} vs {best} (jaxopt err {errs[best]:.1e})")
