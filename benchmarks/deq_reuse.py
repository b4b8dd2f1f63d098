"""What the forward learned, reused in the backward: adjoint VJPs and time, before/after.

Two reuses, each on the DEQ cases of :mod:`benchmarks.deq`, the forward run once and only the
backward timed, at the forward tolerance (1e-10), gradient errors against dense references:

* **contraction** (rows "backward only"): the default forward
  (:class:`~implicit_layers.solvers.Adaptive`), then "before" GMRES (the default adjoint solver
  for fixed points until the forward chose it) and "after" the solver the forward picked from
  the contraction ``ρ`` it observed (a Neumann series of ``~2 log(rtol) / log ρ`` terms,
  finished by GMRES if needed). VJPs = products with ``(I - J)ᵀ`` of the worst sample.
* **secant** (rows "secant reuse"): a Broyden forward, then GMRES from zero ("before") and
  GMRES from Broyden's inverse-Jacobian estimate ``Hᵀ g`` ("after", SHINE's warm start, scaled
  to the least residual). ``bwd_vjps`` counts every batched product with ``(I - J)ᵀ`` (the
  scaling's and the true-residual checks included); ``start_res`` is the median over samples
  of ``‖g - (I - J)ᵀ x0‖ / ‖g‖`` for the raw guess ``x0 = Hᵀ g``, for the same guess from
  type-II Anderson's multisecant estimate (measured only, not offered by the library) and for
  the trivial guess ``x0 = g``, the first Neumann term, for comparison.

Alone: ``python -m benchmarks.deq_reuse [--tiny]`` (prints the rows).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

import implicit_layers as il
from implicit_layers.solvers._base import adjoint_slot
from implicit_layers.solvers.base import Problem

from ._common import Config, Section, rel_err, restore_threads, set_threads, sync, to_numpy


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


def _tanh_cases(cfg: Config):
    """``(label, tensors)`` of the tanh DEQ cases (easy and hard; one small case if tiny)."""
    from .deq import make_deq

    cases = [("easy", 32, 16)] if cfg.tiny else [("easy", 256, 64), ("hard", 256, 64)]
    for kind, hidden, batch in cases:
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=cfg.torch_device)
             for k, v in make_deq(kind, hidden=hidden, batch=batch).items()}
        yield f"{kind} n={hidden} B={batch}", T


def run_reuse(cfg: Config, section: Section) -> None:
    """Rows "backward only: <case>" in the DEQ section."""
    from .deq import f_inj, f_mlp, make_mlp

    section.notes.append(
        "backward only: the forward runs once with the defaults (Adaptive), then only the "
        "backward is timed: 'before' GMRES (the default adjoint solver until the forward chose "
        "it), 'after' the solver the forward picked from its observed contraction ρ (Neumann "
        "with ~2 log(rtol)/log ρ terms, GMRES finishing what it leaves). Cotangent z*; errors "
        "against dense IFT gradients; bwd_vjps = adjoint products of the worst sample."
    )
    for label, T in _tanh_cases(cfg):
        U, b = T["U"], T["b"]

        def solve(backward, leaves, U=U, b=b, t=T["t"]):
            W, x = leaves
            return il.fixed_point(f_inj, torch.zeros_like(t), x @ U.T + b, W, backward=backward,
                                  batched=True, return_info=True)

        _backward_rows(section, cfg, label, solve, (T["W"], T["x"]), _dense_deq(T))
    if not cfg.tiny:
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=cfg.torch_device)
             for k, v in make_mlp().items()}

        def solve_mlp(backward, leaves, T=T):
            W1, W2, x = leaves
            return il.fixed_point(f_mlp, torch.zeros_like(T["t"]), x @ T["V"].T, W1, W2, T["c"],
                                  backward=backward, batched=True, return_info=True)

        ref = _dense_mlp(T)
        _backward_rows(section, cfg, "mlp n=256 B=64", solve_mlp, (T["W1"], T["W2"], T["x"]), ref)
    run_secant(cfg, section)


def _counting(f, counter: list[int]):
    """``f(z, ...)`` that counts the products with its Jacobian's transpose: a hook on ``z``
    fires once per VJP through the graph recorded for the backward."""

    def counted(z, *args):
        if torch.is_grad_enabled() and z.requires_grad:
            z.register_hook(lambda g: counter.__setitem__(0, counter[0] + 1))
        return f(z, *args)

    return counted


def run_secant(cfg: Config, section: Section) -> None:
    """Rows "secant reuse: <case>": Broyden forward, GMRES backward from zero / warm."""
    from .deq import f_inj, f_mlp, make_mlp

    section.notes.append(
        "secant reuse: Broyden(30) forward, then only the backward timed: GMRES from zero "
        "('before') and from Broyden's inverse-Jacobian estimate Hᵀg ('after', scaled to the "
        "least residual). bwd_steps = GMRES steps of the worst sample; bwd_vjps = every batched "
        "product with (I - J)ᵀ; start_res = median ‖g - (I-J)ᵀx0‖/‖g‖ of the raw guess Hᵀg / "
        "of type-II Anderson(5)'s multisecant guess (measured only) / of the trivial guess g."
    )
    for label, T in _tanh_cases(cfg):
        U, b = T["U"], T["b"]

        def setup(leaves, U=U, b=b):
            W, x = leaves
            return f_inj, (x @ U.T + b, W)

        _secant_rows(section, cfg, label, setup, (T["W"], T["x"]), torch.zeros_like(T["t"]),
                     _dense_deq(T))
    if not cfg.tiny:
        T = {k: torch.as_tensor(v, dtype=torch.float64, device=cfg.torch_device)
             for k, v in make_mlp().items()}

        def setup_mlp(leaves, T=T):
            W1, W2, x = leaves
            return f_mlp, (x @ T["V"].T, W1, W2, T["c"])

        _secant_rows(section, cfg, "mlp n=256 B=64", setup_mlp, (T["W1"], T["W2"], T["x"]),
                     torch.zeros_like(T["t"]), _dense_mlp(T))


def _secant_rows(
    section: Section, cfg: Config, case: str, setup, params, z0: torch.Tensor, ref
) -> None:
    """Rows for a Broyden forward and a GMRES backward without and with the warm start;
    ``setup(leaves) -> (f, args)`` gives the map ``f(z, *args)``, ``z0`` the ``(B, n)`` start."""
    ref_flat = np.concatenate([to_numpy(r).ravel() for r in ref])
    counter = [0]
    variants = {"before: zero start": False, "after: warm start Hᵀg": True}
    times: dict[str, list[float]] = {k: [] for k in variants}
    last: dict[str, tuple] = {}
    timer = time.process_time if cfg.torch_device.type == "cpu" else time.perf_counter
    for round_ in range(max(cfg.warmup, 1) + max(cfg.repeats, 1)):
        for label, warm in variants.items():  # alternating, as the other sections
            leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
            f, args = setup(leaves)
            solver = il.solvers.Broyden(30, warm_start_backward=warm)
            z, info = il.fixed_point(_counting(f, counter), torch.zeros_like(z0), *args,
                                     solver=solver, backward=il.linear.GMRES(), batched=True,
                                     return_info=True)
            sync(cfg.torch_device)
            counter[0] = 0
            t0 = timer()
            grads = torch.autograd.grad(z, leaves, z.detach())  # d ½‖z*‖²
            sync(cfg.torch_device)
            t1 = timer()
            if round_ >= max(cfg.warmup, 1):
                times[label].append(t1 - t0)
            last[label] = (grads, info, counter[0])
    start = _start_residuals(setup, params, z0)
    for label in variants:
        grads, info, vjps = last[label]
        err = rel_err(np.concatenate([to_numpy(g).ravel() for g in grads]), ref_flat)
        section.add(case=f"secant reuse: {case}", method=f"Broyden + GMRES, {label}",
                    time_ms=1e3 * statistics.median(times[label]), grad_rel_err=err,
                    fwd_steps=int(info.steps.max()), bwd_steps=int(info.backward.steps.max()),
                    bwd_vjps=vjps, start_res=start if "warm" in label else None)


def _start_residuals(setup, params, z0: torch.Tensor) -> str:
    """Median ``‖g - Aᵀ x0‖ / ‖g‖`` (``A = I - J`` at ``z*``, ``g = z*``) of Broyden's raw
    guess ``Hᵀ g``, of type-II Anderson's multisecant guess and of the trivial guess ``g``, as
    ``"Broyden / Anderson / trivial"``."""
    f, args = setup(params)
    solver = il.solvers.Broyden(30, warm_start_backward=True)
    problem = Problem("fixed_point", f, args, z0, batched=True, name="f")
    with torch.no_grad(), adjoint_slot(True) as kept:
        z, _ = solver.solve(problem, z0)
    _, vjp = torch.func.vjp(lambda v: v - f(v, *args), z)
    g = z
    out = []
    guesses = (solver.adjoint_guess(kept[-1], g, True), _anderson_guess(f, args, z0, g), g)
    for x0 in guesses:
        assert x0 is not None
        res = torch.linalg.vector_norm(g - vjp(x0)[0], dim=-1) / torch.linalg.vector_norm(g, dim=-1)
        out.append(f"{float(res.median()):.2f}")
    return " / ".join(out)


def _anderson_guess(f, args, z0: torch.Tensor, g: torch.Tensor, m: int = 5) -> torch.Tensor:
    """``Hᵀ g`` for the inverse-Jacobian estimate of type-II Anderson(m) (mixing 1) at the end
    of its solve: ``H = I + ΔG (ΔRᵀΔR)⁻¹ ΔRᵀ``, the multisecant estimate with ``H ΔR = ΔZ``
    for the differences of its last ``m`` iterates ``Z``, residuals ``R`` and map values
    ``G = Z - R`` (Fang & Saad, 2009). Measured only: the library does not offer it."""
    from implicit_layers.solvers.anderson import anderson_step

    z = z0
    r = z - f(z, *args)
    Z: list[torch.Tensor] = []
    R: list[torch.Tensor] = []
    ones = torch.ones(z.shape[0], 1, m, dtype=z.dtype, device=z.device)
    for _ in range(1000):
        Z, R = [*Z[1 - m:], z], [*R[1 - m:], r]
        G = torch.stack([a - b for a, b in zip(Z, R, strict=True)], 1)
        z = anderson_step(G, torch.stack(R, 1), ones[..., :len(Z)], 1e-14) if len(Z) > 1 else G[:, 0]
        r = z - f(z, *args)
        if float((r.norm(dim=-1) / z.norm(dim=-1)).max()) < 1e-10:
            break
    dZ = torch.stack(Z[:-1], 1) - Z[-1].unsqueeze(1)
    dR = torch.stack(R[:-1], 1) - R[-1].unsqueeze(1)
    M = dR @ dR.mT
    M = M + 1e-12 * M.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None] * torch.eye(
        M.shape[-1], dtype=M.dtype, device=M.device)
    c = torch.linalg.solve(M, (dZ - dR) @ g.unsqueeze(-1))
    return g + (dR.mT @ c).squeeze(-1)


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


def main(argv: list[str] | None = None) -> None:
    """Run both reuses alone and print their rows."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small sizes, few repeats (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    a = p.parse_args(argv)
    cfg = Config(tiny=a.tiny)
    if a.repeats:
        cfg.repeats = a.repeats
    section = Section("deq_reuse", "forward reuse in the backward")
    prev = set_threads(cfg.threads)
    try:
        run_reuse(cfg, section)
    finally:
        restore_threads(prev)
    keys = ["case", "method", "time_ms", "grad_rel_err", "fwd_steps", "bwd_steps", "bwd_vjps",
            "forward_rho", "start_res"]
    print(" | ".join(keys))
    for row in section.rows:
        print(" | ".join(_cell(row.get(k)) for k in keys))
    for note in section.notes:
        print("-", note)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if 1e-2 <= abs(v) < 1e4 else f"{v:.1e}"
    return str(v)


if __name__ == "__main__":
    main()
