"""``custom_root`` with the compiled adjoint, traced into the caller's ``torch.compile`` graph.

Eagerly, and under ``torch.compile`` with any other backward, a ``custom_root`` layer runs as
one graph break (see :mod:`._eager`). With
:class:`~implicit_layers.backward.CompiledImplicit` everything the layer does can be traced:
the decorated solver (a closed form, or any traceable loop), one call of the optimality
function, and the adjoint CG loop, a ``while_loop``. So under ``torch.compile`` the layer
becomes part of the caller's graph (``fullgraph=True`` holds) and the whole forward + backward
compiles, as ``jax.jit`` of a jaxopt ``custom_root`` does.

The implicit gradient is attached without a recorded linearisation: the output is
``z* + S(F(z*, θ))``, where ``F`` is evaluated at the detached solution with the parameters
live and ``S`` is the zero map whose backward is ``g ↦ -A⁻ᵀ g`` (``A = ∂F/∂z`` at ``z*``, a CG
solve). Autograd then carries ``-(∂F/∂θ)ᵀ A⁻ᵀ g`` through ``F``'s own graph to every tensor ``F``
reads (explicit arguments and closed-over tensors alike), which is the implicit function
theorem's gradient. The value is ``z*`` exactly (``S`` returns zeros).

The CG loop is :func:`._compiled_adjoint._cg_loop` (the same iterates as the standalone
compiled adjoint). Its verdicts leave the compiled backward through one opaque operator,
:func:`adjoint_verdict`, which raises for NaN and warns (or raises) for samples that did not
converge, exactly as the eager backward does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._info import NonFiniteError, SolveInfo, report_failure
from .linear.cg import CG

__all__ = ["adjoint_verdict", "traced_custom_root"]


@torch.library.custom_op("implicit_layers::adjoint_verdict", mutates_args=())
def adjoint_verdict(
    u: Tensor, residual: Tensor, steps: Tensor, tolerance: Tensor, on_failure: str, what: str,
    advice: str,
) -> Tensor:
    """``u``, after the verdicts of the adjoint solve that produced it.

    An operator of its own so that a compiled backward keeps it (its output is the gradient)
    and runs it as Python: a graph cannot warn or raise.

    Args:
        u: the adjoint solution ``(B, n)``.
        residual, steps, tolerance: per-sample statistics ``(B,)``.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` (the CG settings').
        what, advice: the warning's subject and advice.

    Returns:
        A copy of ``u``.

    Raises:
        NonFiniteError: a residual became NaN or Inf.
        ConvergenceError: a sample did not converge and ``on_failure="raise"``.
    """
    # The verdicts are computed here, not in the graph: the few operations on (B,) tensors
    # would be one more fused kernel in the graph's C++ unit, where the compiler then inlines
    # less in the loop's kernel (2.5x slower CG steps were measured that way).
    converged = residual <= tolerance
    finite, all_converged = torch.stack([torch.isfinite(residual).all(), converged.all()]).tolist()
    if not finite:
        raise NonFiniteError(
            "CG: the residual of the compiled adjoint solve became NaN or Inf. Check the "
            "optimality function for NaN at the solution; its Jacobian there must be finite."
        )
    info = SolveInfo(converged=converged, steps=steps, residual=residual, solver="CG (compiled)",
                     tolerance=tolerance)
    info._known_converged = all_converged
    report_failure(info, on_failure, what, advice)  # type: ignore[arg-type]
    return u.clone()


@adjoint_verdict.register_fake
def _(u: Tensor, *_: Any) -> Tensor:
    return torch.empty_like(u)


class _AdjointSolve(torch.autograd.Function):
    """``S(r) = 0`` with ``∂S`` such that ``S(F(z*, θ))`` has the implicit derivative of
    ``z*``: the backward maps ``g`` to ``-A⁻ᵀ g``, ``A = ∂F/∂z`` at ``z*`` (symmetric: CG)."""

    @staticmethod
    def forward(  # type: ignore[override]
        r: Tensor, z: Tensor, fn: Callable[..., Tensor], cg: CG, rtol: float, batched: bool,
        what: str, advice: str, *args: Any,
    ) -> Tensor:
        return torch.zeros_like(r)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]  # noqa: ANN001
        _, z, fn, cg, rtol, batched, what, advice, *args = inputs
        ctx.fn, ctx.cg, ctx.rtol, ctx.batched = fn, cg, rtol, batched
        ctx.what, ctx.advice = what, advice
        # The arguments travel as saved tensors (detached: constants of the adjoint operator)
        # and Python values, in their places.
        ctx.places = tuple(isinstance(a, Tensor) for a in args)
        ctx.values = tuple(None if isinstance(a, Tensor) else a for a in args)
        ctx.save_for_backward(z, *(a for a in args if isinstance(a, Tensor)))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]  # noqa: ANN001
        from ._compiled_adjoint import _cg_loop, _compiled_cg

        z, *saved = ctx.saved_tensors
        it = iter(saved)
        args = tuple(next(it) if t else v for t, v in zip(ctx.places, ctx.values, strict=True))
        fn, cg = ctx.fn, ctx.cg
        shape = z.shape
        B = shape[0] if ctx.batched else 1
        flat_z = z.reshape(B, -1)

        # A tuple of sizes, not the torch.Size: under dynamic shapes what the loop's body
        # closes over becomes an input of the loop, and while_loop takes sizes but no Size.
        dims = tuple(shape)

        def residual(flat: Tensor, *args: Tensor) -> Tensor:
            return fn(flat.view(dims), *args).reshape(flat.shape)

        gf = g.reshape(B, -1).contiguous()
        rtol = ctx.rtol if cg.rtol is None else cg.resolved_rtol(g.dtype)
        tol = torch.clamp(rtol * torch.linalg.vector_norm(gf, dim=-1), min=cg.atol)
        limit = torch.full((), cg.max_steps, dtype=torch.int64, device=g.device)
        if torch.compiler.is_compiling():
            u, res, steps, _, _ = _cg_loop(lambda v: residual(v, *args), flat_z, gf, tol, limit)
        else:  # a backward run eagerly (the "eager" backend): the loop compiled on its own
            u, res, steps, _, _ = _compiled_cg(fn)(
                lambda v: residual(v, *args), flat_z.contiguous(), gf, tol, limit)
        u = adjoint_verdict(u, res, steps, tol, cg.on_failure, ctx.what, ctx.advice)
        return (-u.view(shape),) + (None,) * (7 + len(ctx.places))


def traced_custom_root(
    fn: Callable[..., Tensor],
    solver_fn: Callable[..., Any],
    z0: Tensor,
    args: tuple[Any, ...],
    cg: CG,
    rtol: float | None,
    batched: bool,
    has_aux: bool,
    what: str,
    advice: str,
) -> Any:
    """The ``custom_root`` layer as torch operations only (called while dynamo traces).

    Args:
        fn: the optimality function ``F(z, *args)``.
        solver_fn: the decorated solver, called as ``solver_fn(z0, *args)`` on detached inputs.
        z0: the initial guess, a tensor (``(B, ...)`` when ``batched``).
        args: the extra arguments (tensors receive gradients; other values pass through).
        cg: the adjoint CG settings.
        rtol: the layer's tolerance, inherited by a CG with ``rtol=None`` (``None``: the
            default of the dtype).
        batched: whether the leading dimension indexes independent problems.
        has_aux: the solver returns ``(z*, aux)``.
        what, advice: the subject and the advice of the adjoint solve's warnings (made before
            tracing: under dynamic shapes dynamo makes the settings' integers symbolic, and
            cannot format those into a string).

    Returns:
        ``z*`` (and ``aux``), or ``None`` where the solver's output or the optimality
        function's is not a tensor shaped like ``z0`` (the caller then runs the eager layer,
        which says what is wrong).
    """
    detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    result = solver_fn(z0.detach(), *detached)
    aux = None
    if has_aux:
        if not (isinstance(result, tuple) and len(result) == 2):
            return None
        result, aux = result
    if not isinstance(result, Tensor) or result.shape != z0.shape or result.dtype != z0.dtype:
        return None
    z = result.detach()
    with torch.enable_grad():
        r = fn(z, *args)
    if not isinstance(r, Tensor) or r.shape != z.shape:
        return None
    if r.requires_grad:
        from ._config import default_rtol

        tol = default_rtol(z.dtype) if rtol is None else rtol
        z = z + _AdjointSolve.apply(r, z, fn, cg, tol, batched, what, advice, *detached)
    return (z, aux) if has_aux else z
