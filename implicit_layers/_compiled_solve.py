"""A fixed-point layer whose forward and adjoint loops are torch control-flow operators.

Under ``torch.compile`` both loops trace as ``torch._higher_order_ops.while_loop``, so that a
model containing the layer compiles into one graph (``fullgraph=True``), forward and backward;
eagerly the same step functions run in a Python loop (``while_loop`` itself would compile the
loop on every eager call). The forward is a Picard iteration (optionally damped) with the
per-sample tolerance rule of the eager solvers (see ``solvers/_base.py``); the backward solves
the adjoint fixed point ``u = g + J_fᵀ u`` with the Neumann series and takes the parameter
gradients from one VJP at ``z*``.

The loops carry fixed-shape tensors only: the iterate, per-sample residual norms, done flags
and step counts. Converged samples stop changing. Nothing in a step synchronises with the host
or has a Python side effect; verdicts travel out as tensors, and the warnings of the eager path
are emitted only outside a compiled region (see :func:`report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop
from torch.func import functional_call, vjp

from ._capture import transforms_active
from ._info import NonFiniteError, OnFailure, SolveInfo, report_failure
from .backward import Implicit
from .linear.neumann import Neumann
from .solvers._base import _norm as forward_norm
from .solvers.base import ForwardSolver
from .solvers.picard import Picard

__all__ = ["CompiledSettings", "compiled_fixed_point", "compiled_settings", "check_call", "run_while"]


@dataclass(frozen=True)
class CompiledSettings:
    """The resolved settings of one compiled solve (plain Python numbers: constants of a graph).

    Attributes:
        damping: the Picard step weight (1: plain iteration ``z ← f(z)``).
        rtol, atol, max_steps: the forward tolerances and step limit.
        adjoint_rtol, adjoint_atol, adjoint_max_steps: the Neumann series' tolerances and
            number of terms.
        alpha: the Neumann step size (``None``: 1).
        forward_on_failure, adjoint_on_failure: what an eager call does on non-convergence.
    """

    damping: float
    rtol: float
    atol: float
    max_steps: int
    adjoint_rtol: float
    adjoint_atol: float
    adjoint_max_steps: int
    alpha: float | None
    forward_on_failure: OnFailure
    adjoint_on_failure: OnFailure

    @classmethod
    def of(cls, solver: Picard, adjoint: Neumann, dtype: torch.dtype) -> CompiledSettings:
        """The settings of ``solver`` and ``adjoint`` for a state of ``dtype`` (a ``None``
        tolerance resolved as the eager path resolves it; the adjoint inherits the forward's)."""
        rtol = solver.resolved_rtol(dtype)
        adjoint_rtol = rtol if adjoint.rtol is None else adjoint.rtol
        return cls(
            damping=float(solver.damping), rtol=rtol, atol=float(solver.atol),
            max_steps=solver.max_steps, adjoint_rtol=float(adjoint_rtol),
            adjoint_atol=float(adjoint.atol), adjoint_max_steps=adjoint.max_steps,
            alpha=None if adjoint.alpha is None else float(adjoint.alpha),
            forward_on_failure=solver.on_failure, adjoint_on_failure=adjoint.on_failure,
        )


#: Terms of the Neumann series per pass of the adjoint loop (per map evaluation).
_ADJOINT_CHUNK = 4


def run_while(cond, body, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:  # noqa: ANN001
    """``while cond(*state): state = body(*state)``: a ``while_loop`` under ``torch.compile``,
    a Python loop eagerly (same step functions, so the same iterates)."""
    if torch.compiler.is_compiling():
        return tuple(while_loop(cond, body, state))
    while bool(cond(*state)):
        state = tuple(body(*state))
    return state


def _norm(v: Tensor) -> Tensor:
    """Per-sample norm ``(B, 1)`` of a flat ``(B, n)`` state, in the eager monitors' wide dtype:
    the verdicts compare wide norms and tolerances, and the info casts them to the state's."""
    return forward_norm(v, keepdim=True)


class _Map:
    """``f(z, x)`` of an ``nn.Module`` on flat ``(B, n)`` states, with its parameters and
    buffers passed explicitly (``functional_call``), so that every tensor it reads is an input
    of the traced loops."""

    def __init__(self, module: torch.nn.Module, names: tuple[str, ...], shape: torch.Size) -> None:
        self.module = module
        self.names = names
        # The per-sample shape only: the batch size comes from the iterate, so that nothing
        # the loop bodies close over depends on it (a dynamic batch stays a loop input).
        self.state_shape = tuple(int(d) for d in shape[1:])

    def __call__(self, z: Tensor, x: Tensor, tensors: tuple[Tensor, ...]) -> Tensor:
        values = dict(zip(self.names, tensors, strict=True))
        out = functional_call(self.module, values, (z.view(z.shape[0], *self.state_shape), x))
        # Under autocast the map may compute in a narrower dtype; the loop state keeps its own.
        return out.reshape(z.shape).to(z.dtype)


def _forward_loop(
    f: _Map, z0: Tensor, x: Tensor, tensors: tuple[Tensor, ...], s: CompiledSettings
) -> tuple[Tensor, ...]:
    """The Picard loop with per-sample bookkeeping; returns ``(z*, residual, tolerance, steps,
    non_finite)``, the last four ``(B, 1)``."""
    plain = s.damping == 1.0
    fz = f(z0, x, tensors)
    r = z0 - fz
    res = _norm(r)
    # Fixed points: tol = max(atol, rtol · max(‖z‖, ‖f(z0)‖)) at the iterate judged.
    tol0 = torch.clamp(s.rtol * _norm(z0 - r), min=s.atol)
    tol = torch.clamp(_norm(z0) * s.rtol, min=tol0)
    done = res <= tol
    steps = torch.zeros_like(res, dtype=torch.int64)
    k = torch.zeros((), dtype=torch.int64, device=z0.device)
    bad = torch.zeros_like(done)

    def cond(k: Tensor, z: Tensor, fz: Tensor, r: Tensor, best_z: Tensor, best_res: Tensor,
             best_tol: Tensor, done: Tensor, steps: Tensor, bad: Tensor) -> Tensor:
        return (k < s.max_steps) & ~done.all()

    def body(k: Tensor, z: Tensor, fz: Tensor, r: Tensor, best_z: Tensor, best_res: Tensor,
             best_tol: Tensor, done: Tensor, steps: Tensor, bad: Tensor) -> tuple[Tensor, ...]:
        alive = ~done
        if plain:
            step = fz
        else:
            step = torch.add(z, r, alpha=-s.damping)
        z = torch.where(alive, step, z)
        fz = f(z, x, tensors)
        r = z - fz
        res = _norm(r)
        tol = torch.clamp(_norm(z) * s.rtol, min=tol0)
        met = res <= tol
        better = alive & ((res <= best_res) | met)
        best_z = torch.where(better, z, best_z)
        best_res = torch.where(better, res, best_res)
        best_tol = torch.where(better, tol, best_tol)
        # A sample whose residual is NaN or Inf stops (its best finite iterate is kept).
        broke = alive & ~torch.isfinite(res)
        return (k + 1, z, fz, r, best_z, best_res, best_tol, done | met | broke,
                steps + alive.long(), bad | broke)

    # No two loop inputs may alias (inductor refuses them): the best iterate starts as a copy.
    state = (k, z0, fz, r, z0.clone(), res, tol, done, steps, bad)
    _, _, _, _, z, res, tol, _, steps, bad = run_while(cond, body, state)
    return z, res, tol, steps, bad


def _adjoint_loop(
    f: _Map, z: Tensor, x: Tensor, tensors: tuple[Tensor, ...], g: Tensor, s: CompiledSettings
) -> tuple[Tensor, ...]:
    """The Neumann series for ``(I - J_f)ᵀ u = g`` at ``z``; returns ``(u, residual, tolerance,
    steps, non_finite)``, the last four ``(B, 1)``."""
    res = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    tol = torch.clamp(s.adjoint_rtol * res, min=s.adjoint_atol)
    mask = (res > tol).to(g.dtype)  # 1: stepping, 0: done
    steps = torch.zeros_like(mask)
    k = torch.zeros((), dtype=torch.int64, device=g.device)
    bad = torch.zeros_like(mask, dtype=torch.bool)

    # Everything the product reads is carried through the loop (torch.func inside a traced
    # loop body needs its inputs to be loop inputs, not closures), and handed back as copies
    # (a loop's outputs may not alias its inputs).
    def cond(k: Tensor, u: Tensor, r: Tensor, res: Tensor, mask: Tensor, steps: Tensor,
             bad: Tensor, z: Tensor, x: Tensor, *tensors: Tensor) -> Tensor:
        return (k < s.adjoint_max_steps) & (mask.sum() > 0)

    def body(k: Tensor, u: Tensor, r: Tensor, res: Tensor, mask: Tensor, steps: Tensor,
             bad: Tensor, z: Tensor, x: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        # The VJP's linearisation at z is taken once per pass and serves `chunk` terms of the
        # series (a traced loop cannot keep it across passes): one map evaluation per chunk
        # instead of one per term. The terms are those of a step-by-step loop: a sample stops
        # changing once it converges, and no term is taken past adjoint_max_steps.
        pull = vjp(lambda v: f(v, x, tensors), z)[1]
        for j in range(chunk):
            live = mask if j == 0 else mask * (k + j < s.adjoint_max_steps)
            step = r if s.alpha is None or s.alpha == 1.0 else s.alpha * r
            product = step - pull(step)[0]  # (I - J)ᵀ step
            u = torch.addcmul(u, step, live)
            r = torch.addcmul(r, product, live, value=-1.0)
            steps = steps + live
            res = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
            broke = (live > 0) & ~torch.isfinite(res)
            mask = mask * ((res > tol) & ~broke)
            bad = bad | broke
        return (k + chunk, u, r, res, mask, steps, bad, z.clone(), x.clone(),
                *(t.clone() for t in tensors))

    chunk = min(_ADJOINT_CHUNK, s.adjoint_max_steps)
    state = (k, torch.zeros_like(g), g.clone(), res, mask, steps, bad, z, x, *tensors)
    _, u, _, res, _, steps, bad, *_ = run_while(cond, body, state)
    return u, res, tol, steps.to(torch.int64), bad


class _CompiledFixedPoint(torch.autograd.Function):
    """``z* = f(z*, x; θ)`` with the forward and adjoint loops above. Outputs: ``z*`` and the
    forward verdicts ``(residual, tolerance, steps, non_finite)`` (not differentiable)."""

    @staticmethod
    def forward(  # type: ignore[override]
        z0: Tensor, x: Tensor, f: _Map, s: CompiledSettings, holder: list | None, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        return _forward_loop(f, z0, x, tensors, s)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]  # noqa: ANN001
        _, x, f, s, holder, *tensors = inputs
        ctx.f, ctx.s, ctx.holder = f, s, holder
        ctx.save_for_backward(output[0], x, *tensors)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, g: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]  # noqa: ANN001
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not compiling:
            raise ValueError(
                "compiled_solve=True does not support create_graph=True (double backward): its "
                "adjoint loop is not itself differentiable. Use compiled_solve=False for "
                "higher-order derivatives."
            )
        z, x, *tensors = ctx.saved_tensors
        f, s = ctx.f, ctx.s
        u, res, tol, steps, bad = _adjoint_loop(f, z, x, tuple(tensors), g, s)
        # A sample whose adjoint diverged to NaN or Inf contributes no gradient (never NaN).
        u = torch.where(bad, torch.zeros_like(u), u)
        if not compiling:
            info = SolveInfo(
                converged=((res <= tol) & ~bad).squeeze(-1), steps=steps.squeeze(-1),
                residual=res.squeeze(-1), solver="Neumann", tolerance=tol.squeeze(-1),
            )
            if ctx.holder:  # the forward's info, which reports the adjoint solve eagerly
                ctx.holder[0].backward = info
            if bool(bad.any()):
                raise NonFiniteError(
                    "Neumann: the adjoint residual became NaN or Inf in the backward of the "
                    "compiled solve. The series u = g + J^T u diverges when the map's Jacobian has "
                    "spectral radius >= 1 at z*: make the map contractive, or give a smaller "
                    "Neumann(alpha=...)."
                )
            report_failure(info, s.adjoint_on_failure, "backward (adjoint) solve", _ADJOINT_ADVICE)
        wants_x = ctx.needs_input_grad[1]
        wants = [wants_x, *ctx.needs_input_grad[5:]]
        if not any(wants):
            return (None,) * (5 + len(tensors))
        inputs = (x, *tensors)
        chosen = tuple(t for t, w in zip(inputs, wants, strict=True) if w)

        def of_chosen(*vals: Tensor) -> Tensor:
            it = iter(vals)
            full = tuple(next(it) if w else t for t, w in zip(inputs, wants, strict=True))
            return f(z, full[0], full[1:])

        grads = iter(vjp(of_chosen, *chosen)[1](u))
        out = [next(grads) if w else None for w in wants]
        return (None, out[0], None, None, None, *out[1:])


_FORWARD_ADVICE = (
    "Raise max_steps, lower the damping, or make the map more contractive (compiled_solve runs "
    "Picard iteration only)."
)
_ADJOINT_ADVICE = (
    "Raise the Neumann solver's max_steps: the series converges slowly when the map's Jacobian "
    "at z* has spectral radius near 1."
)


def compiled_fixed_point(
    module: torch.nn.Module, z0: Tensor, x: Tensor, solver: ForwardSolver, adjoint: object
) -> tuple[Tensor, SolveInfo]:
    """Solve ``z = module(z, x)`` per sample with the compiled Picard loop, differentiable by
    the compiled adjoint loop.

    Args:
        module: the map, called as ``module(z, x)``; its parameters and buffers are passed to
            the loops explicitly.
        z0: initial guess ``(B, *state_shape)`` (receives no gradient).
        x: the input ``(B, ...)``.
        solver: the forward settings (damping, tolerances, ``max_steps``, ``on_failure``): a
            :class:`~implicit_layers.solvers.Picard` (see :func:`compiled_settings`).
        adjoint: the backward settings (Neumann ``max_steps``, ``alpha``, tolerances): a
            :class:`~implicit_layers.linear.Neumann`.

    Raises:
        TypeError: if ``solver`` is not a Picard solver or ``adjoint`` not a Neumann solver.

    Returns:
        ``(z*, info)``: ``z*`` shaped like ``z0``, and the forward's :class:`SolveInfo` (fields
        ``(B,)``; ``info.backward`` is filled by an eager backward).
    """
    if not isinstance(solver, Picard) or not isinstance(adjoint, Neumann):
        raise TypeError(
            "the compiled solve runs Picard forward and Neumann adjoint loops, got "
            f"{type(solver).__name__} and {type(adjoint).__name__}."
        )
    named = tuple(module.named_parameters()) + tuple(module.named_buffers())
    names = tuple(n for n, _ in named)
    tensors = tuple(t for _, t in named)
    f = _Map(module, names, z0.shape)
    settings = CompiledSettings.of(solver, adjoint, z0.dtype)
    compiling = torch.compiler.is_compiling()
    # Eagerly, the backward attaches its statistics to the info (a Python side effect that a
    # compiled graph cannot make).
    holder: list[SolveInfo] | None = None if compiling else []
    flat = z0.detach().reshape(z0.shape[0], math.prod(z0.shape[1:]))  # (B, n), also for B = 0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        z, res, tol, steps, bad = _CompiledFixedPoint.apply(flat, x, f, settings, holder, *tensors)
    else:  # nothing to differentiate (no_grad, inference_mode, frozen map): the loop alone
        z, res, tol, steps, bad = _forward_loop(f, flat, x, tensors, settings)
    info = SolveInfo(
        converged=((res <= tol) & ~bad).squeeze(-1), steps=steps.squeeze(-1),
        residual=res.squeeze(-1).to(z0.dtype), solver="Picard (compiled)",
        tolerance=tol.squeeze(-1).to(z0.dtype),
    )
    if holder is not None:
        holder.append(info)
        report(info, bad, settings)
    return z.view(z0.shape), info


def report(info: SolveInfo, bad: Tensor, settings: CompiledSettings) -> None:
    """The eager path's verdicts, outside a compiled region: NonFiniteError for a NaN or Inf
    residual, else a ConvergenceWarning (or error, per ``on_failure``) for unconverged samples.

    Under ``torch.compile`` no warning can be raised from inside the graph; the flags are in
    ``info`` (``info.converged``) for the caller to test.
    """
    if bool(bad.any()):
        raise NonFiniteError(
            "Picard (compiled): the residual became NaN or Inf for "
            f"{int(bad.sum())} sample(s). Check the map and the input for NaN, and lower the "
            "damping or make the map contractive."
        )
    report_failure(info, settings.forward_on_failure, "forward solve of fixed_point", _FORWARD_ADVICE)


_USE_INSTEAD = "or set compiled_solve=False"


def compiled_settings(
    solver: ForwardSolver | None, eval_solver: ForwardSolver | None, backward: object
) -> tuple[Picard, Picard | None, Neumann]:
    """The solvers of a layer with ``compiled_solve=True``, checked: Picard forward solvers
    (default ``Picard(max_steps=50)``) and a Neumann adjoint (default ``Neumann()``, at the
    forward tolerance), given as ``backward=Neumann(...)`` or ``Implicit(Neumann(...))``.

    Raises:
        ValueError: for another forward solver, backward mode or linear solver, or a fallback.
    """
    forward = Picard(max_steps=50) if solver is None else solver
    for name, given in (("solver", forward), ("eval_solver", eval_solver)):
        if given is not None and type(given) is not Picard:
            raise ValueError(
                f"compiled_solve=True runs Picard iteration only, got {name}="
                f"{type(given).__name__}; pass {name}=il.solvers.Picard(...) {_USE_INSTEAD}."
            )
    linear = backward.linear_solver if isinstance(backward, Implicit) else backward
    if isinstance(backward, Implicit) and backward.fallback is not None:
        raise ValueError(
            "compiled_solve=True has no fallback for a failed adjoint solve; pass "
            f"backward=il.linear.Neumann(...) without fallback {_USE_INSTEAD}."
        )
    if linear is not None and type(linear) is not Neumann:
        raise ValueError(
            "compiled_solve=True solves the adjoint with the Neumann series only, got "
            f"backward={type(linear if linear is not None else backward).__name__}; pass "
            f"backward=il.linear.Neumann(...) (or None) {_USE_INSTEAD}."
        )
    return forward, eval_solver, Neumann() if linear is None else linear  # type: ignore[return-value]


def check_call(x: Tensor, z0: Tensor | None) -> None:
    """Errors of the eager call that the compiled solve cannot honour (skipped while tracing).

    Raises:
        ValueError: under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``...).
        TypeError: for a structured (tuple/list/dict) initial state.
    """
    if torch.compiler.is_compiling():
        return
    if transforms_active():
        raise ValueError(
            "compiled_solve=True does not run under torch.func transforms (vmap, grad, jacrev, "
            "...): its loops are torch control-flow operators. Set compiled_solve=False (the "
            "eager solve supports every torch.func transform)."
        )
    if z0 is not None and not isinstance(z0, Tensor):
        raise TypeError(
            f"compiled_solve=True iterates one tensor state; z0 is a {type(z0).__name__}. Use "
            "a single tensor state, or compiled_solve=False for structured states."
        )
