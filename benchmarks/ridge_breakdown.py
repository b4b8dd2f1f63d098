"""Where the ridge hypergradient's time goes with the compiled adjoint (d = 200, float64).

Times, each alone (CPU ms, minimum over rounds), the parts of one forward + backward of
``custom_root`` with ``backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-10))``:

* the closed-form forward alone (Cholesky and two triangular solves);
* the layer call around it (forward + attaching the gradient, no backward);
* the optimality function alone, and the one call of it that the layer makes: finding the
  tensors it reads and recording it for the parameter gradient (forward); the parameter VJP
  through that recording;
* the compiled CG loop alone (called directly, 42 steps) and its call with no step to take;
* the whole forward + backward, and the same with the eager Dense and CG backwards.

With ``--floor``, what bounds the ratio to jaxopt (``jax.jit`` of its ``custom_root`` with CG),
after checking that the hypergradients agree: our two compiled forms (the layer called eagerly
with ``CompiledImplicit``; ``torch.compile(fullgraph=True)`` of the whole loss) and the floor
of each, the parts that form runs whatever the layer does: the closed form, the compiled CG
loop alone, and the fixed cost of autograd around them (eager: a pass-through
``autograd.Function`` and the outer loss, forward and backward; whole: ``torch.compile`` of a
one-line loss, forward and backward). Median process CPU time, first of every part alternated
call by call (each floor the sum of its parts), then of each form and each floor (one call of
its parts) paired with jaxopt alone, once in each order, as the suite's target is timed.

Usage::

    python -m benchmarks.ridge_breakdown [--d 200] [--rounds 7] [--floor [--calls 400]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

import implicit_layers as il
from implicit_layers._compiled_adjoint import _compiled_cg
from implicit_layers._problem import Problem

from ._common import import_peer, restore_threads, set_threads
from .ridge import TOL, _jax_ridge, make_ridge


def _time(fn, calls: int, rounds: int) -> float:  # noqa: ANN001
    """Minimum over ``rounds`` of the CPU ms per call of ``fn`` (after three warm-up calls)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls * 1e3)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=30,
                   help="calls per round (with --floor: alternated calls of each)")
    p.add_argument("--floor", action="store_true", help="what bounds the ratio to jaxopt (needs jax)")
    a = p.parse_args(argv)
    prev = set_threads(1)
    try:
        return _floors(a.d, a.calls) if a.floor else _measure(a.d, a.rounds, a.calls)
    finally:
        restore_threads(prev)


class _Ridge:
    """The ridge problem of d features (float64): its optimality function and closed form
    (plain closures, as a user writes them), its layers, and the inputs of the compiled adjoint
    loop at the solution (a random cotangent)."""

    def __init__(self, d: int) -> None:
        self.raw = make_ridge(d)
        data = {k: torch.as_tensor(v) for k, v in self.raw.items()}
        X, y, self.Xv, self.yv, self.theta0 = data["X"], data["y"], data["Xv"], data["yv"], data["theta"]
        G, Xty = X.T @ X / X.shape[0], X.T @ y / X.shape[0]

        def optimality(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return G @ w - Xty + theta.exp() * w

        def closed_form(theta: torch.Tensor) -> torch.Tensor:
            H = G + torch.diag(theta.exp())
            return torch.cholesky_solve(Xty.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)

        self.optimality, self.closed_form = optimality, closed_form
        self.w0 = torch.zeros(d, dtype=torch.float64)
        self.w = closed_form(self.theta0).unsqueeze(0)
        self.g = torch.randn(1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        self.problem = Problem("root", optimality, (self.theta0,), self.w[0], batched=False,
                               name="optimality_fn", symmetric=True)
        self.loop, self.limit = _compiled_cg(optimality), torch.tensor(1000)
        self.tol = TOL * torch.linalg.vector_norm(self.g, dim=-1)

    def layer(self, backward: Any):  # noqa: ANN201
        closed_form = self.closed_form
        return il.custom_root(self.optimality, backward=backward, symmetric=True, rtol=TOL)(
            lambda w0, theta: closed_form(theta))

    def run_loop(self, tol: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The compiled CG loop alone, at the solution, for the cotangent ``g``."""
        return self.loop(self.problem.pure_residual, self.w, self.g,
                         self.tol if tol is None else tol, self.limit)


def _measure(d: int, rounds: int, calls: int) -> dict[str, float]:
    r = _Ridge(d)
    theta0, w0, w, g = r.theta0, r.w0, r.w, r.g
    optimality, closed_form, layer = r.optimality, r.closed_form, r.layer

    def step(inner) -> torch.Tensor:  # noqa: ANN001
        theta = theta0.clone().requires_grad_(True)
        return torch.autograd.grad(inner(w0, theta).square().sum(), theta)[0]

    compiled = layer(il.backward.CompiledImplicit(il.linear.CG(rtol=TOL)))
    dense, eager_cg = layer(il.linear.Dense()), layer(il.linear.CG(rtol=TOL))

    def call_only() -> torch.Tensor:
        return compiled(w0, theta0.clone().requires_grad_(True))

    theta_p = theta0.clone().requires_grad_(True)
    unbound = Problem("root", optimality, (theta_p,), w[0], batched=False, name="optimality_fn",
                      symmetric=True)
    mode = il.backward.CompiledImplicit(il.linear.CG(rtol=TOL))

    def find_and_record() -> object:
        return mode._bind_recorded(unbound, w, [theta_p])

    bound = find_and_record()
    assert bound is not None
    recorded = bound[1]
    huge = torch.full_like(r.tol, 1e150)
    steps = int(r.run_loop()[2])
    parts = {
        "closed-form forward alone": lambda: closed_form(theta0),
        "layer call (forward + attach, no backward)": call_only,
        "optimality function alone": lambda: optimality(w[0], theta0),
        "finding its tensors and recording it (forward, one call)": find_and_record,
        "parameter VJP through that recording": lambda: recorded.param_vjp(g),  # type: ignore[attr-defined]
        f"compiled CG loop alone ({steps} steps)": r.run_loop,
        "compiled CG loop, no step to take (call cost)": lambda: r.run_loop(huge),
        "whole forward + backward, CompiledImplicit(CG)": lambda: step(compiled),
        "whole forward + backward, Dense (eager)": lambda: step(dense),
        "whole forward + backward, CG (eager)": lambda: step(eager_cg),
    }
    out = {name: _time(fn, calls, rounds) for name, fn in parts.items()}
    print(f"ridge d={d}, CPU ms per call (minimum of {rounds} rounds of {calls} calls):")
    for name, ms in out.items():
        print(f"  {name:55s} {ms:8.3f}")
    counts = python_calls(lambda: step(compiled))
    print("Python-level calls of one forward + backward, CompiledImplicit(CG): "
          + ", ".join(f"{where} {n}" for where, n in counts.items()))
    return out


class _PassThrough(torch.autograd.Function):
    """The least an implicit layer's ``autograd.Function`` can do: ``z`` out, the cotangent
    back to ``theta`` (for the floor's fixed cost of eager autograd)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return z.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, g


def _floors(d: int, calls: int) -> dict[str, float]:
    """Median process CPU us per call, alternated one by one (see the module's docstring)."""
    try:
        jax, jaxopt = import_peer("jax"), import_peer("jaxopt")
    except ImportError as exc:
        print(f"--floor needs jax and jaxopt: {exc}")
        return {}
    r = _Ridge(d)
    theta0, w0, closed_form = r.theta0, r.w0, r.closed_form

    def outer(w: torch.Tensor) -> torch.Tensor:
        res = r.Xv @ w - r.yv
        return 0.5 * (res @ res) / r.Xv.shape[0]

    inner = r.layer(il.backward.CompiledImplicit(il.linear.CG(rtol=TOL)))
    whole = torch.compile(lambda theta: outer(inner(w0, theta)), fullgraph=True)
    c = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    one_line = torch.compile(lambda theta: (theta.exp() * c).sum(), fullgraph=True)

    def grad_of(loss) -> torch.Tensor:  # noqa: ANN001
        theta = theta0.clone().requires_grad_(True)
        return torch.autograd.grad(loss(theta), theta)[0]

    jax_grad = _jax_ridge(r.raw, jax, jaxopt)["jaxopt CG (jit)"]
    jax_name = "jaxopt CG (jit), forward + backward"
    parts = {
        jax_name: lambda: jax_grad().block_until_ready(),
        "ours, layer called eagerly (CompiledImplicit)": lambda: grad_of(lambda t: outer(inner(w0, t))),
        "ours, whole loss under torch.compile": lambda: grad_of(whole),
        "closed form": lambda: closed_form(theta0),
        "compiled CG loop alone": r.run_loop,
        "eager autograd: pass-through Function + loss": lambda: grad_of(
            lambda t: outer(_PassThrough.apply(w0, t))),
        "torch.compile of a one-line loss, fwd + bwd": lambda: grad_of(one_line),
    }
    # The three hypergradients against autograd through the closed form (float64): the
    # forms compared compute the same thing.
    theta = theta0.clone().requires_grad_(True)
    ref = torch.autograd.grad(outer(closed_form(theta)), theta)[0]
    grads = {
        "jaxopt CG (jit)": torch.tensor(np.array(jax_grad())),
        "ours, layer called eagerly": grad_of(lambda t: outer(inner(w0, t))),
        "ours, whole loss compiled": grad_of(whole),
    }
    errors = {f"{name}: relative error": float((gr - ref).norm() / ref.norm()) for name, gr in grads.items()}
    if max(errors.values()) > 1e-8:  # the CG tolerance is 1e-10
        raise RuntimeError(f"the hypergradients compared disagree: {errors}")
    for fn in parts.values():
        for _ in range(20):  # compiles, then warms up
            fn()
    out = _alternated(parts, calls)
    fixed = out["closed form"] + out["compiled CG loop alone"]
    out["floor, layer called eagerly"] = fixed + out["eager autograd: pass-through Function + loss"]
    out["floor, whole loss compiled"] = fixed + out["torch.compile of a one-line loss, fwd + bwd"]
    jax_us = out[jax_name]
    print(f"ridge d={d}, median process CPU us of {calls} calls of each, all alternated (x: / jaxopt):")
    for name, us in out.items():
        print(f"  {name:50s} {us:8.1f}  {us / jax_us:5.2f}x")
    # The suite's target takes a pair re-timed alone (once in each order), where the peer's
    # caches stay warm; the floors as single calls, timed the same way.
    paired = {
        "ours, layer called eagerly": parts["ours, layer called eagerly (CompiledImplicit)"],
        "ours, whole loss compiled": parts["ours, whole loss under torch.compile"],
        "floor, layer called eagerly": lambda: (parts["closed form"](), parts["compiled CG loop alone"](),
                                                parts["eager autograd: pass-through Function + loss"]()),
        "floor, whole loss compiled": lambda: (parts["closed form"](), parts["compiled CG loop alone"](),
                                               parts["torch.compile of a one-line loss, fwd + bwd"]()),
    }
    print("paired with jaxopt alone, once in each order (us vs jaxopt's us):")
    for name, fn in paired.items():
        ours_us = peer_us = 0.0
        for order in ((name, jax_name), (jax_name, name)):
            both = _alternated({k: fn if k == name else parts[jax_name] for k in order}, calls)
            ours_us, peer_us = ours_us + both[name] / 2, peer_us + both[jax_name] / 2
        out[f"{name} / jaxopt, paired"] = ours_us / peer_us
        print(f"  {name:50s} {ours_us:8.1f} vs {peer_us:6.1f}  {ours_us / peer_us:5.2f}x")
    print("hypergradients against autograd through the closed form: " + ", ".join(
        f"{name} {err:.1e}" for name, err in errors.items()))
    return {**out, **errors}


def _alternated(fns: dict[str, Any], calls: int) -> dict[str, float]:
    """Median process CPU us per call of each of ``fns``, called one after the other
    ``calls`` times."""
    times: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.process_time_ns()
            fn()
            times[name].append(time.process_time_ns() - t0)
    return {name: statistics.median(ts) / 1e3 for name, ts in times.items()}


def python_calls(fn) -> dict[str, int]:  # noqa: ANN001
    """The Python-level calls one call of ``fn`` makes (``sys.setprofile``: Python functions
    and builtins), in all and by where they are defined: this package, torch's Python, builtins
    (C functions and methods, torch's bindings among them), anything else."""
    counts = {"in all": 0, "implicit_layers": 0, "torch": 0, "builtins": 0, "other": 0}

    def record(frame, event, arg) -> None:  # noqa: ANN001
        if event not in ("call", "c_call"):
            return
        counts["in all"] += 1
        if event == "c_call":
            counts["builtins"] += 1
            return
        path = frame.f_code.co_filename.replace("\\", "/")
        where = ("implicit_layers" if "/implicit_layers/" in path
                 else "torch" if "/torch/" in path else "other")
        counts[where] += 1

    sys.setprofile(record)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts


if __name__ == "__main__":
    main()
