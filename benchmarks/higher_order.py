"""Higher-order and forward-mode costs: an HVP of a hypergradient against one hypergradient, and
``torch.func.jacfwd`` against ``torch.func.jacrev``.

Usage::

    python -m benchmarks.higher_order [--tiny] [--out DIR] [--repeats N] [--threads N]

* Ridge (``d = 200``, the data of :mod:`benchmarks.ridge`): the forward is the exact Cholesky
  solve wrapped by ``il.custom_root``, so only the backward passes are compared. First order:
  ``∇_θ ℓ(w*(θ))``; HVP: ``∇_θ ⟨∇_θ ℓ, v⟩`` by double backward (``create_graph=True``). The
  reference is autograd through the dense closed form (exact in float64), also timed.
* DEQ (``z* = tanh(W z* + U x + b)``, hidden 256, batch 64, the "easy" data of
  :mod:`benchmarks.deq`): gradient of ``Σ (z* - t)² / 64`` w.r.t. ``W`` and its HVP along a
  random ``V``. Reference: autograd through Picard unrolled by hand to machine precision, also
  timed.
* ``jacfwd`` vs ``jacrev`` of ``θ ↦ z*(θ)`` for ``z = tanh(W z + U θ + b)`` at several input
  sizes ``p`` and state sizes ``n``; the reference is the dense implicit-function-theorem
  Jacobian. ``jacfwd`` needs ``p`` tangent solves, ``jacrev`` ``n`` adjoint solves.

Every method that raises is reported with its error (never fatal), and every result carries
its relative error against the reference, so a silently wrong number shows as a large error.
Timing: median process CPU time on one pinned core (see :mod:`benchmarks._common`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/higher_order.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import implicit_layers as il  # noqa: E402
from benchmarks._common import (  # noqa: E402
    LAST_FAILED,
    Config,
    Section,
    add_output_arguments,
    output_dir,
    rel_err,
    restore_threads,
    set_threads,
    time_alternating,
)
from benchmarks.deq import f_tanh, make_deq  # noqa: E402
from benchmarks.ridge import _torch_ridge, make_ridge  # noqa: E402

TOL = 1e-10
#: An HVP by double backward costs a small multiple of a gradient (Pearlmutter, 1994); autograd
#: through the dense ridge closed form measures about 4x on one CPU core.
HVP_RATIO_GOAL = 5.0
HVP_ACCURACY = 1e-6


def _direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)


def _hvp_rows(section: Section, case: str, methods: dict, refs: dict, cfg: Config) -> dict:
    """Time ``methods`` (name -> (kind, fn)); add rows with errors and ratios; return times."""
    times, out = time_alternating({k: fn for k, (_, fn) in methods.items()}, cfg)
    errors = {}
    for name, (kind, _) in methods.items():
        if name not in times:
            section.add(case=case, method=name, time_ms=None, rel_err=None,
                        error=LAST_FAILED.get(name, "not measured"))
            continue
        base = name.rsplit(":", 1)[0] + ": gradient"
        ratio = times[name] / times[base] if kind == "hvp" and base in times else None
        errors[name] = rel_err(out[name], refs[kind])
        section.add(case=case, method=name, time_ms=1e3 * times[name], rel_err=errors[name],
                    hvp_over_gradient=ratio)
    return {"times": times, "errors": errors, "failed": dict(LAST_FAILED)}


def _ratio_target(section: Section, case: str, measured: dict, method: str) -> None:
    """HVP / gradient cost, met only if the HVP is also right (a fast wrong number is no HVP)."""
    name = f"{case}: {method} HVP / gradient"
    goal = f"<= {HVP_RATIO_GOAL:g}, HVP rel err <= {HVP_ACCURACY:g}"
    grad_t = measured["times"].get(f"{method}: gradient")
    hvp_t = measured["times"].get(f"{method}: HVP")
    if grad_t is None or hvp_t is None:
        failed = measured["failed"].get(f"{method}: HVP") or measured["failed"].get(
            f"{method}: gradient")
        section.target(name, goal, None, False, f"raised: {failed}" if failed else "not measured")
        return
    r, err = hvp_t / grad_t, measured["errors"][f"{method}: HVP"]
    section.target(name, goal, r, r <= HVP_RATIO_GOAL and err <= HVP_ACCURACY,
                   f"HVP rel err {err:.1e}")


def run_ridge_hvp(cfg: Config, section: Section) -> None:
    d = 20 if cfg.tiny else 200
    t = _torch_ridge(make_ridge(d), cfg.torch_device)
    X, y, Xv, yv, theta0 = t["X"], t["y"], t["Xv"], t["yv"], t["theta"]
    n = X.shape[0]
    G, Xty = X.T @ X / n, X.T @ y / n
    v = _direction(theta0, 1)

    def outer(w):
        r = Xv @ w - yv
        return 0.5 * (r @ r) / Xv.shape[0]

    def closed_form(lam):
        H = G + torch.diag(lam)
        return torch.cholesky_solve(Xty.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)

    def optimality(w, theta):
        return G @ w - Xty + theta.exp() * w

    def pair(solve):
        def gradient():
            theta = theta0.clone().requires_grad_(True)
            return torch.autograd.grad(outer(solve(theta)), theta)[0]

        def hvp():
            theta = theta0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(outer(solve(theta)), theta, create_graph=True)
            return torch.autograd.grad(g @ v, theta)[0]

        return gradient, hvp

    methods = {}
    dense = pair(lambda theta: closed_form(theta.exp()))
    methods["dense autograd: gradient"] = ("gradient", dense[0])
    methods["dense autograd: HVP"] = ("hvp", dense[1])
    for label, backward in (("ours CG", il.linear.CG(rtol=TOL)), ("ours Dense", il.linear.Dense())):
        @il.custom_root(optimality, backward=backward, symmetric=True, rtol=TOL)
        def inner(w0, theta):
            return closed_form(theta.exp())

        zeros = torch.zeros(d, dtype=X.dtype, device=X.device)
        fns = pair(lambda theta, inner=inner, zeros=zeros: inner(zeros, theta))
        methods[f"{label}: gradient"] = ("gradient", fns[0])
        methods[f"{label}: HVP"] = ("hvp", fns[1])
    refs = {"gradient": dense[0](), "hvp": dense[1]()}
    case = f"ridge d={d}"
    measured = _hvp_rows(section, case, methods, refs, cfg)
    for m in ("ours CG", "ours Dense"):
        _ratio_target(section, case, measured, m)


def run_deq_hvp(cfg: Config, section: Section) -> None:
    hidden, batch, inp = (16, 4, 8) if cfg.tiny else (256, 64, 64)
    data = make_deq("easy", hidden=hidden, batch=batch, inp=inp)
    T = {k: torch.as_tensor(a, dtype=torch.float64, device=cfg.torch_device) for k, a in data.items()}
    W0, U, b, x, tgt = T["W"], T["U"], T["b"], T["x"], T["t"]
    V = _direction(W0, 2)
    z0 = torch.zeros_like(tgt)
    # ‖W‖₂ = 0.9: 0.9^K < 1e-13 from K = 285 on.
    K = 300

    def loss(z):
        return (z - tgt).square().sum() / batch

    def ours(W):
        return il.fixed_point(lambda z, x: f_tanh(z, x, W, U, b), z0, x, batched=True,
                              solver=il.solvers.Anderson(rtol=TOL, max_steps=200))

    def unrolled(W):
        z = z0
        for _ in range(K):
            z = f_tanh(z, x, W, U, b)
        return z

    def pair(solve):
        def gradient():
            W = W0.clone().requires_grad_(True)
            return torch.autograd.grad(loss(solve(W)), W)[0]

        def hvp():
            W = W0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(solve(W)), W, create_graph=True)
            return torch.autograd.grad((g * V).sum(), W)[0]

        return gradient, hvp

    ref = pair(unrolled)
    o = pair(ours)
    methods = {
        f"unrolled K={K}: gradient": ("gradient", ref[0]),
        f"unrolled K={K}: HVP": ("hvp", ref[1]),
        "ours Anderson+GMRES: gradient": ("gradient", o[0]),
        "ours Anderson+GMRES: HVP": ("hvp", o[1]),
    }
    refs = {"gradient": ref[0](), "hvp": ref[1]()}
    case = f"DEQ n={hidden}, B={batch}"
    measured = _hvp_rows(section, case, methods, refs, cfg)
    _ratio_target(section, case, measured, "ours Anderson+GMRES")
    section.notes.append(
        f"{case}: the ours rows include the forward solve (Anderson, rtol {TOL:g}) in both the "
        "gradient and the HVP; the unrolled rows run K steps with autograd."
    )


def run_jac(cfg: Config, section: Section) -> None:
    sizes = [(2, 8), (8, 2)] if cfg.tiny else [(8, 256), (64, 64), (256, 8)]
    dev = cfg.torch_device
    for p, n in sizes:
        gen = torch.Generator().manual_seed(p * 1000 + n)
        W = torch.randn(n, n, generator=gen, dtype=torch.float64)
        W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).to(dev)
        U = (torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5).to(dev)
        b = (0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dev)
        theta = torch.randn(p, generator=gen, dtype=torch.float64).to(dev)
        z0 = torch.zeros(n, dtype=torch.float64, device=dev)

        def f(z, th, W=W, U=U, b=b):
            return torch.tanh(W @ z + U @ th + b)

        def layer(th, f=f, z0=z0):
            return il.fixed_point(f, z0, th, solver=il.solvers.Anderson(rtol=TOL))

        # Dense IFT reference at a Picard solution: J = (I - D W)⁻¹ D U, D = diag(1 - z²).
        with torch.no_grad():
            z = z0
            for _ in range(80):  # 0.5^80 < 1e-24
                z = f(z, theta)
        D = 1 - z**2
        J_ref = torch.linalg.solve(torch.eye(n, dtype=z.dtype, device=dev) - D[:, None] * W,
                                   D[:, None] * U)

        def eager_loop(layer=layer, theta=theta, n=n):
            th = theta.clone().requires_grad_(True)
            z = layer(th)
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            return torch.stack([torch.autograd.grad(z, th, eye[i], retain_graph=True)[0]
                                for i in range(n)])

        methods = {
            "jacfwd": lambda layer=layer, theta=theta: torch.func.jacfwd(layer)(theta),
            "jacrev": lambda layer=layer, theta=theta: torch.func.jacrev(layer)(theta),
            "eager reverse loop": eager_loop,
        }
        case = f"p={p} inputs, n={n} states"
        times, out = time_alternating(methods, cfg)
        for name in methods:
            if name not in times:
                section.add(case=case, method=name, time_ms=None, rel_err=None,
                            error=LAST_FAILED.get(name, "not measured"))
                continue
            ratio = times[name] / times["jacrev"] if "jacrev" in times else None
            section.add(case=case, method=name, time_ms=1e3 * times[name],
                        rel_err=rel_err(out[name], J_ref), over_jacrev=ratio)
    section.notes.append(
        "jacfwd solves one tangent system (∂F/∂z) ż = -(∂F/∂θ) θ̇ per input, jacrev one adjoint "
        "system per state; the eager reverse loop is n calls of autograd.grad (no vmap)."
    )


def run_higher_order(cfg: Config) -> Section:
    """The section for :mod:`benchmarks.run` (register it as ``"higher_order"``)."""
    section = Section("higher_order", "Higher order: HVP of a hypergradient, jacfwd vs jacrev")
    section.notes.append(
        "hvp_over_gradient = time of the HVP (double backward) / time of one first-order "
        "hypergradient of the same method; rel_err against the dense or unrolled reference."
    )
    for part in (run_ridge_hvp, run_deq_hvp, run_jac):
        try:
            part(cfg, section)
        except Exception as exc:  # one broken part must not hide the others' figures
            section.notes.append(f"{part.__name__} raised {type(exc).__name__}: {str(exc)[:200]}")
    return section


def main(argv: list[str] | None = None) -> dict:
    """Run this section alone and write ``higher_order[_tiny].json`` / ``.md``."""
    from benchmarks.run import run_meta, to_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes, few repeats (seconds)")
    add_output_arguments(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 (default) also pins the process to one core; 0 leaves them")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    cfg = Config(tiny=a.tiny, device=a.device, threads=a.threads or None)
    if a.repeats:
        cfg.repeats = a.repeats
    t0 = time.perf_counter()
    prev = set_threads(cfg.threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            section = run_higher_order(cfg)
    finally:
        restore_threads(prev)
    results = {"meta": run_meta(cfg, t0, "benchmarks.higher_order"),
               "sections": [section.to_dict()]}
    out = output_dir(a)
    stem = "higher_order_tiny" if cfg.tiny else "higher_order"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    print(f"[benchmarks] wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return results


if __name__ == "__main__":
    main()
