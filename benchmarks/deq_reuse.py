"""The forward's contraction estimate reused in the backward: adjoint VJPs and time, before/after.

On each DEQ case the forward runs once with the default solver
(:class:`~implicit_layers.solvers.Adaptive`); then only the backward is timed, with

* "before": GMRES, the default adjoint solver for fixed points until the forward chose it;
* "after": the solver the forward picked from the contraction ``ρ`` it observed (a Neumann
  series of ``~2 log(rtol) / log ρ`` terms, finished by GMRES if needed).

Both at the forward tolerance (1e-10), gradient errors against the dense references of
:mod:`benchmarks.deq`. VJPs = products with ``(I - J)ᵀ`` of the worst sample.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

import implicit_layers as il

from ._common import Config, Section, rel_err, sync, to_numpy


def _backward_rows(section: Section, cfg: Config, case: str, solve, params, ref) -> None:
    """``solve(backward) -> (z, info)`` with ``params`` the leaves; rows for both backwards."""
    ref_flat = np.concatenate([to_numpy(r).ravel() for r in ref])
    reps = max(cfg.repeats, 1)
    for label, backward in (("before: GMRES", il.linear.GMRES()), ("after: from forward ρ", None)):
        times, grads, info = [], None, None
        for _ in range(max(cfg.warmup, 1) + reps):
            leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
            z, info = solve(backward, leaves)
            sync(cfg.torch_device)
            t0 = time.process_time() if cfg.torch_device.type == "cpu" else time.perf_counter()
            grads = torch.autograd.grad(z, leaves, z.detach())  # d ½‖z*‖² (any cotangent works)
            sync(cfg.torch_device)
            t1 = time.process_time() if cfg.torch_device.type == "cpu" else time.perf_counter()
            times.append(t1 - t0)
        times = times[max(cfg.warmup, 1):]
        assert info is not None and info.backward is not None and grads is not None
        err = rel_err(np.concatenate([to_numpy(g).ravel() for g in grads]), ref_flat)
        section.add(case=f"backward only: {case}", method=f"{label} ({info.backward.solver})",
                    time_ms=1e3 * statistics.median(times), grad_rel_err=err,
                    fwd_steps=int(info.steps.max()), bwd_vjps=int(info.backward.steps.max()),
                    forward_rho=float(info.contraction.max()))


def run_reuse(cfg: Config, section: Section) -> None:
    """Rows "backward only: <case>" in the DEQ section."""
    from .deq import f_inj, f_mlp, make_deq, make_mlp

    section.notes.append(
        "backward only: the forward runs once with the defaults (Adaptive), then only the "
        "backward is timed: 'before' GMRES (the default adjoint solver until the forward chose "
        "it), 'after' the solver the forward picked from its observed contraction ρ (Neumann "
        "with ~2 log(rtol)/log ρ terms, GMRES finishing what it leaves). Cotangent z*; errors "
        "against dense IFT gradients; bwd_vjps = adjoint products of the worst sample."
    )
    dev = cfg.torch_device
    cases = [("easy", 32, 16)] if cfg.tiny else [("easy", 256, 64), ("hard", 256, 64)]
    for kind, hidden, batch in cases:
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=dev)
             for k, v in make_deq(kind, hidden=hidden, batch=batch).items()}
        U, b = T["U"], T["b"]

        def solve(backward, leaves, U=U, b=b, t=T["t"]):
            W, x = leaves
            return il.fixed_point(f_inj, torch.zeros_like(t), x @ U.T + b, W, backward=backward,
                                  batched=True, return_info=True)

        ref = _dense_deq(T)
        _backward_rows(section, cfg, f"{kind} n={hidden} B={batch}", solve, (T["W"], T["x"]), ref)
    if not cfg.tiny:
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=dev) for k, v in make_mlp().items()}

        def solve_mlp(backward, leaves, T=T):
            W1, W2, x = leaves
            return il.fixed_point(f_mlp, torch.zeros_like(T["t"]), x @ T["V"].T, W1, W2, T["c"],
                                  backward=backward, batched=True, return_info=True)

        ref = _dense_mlp(T)
        _backward_rows(section, cfg, "mlp n=256 B=64", solve_mlp, (T["W1"], T["W2"], T["x"]), ref)


def _dense_deq(T: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``d ½‖z*‖² / d(W, x)`` with dense per-sample adjoint solves."""
    from .deq import f_tanh, reference

    _, _, z = reference(T)
    W, U, b, x = T["W"], T["U"], T["b"], T["x"]
    A = torch.eye(z.shape[1], dtype=z.dtype, device=z.device) - (1 - z**2)[:, :, None] * W[None]
    u = torch.linalg.solve(A.mT, z.unsqueeze(-1)).squeeze(-1)
    Wr, xr = W.clone().requires_grad_(True), x.clone().requires_grad_(True)
    return torch.autograd.grad((f_tanh(z, xr, Wr, U, b) * u).sum(), (Wr, xr))


def _dense_mlp(T: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``d ½‖z*‖² / d(W1, W2, x)`` via :func:`benchmarks.deq.reference_mlp` with target 0
    (its loss ``Σ (z - t)² / B`` then has cotangent ``2 z / B``: rescaled by ``B / 2``)."""
    from .deq import reference_mlp

    B = T["t"].shape[0]
    *grads, _ = reference_mlp({**T, "t": torch.zeros_like(T["t"])})
    return tuple(g * (B / 2) for g in grads)
