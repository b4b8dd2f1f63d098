"""``custom_root`` with the compiled adjoint, traced into the caller's ``torch.compile`` graph.

Eagerly, and under ``torch.compile`` with any other backward, a ``custom_root`` layer runs as
one graph break (see :mod:`._eager`). With
:class:`~implicit_layers.backward.CompiledImplicit` it traces: the decorated solver (a closed
form, or any traceable loop) and one call of the optimality function become part of the
caller's graph, and the adjoint solve is one opaque operator of its backward graph,
:func:`adjoint_solve`. So under ``torch.compile`` the layer is no graph break
(``fullgraph=True`` holds), and the forward and backward each compile whole, as ``jax.jit`` of a
jaxopt ``custom_root`` does.

The implicit gradient is attached without a recorded linearisation: the output is
``z* + S(F(z*, θ))``, where ``F`` is evaluated at the detached solution with the parameters
live and ``S`` is the zero map whose backward is ``g ↦ -A⁻ᵀ g`` (``A = ∂F/∂z`` at ``z*``).
Autograd then carries ``-(∂F/∂θ)ᵀ A⁻ᵀ g`` through ``F``'s own graph to every tensor ``F`` reads
(explicit arguments and closed-over tensors alike), which is the implicit function theorem's
gradient. The value is ``z*`` exactly (``S`` returns zeros).

The adjoint solve runs, when the backward runs, the compiled CG loop of
:class:`~implicit_layers.backward.CompiledImplicit` (:func:`._compiled_adjoint._compiled_cg`:
its own graph and compiler settings, the same iterates) through the function as it is then,
and gives its verdicts as the eager backward does (a ``ConvergenceWarning``, or an error per
the CG settings' ``on_failure``). Where torch cannot compile that loop, it solves with the eager
CG instead. Being opaque to the caller's compiler, the loop is compiled once per function and
shape, whatever graphs call it, and the caller's graph holds no ``while_loop``.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._config import default_rtol
from .linear._operator import FunctionOperator
from .linear.cg import CG

__all__ = ["adjoint_solve", "implicit_zero", "register_layer", "traced_custom_root"]


@dataclass(frozen=True)
class _Layer:
    """What the adjoint solve of one ``custom_root`` layer needs besides tensors: the
    optimality function (weakly held where it can be), its name and the settings."""

    fn: Callable[[], Callable[..., Tensor] | None]
    batched: bool
    cg: CG
    rtol: float | None
    name: str

    @property
    def what(self) -> str:
        """The adjoint solve's subject in warnings."""
        return f"backward (adjoint) solve of custom_root ({self.name})"


#: The layers that may trace, by the key their backward graphs hold.
_LAYERS: dict[int, _Layer] = {}
_KEYS = itertools.count()


def register_layer(fn: Callable[..., Tensor], batched: bool, cg: CG, rtol: float | None,
                   name: str) -> int:
    """The key of a ``custom_root`` layer with ``CompiledImplicit`` (made when it is decorated,
    outside any tracing: a registry written while dynamo traces would be a side effect replayed,
    and guarded, at every call of the compiled function)."""
    key = next(_KEYS)
    try:
        ref: Callable[[], Callable[..., Tensor] | None] = weakref.ref(fn)
        weakref.finalize(fn, _LAYERS.pop, key, None)  # the entry goes with the function
    except TypeError:  # not weakly referenceable: held
        ref = lambda: fn  # noqa: E731
    _LAYERS[key] = _Layer(fn=ref, batched=batched, cg=cg, rtol=rtol, name=name)
    return key


@torch.library.custom_op("implicit_layers::adjoint_solve", mutates_args=())
def adjoint_solve(key: int, z: Tensor, g: Tensor, tensors: list[Tensor]) -> Tensor:
    """``u`` with ``(∂F/∂z)ᵀ u = g`` at ``z``, by CG, for the traced layer ``key``.

    Args:
        key: the layer (see :func:`register_layer`).
        z: the solution, shaped like the layer's ``z0``.
        g: the cotangent of ``z``, the same shape.
        tensors: the layer's arguments (detached), in order.

    Returns:
        ``u``, shaped like ``z``.

    Raises:
        NonFiniteError: the adjoint residual became NaN or Inf.
        ConvergenceError: a sample did not converge and the CG settings say ``"raise"``.
        ValueError: the function cannot be traced (see ``guarded_loop``).
    """
    from ._compiled_adjoint import _compiled_cg, guarded_loop, loop_verdict

    layer = _LAYERS.get(key)
    fn = None if layer is None else layer.fn()
    if layer is None or fn is None:  # a graph outlived its function (its guards stop that)
        raise RuntimeError("the custom_root layer of this compiled backward no longer exists.")
    args = tuple(tensors)
    shape, cg = z.shape, layer.cg
    B = shape[0] if layer.batched else 1
    flat_z, gf = z.reshape(B, -1).contiguous(), g.reshape(B, -1).contiguous()

    def residual(flat: Tensor) -> Tensor:
        return fn(flat.view(shape), *args).reshape(flat.shape)

    inherited = default_rtol(g.dtype) if layer.rtol is None else layer.rtol
    rtol = inherited if cg.rtol is None else cg.resolved_rtol(g.dtype)
    tol = torch.clamp(rtol * torch.linalg.vector_norm(gf, dim=-1), min=cg.atol)
    limit = torch.tensor(cg.max_steps, device=g.device)
    ran = guarded_loop(lambda: _compiled_cg(fn)(residual, flat_z, gf, tol, limit), fn, layer.name)
    if ran is None:  # the eager CG: the same steps
        pull = torch.func.vjp(residual, flat_z)[1]
        op = FunctionOperator(lambda v: pull(v)[0], B, flat_z.shape[1], g.dtype, g.device,
                              symmetric=True, positive_definite=True)
        u, _ = cg.replace(rtol=rtol).solve(op, gf, what=layer.what)
        return u.view(shape)
    u, res, steps, converged, flags = ran
    loop_verdict(res, steps, converged, tol, flags, cg.on_failure, layer.what, cg._advice())
    return u.view(shape)


@adjoint_solve.register_fake
def _(key: int, z: Tensor, g: Tensor, tensors: list[Tensor]) -> Tensor:
    return torch.empty_like(g)



@torch.library.custom_op("implicit_layers::implicit_zero", mutates_args=())
def implicit_zero(r: Tensor, z: Tensor, key: int, tensors: list[Tensor]) -> Tensor:
    """``S(r) = 0``, whose derivative makes ``S(F(z*, θ))`` carry the implicit derivative of
    ``z*``: its backward maps ``g`` to ``-A⁻ᵀ g``, ``A = ∂F/∂z`` at ``z*`` (symmetric: CG, by
    :func:`adjoint_solve`). An operator with a derivative of its own rather than an
    ``autograd.Function``: the backward then runs under autograd's own grad mode, so that a
    backward with ``create_graph=True`` is refused (dynamo runs a traced Function's backward
    without grad, where the second derivative would come out wrong, without an error)."""
    return torch.zeros_like(r)


@implicit_zero.register_fake
def _(r: Tensor, z: Tensor, key: int, tensors: list[Tensor]) -> Tensor:
    return torch.empty_like(r)


def _setup_implicit_zero(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, z, key, tensors = inputs
    ctx.key = key
    ctx.save_for_backward(z, *tensors)


def _implicit_zero_backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise ValueError(
            "custom_root with CompiledImplicit inside torch.compile does not support "
            "create_graph=True (double backward): its adjoint solve is one operator without a "
            "derivative of its own. Call the layer outside torch.compile for higher-order "
            "derivatives (CompiledImplicit's eager path is exact to every order)."
        )
    z, *tensors = ctx.saved_tensors
    return -adjoint_solve(ctx.key, z, g, tensors), None, None, [None] * len(tensors)


implicit_zero.register_autograd(_implicit_zero_backward, setup_context=_setup_implicit_zero)


def traced_custom_root(
    key: int,
    fn: Callable[..., Tensor],
    solver_fn: Callable[..., Any],
    z0: Tensor,
    args: tuple[Any, ...],
    batched: bool,
    has_aux: bool,
) -> Any:
    """The ``custom_root`` layer as torch operations and one opaque adjoint solve (called while
    dynamo traces).

    Args:
        key: the layer's key (:func:`register_layer`).
        fn: the optimality function ``F(z, *args)``.
        solver_fn: the decorated solver, called as ``solver_fn(z0, *args)`` on detached inputs.
        z0: the initial guess, a tensor (``(B, ...)`` when batched).
        args: the extra arguments.
        batched: whether the leading dimension indexes independent problems.
        has_aux: the solver returns ``(z*, aux)``.

    Returns:
        ``z*`` (and ``aux``), or ``None`` where an argument is not a tensor, ``z0`` is not one
        the eager layer takes, or the solver's output or the optimality function's is not a
        tensor shaped like ``z0`` (the caller then runs the eager layer, which says what is
        wrong).
    """
    # What the eager layer refuses with an error, it is left to say.
    if (not all(isinstance(a, Tensor) for a in args) or not z0.is_floating_point()
            or z0.numel() == 0 or (batched and z0.dim() == 0)):
        return None
    detached = tuple(a.detach() for a in args)
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
        z = z + implicit_zero(r, z, key, list(detached))
    return (z, aux) if has_aux else z
