"""Drop-in ``torch.nn.Module`` layers built on the functional core.

* :class:`DEQ` — a deep equilibrium layer ``z* = f(z*, x)`` with ``f`` an ``nn.Module``.
* :class:`ArgminLayer` — ``w* = argmin_w L(w, x)`` per sample, optionally inside a box
  ``lower <= w <= upper`` (projected-gradient fixed point, differentiated implicitly).
* :func:`jacobian_penalty` — Hutchinson estimate of ``‖∂f/∂z‖_F²`` at the equilibrium, the
  Jacobian regulariser of Bai et al. (2021), "Stabilizing Equilibrium Models by Jacobian
  Regularization".
* The DEQ toolkit: :func:`apply_norm` / :func:`reset_norm` / :func:`remove_norm` (weight or
  spectral normalisation of the map's layers, computed once per solve) and
  :class:`VariationalDropout` / :func:`reset_dropout` (one dropout mask per solve);
  ``DEQ.forward(..., states=...)`` samples states along the solve.

Both layers treat the leading dimension as the batch: each sample is its own problem, with
its own convergence test and its own entry in the :class:`~implicit_layers.SolveInfo`.
Diagnostics are returned on request by ``forward(..., return_info=True)``; the returned info's
``backward`` field is filled in once ``loss.backward()`` has run through the layer (for the
implicit backward modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from ._capture import transforms_active
from ._compiled_solve import check_call, compiled_fixed_point, compiled_settings
from ._deq_dropout import VariationalDropout, reset_dropout
from ._deq_lipschitz import BoundedMap, StateLayerBound, check_lipschitz
from ._deq_norm import apply_norm, precompute_norm, remove_norm, reset_norm
from ._deq_trajectory import Recorder, attach_state, check_states, pick_states
from ._eager import run_eagerly
from ._info import SolveInfo
from ._problem import KINDS
from ._qp import QPLayer
from .backward import BackwardMode, Unrolled
from .functional import argmin as _argmin
from .functional import fixed_point as _fixed_point
from .linear._base import LinearSolver
from .linear._power import power_iteration
from .solvers import LBFGS, Adaptive, Anderson, ForwardSolver, ProximalGradient

__all__ = [
    "DEQ",
    "ArgminLayer",
    "QPLayer",
    "jacobian_penalty",
    "apply_norm",
    "reset_norm",
    "remove_norm",
    "VariationalDropout",
    "reset_dropout",
]

Backward = BackwardMode | LinearSolver | None


def _check_solver(solver: object, name: str, kind: str) -> ForwardSolver | None:
    if solver is None:
        return None
    if not isinstance(solver, ForwardSolver):
        raise TypeError(
            f"{name} must be a forward solver from il.solvers (e.g. il.solvers.Anderson()), got "
            f"{type(solver).__name__}."
        )
    if not solver.solves(kind):
        raise ValueError(
            f"{name}={type(solver).__name__} cannot solve the {kind} problem of this layer; use "
            f"{KINDS[kind].solvers_hint}."
        )
    return solver


def _check_shape(shape: object, name: str) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(
            f"{name} must be a tuple of positive ints (the per-sample shape, without the batch "
            f"dimension), got {shape!r}."
        )
    return tuple(shape)


def _check_backward(backward: object) -> Backward:
    if backward is None or isinstance(backward, (BackwardMode, LinearSolver)):
        return backward
    raise TypeError(
        "backward must be a backward mode from il.backward (Implicit(), Unrolled(), "
        "Truncated(k), JacobianFree(), Phantom(k, damping)), a linear solver from il.linear "
        f"(meaning Implicit(that solver)) or None; got {type(backward).__name__}."
    )


def _initial_guess(
    given: Tensor | None,
    given_name: str,
    x: Tensor,
    shape: tuple[int, ...] | None,
    shape_name: str,
    module: torch.nn.Module,
) -> Tensor:
    """``given`` checked against the batch of ``x``, or zeros of shape ``(B, *shape)``.

    The zeros take the dtype of ``x`` if it is floating point (else of the module's first
    floating parameter, so that e.g. token ids can be the input) and the device of ``x``.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a tensor with a leading batch dimension, got {got}.")
    if given is not None and isinstance(given, (tuple, list, dict)):
        # A structured state (e.g. a multi-resolution DEQ's): every tensor is batched like x.
        leaves = tree_flatten(given)[0]
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(f"{given_name} must be a tensor, a tuple/list/dict of tensors or None.")
        for t in leaves:
            if t.dim() < 1 or t.shape[0] != x.shape[0]:
                raise ValueError(
                    f"every tensor of {given_name} must have the batch size of x ({x.shape[0]}) "
                    f"as leading dimension, got shape {tuple(t.shape)}."
                )
        return given
    if given is not None:
        if not isinstance(given, Tensor):
            raise TypeError(f"{given_name} must be a tensor or None, got {type(given).__name__}.")
        if given.dim() < 1 or given.shape[0] != x.shape[0]:
            raise ValueError(
                f"{given_name} must have the batch size of x ({x.shape[0]}) as leading dimension, "
                f"got shape {tuple(given.shape)}."
            )
        if shape is not None and tuple(given.shape[1:]) != shape:
            raise ValueError(
                f"{given_name} must have shape (B, *{shape_name}) = ({x.shape[0]}, "
                f"{', '.join(map(str, shape))}), got {tuple(given.shape)}."
            )
        return given
    if shape is None:
        if not x.is_floating_point():
            raise ValueError(
                f"without {shape_name} the state takes the shape of x, which must then be a "
                f"floating-point tensor (got {x.dtype}); pass {shape_name}=... or {given_name}."
            )
        return torch.zeros_like(x)
    dtype = x.dtype
    if not x.is_floating_point():
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()),
                     torch.get_default_dtype())
    return torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)


class DEQ(torch.nn.Module):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)`` for every sample.

    The forward pass solves the fixed point without recording a graph; gradients to ``x`` and
    to every parameter of ``f`` come from the backward mode (by default the implicit function
    theorem, whose memory does not depend on the number of forward iterations).

    By default the layers of an ``nn.Module`` map that the state passes through are used with
    their spectral norm bounded by 0.9 (``lipschitz``), which keeps a ``tanh``/``relu`` map
    contractive while it trains; ``lipschitz=None`` solves ``f`` exactly as given.

    The DEQ toolkit composes with the layer: weight or spectral normalisation of the map's
    layers (:func:`apply_norm`) is computed once per solve, and in training mode every forward
    first advances the spectral norms' power iterations (:func:`reset_norm`) and draws new
    :class:`VariationalDropout` masks (:func:`reset_dropout`), which then stay fixed for the
    iterations of the solve and its backward. ``forward(..., states=...)`` returns states along
    the solve for a fixed-point correction loss.

    Args:
        f: the equilibrium map, called as ``f(z, x, *args)`` with ``z`` of shape
            ``(B, *state_shape)``, returning a tensor of that shape: an ``nn.Module``
            (registered as a submodule, so ``.to()``, ``.double()``, ``state_dict()`` and
            ``parameters()`` see it) or any function, e.g. one closing over the parameters of
            an enclosing module (torchdeq's style; gradients reach every tensor it uses, but
            the layer does not own them).
        solver: forward solver used in training mode (default
            ``il.solvers.Adaptive(max_steps=50)``: plain iteration, Anderson once the observed
            contraction is slow).
        backward: how gradients flow: a mode from :mod:`implicit_layers.backward`
            (``Implicit(linear_solver, fallback=...)``, ``Unrolled()``, ``Truncated(k)``,
            ``JacobianFree()``, ``Phantom(k, damping)``) or a linear solver, meaning
            ``Implicit(that solver)``. Default: implicit at the forward tolerance, with
            the linear solver the default forward solver picks (Neumann, finished by GMRES if
            needed, after plain iteration; GMRES after Anderson or with other solvers).
            ``Implicit(..., fallback=il.backward.Phantom())`` replaces the gradient of samples
            whose adjoint solve fails by the phantom gradient, with a warning.
        eval_solver: forward solver used in eval mode (``module.eval()``), e.g. with a
            different ``max_steps`` or tolerance than training; ``None`` uses ``solver``.
        state_shape: per-sample shape of ``z`` (without the batch dimension), used for the
            default initial guess (zeros). ``None`` means ``z`` has the shape of ``x``.
        lipschitz: bound on the spectral norm of every ``nn.Linear`` / ``nn.Conv*`` layer of
            ``f`` that the state passes through (found on the first call); each such weight is
            used as ``W · lipschitz / max(σ(W), lipschitz)`` (``σ`` by power iteration, one
            step per training solve), so weights inside the bound are unchanged. With
            1-Lipschitz activations and a bound below 1, ``z ↦ f(z, x)`` stays a contraction
            however training moves the weights: the fixed point exists, is unique, and the
            implicit gradient is that of a well-posed layer. Layers that see only ``x`` (and
            layers normalised by :func:`apply_norm`) are left as they are; the module itself
            is not changed (its ``state_dict`` keeps its keys, ``f(z, x)`` called directly uses
            the raw weights). ``"auto"`` (default): 0.9 for an ``nn.Module`` map, ``None`` for
            a function map and with ``compiled_solve=True``. ``None``: solve ``f`` exactly as
            given; when training makes it non-contractive its solves may stop converging
            (each one warns) and the exact gradient is that of an ill-posed layer.
        compiled_solve: run the forward Picard loop and the adjoint Neumann loop as torch
            control-flow operators (default ``False``), so that under ``torch.compile`` the
            layer traces into the model's graph (``fullgraph=True`` holds); eagerly the same
            steps run in Python. Needs ``solver``/``eval_solver`` ``Picard`` (default
            ``Picard(max_steps=50)``) and ``backward`` a ``Neumann`` (default ``Neumann()``);
            no ``torch.func`` transforms, no double backward, and under ``torch.compile`` no
            ConvergenceWarning (test ``info.converged``). See ``docs/guides/deq.md``,
            "Compiled solves".

    Shapes:
        ``x``: ``(B, ...)``; output ``z*``: ``(B, *state_shape)``.

    Raises:
        TypeError: ``f`` is not callable, ``solver`` or ``eval_solver`` is not a
            forward solver of :mod:`implicit_layers.solvers`, or ``backward`` is neither a
            backward mode nor a linear solver.
        ValueError: ``state_shape`` is not a sequence of positive ints, ``compiled_solve=True``
            with a forward solver other than Picard or a backward other than Neumann, or
            ``lipschitz`` is not ``"auto"``, ``None`` or a positive number, or is a number
            with a function map or ``compiled_solve=True``.

    Examples:
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(16, 16)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> deq = il.nn.DEQ(Cell(), solver=il.solvers.Anderson(max_steps=30))
        >>> z, info = deq(torch.randn(8, 16), return_info=True)
        >>> z.shape, info.steps.shape, bool(info.converged.all())
        (torch.Size([8, 16]), torch.Size([8]), True)
        >>> z.sum().backward()          # implicit gradients to the parameters of Cell
        >>> info.backward.steps.shape   # the adjoint solve's steps, per sample
        torch.Size([8])

        A function closing over parameters works the same way:

        >>> lin = torch.nn.Linear(16, 16)
        >>> deq = il.nn.DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x))
        >>> deq(torch.randn(8, 16)).sum().backward()
        >>> lin.weight.grad.shape
        torch.Size([16, 16])
    """

    f: Callable[..., Any]
    lipschitz: float | None
    _bound: StateLayerBound | None

    def __init__(
        self,
        f: Callable[..., Tensor],
        *,
        solver: ForwardSolver | None = None,
        backward: Backward = None,
        eval_solver: ForwardSolver | None = None,
        state_shape: Sequence[int] | int | None = None,
        lipschitz: float | Literal["auto"] | None = "auto",
        compiled_solve: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(compiled_solve, bool):
            raise TypeError(f"compiled_solve must be a bool, got {type(compiled_solve).__name__}.")
        if compiled_solve:
            solver, eval_solver, backward = compiled_settings(solver, eval_solver, backward)
        self.compiled_solve = compiled_solve
        if not callable(f):
            raise TypeError(
                f"f must be the equilibrium map called as f(z, x): an nn.Module or a function, "
                f"got {type(f).__name__}."
            )
        if compiled_solve and not isinstance(f, torch.nn.Module):
            raise TypeError(
                "compiled_solve=True needs f as an nn.Module (its parameters become explicit "
                f"inputs of the compiled loops), got {type(f).__name__}; wrap the function in an "
                "nn.Module or use compiled_solve=False."
            )
        self.f = f
        self.lipschitz = _resolve_lipschitz(lipschitz, f, compiled_solve)
        self._bound = None if self.lipschitz is None else StateLayerBound(self.lipschitz)
        self.solver = _check_solver(solver, "solver", "fixed_point") or Adaptive(max_steps=50)
        self.eval_solver = _check_solver(eval_solver, "eval_solver", "fixed_point")
        self.backward = _check_backward(backward)
        self.state_shape = _check_shape(state_shape, "state_shape")
        if not compiled_solve and type(self).forward is DEQ.forward:
            # The whole call runs eagerly under torch.compile: the graph breaks at the layer
            # call itself, and dynamo has no frame of `forward` to look up and guard per call.
            self.forward = self._eager_forward  # type: ignore[method-assign]

    @property
    def active_solver(self) -> ForwardSolver:
        """The solver the next forward call uses (``eval_solver`` in eval mode if set)."""
        if not self.training and self.eval_solver is not None:
            return self.eval_solver
        return self.solver

    def forward(
        self,
        x: Tensor,
        z0: Tensor | None = None,
        *,
        args: Sequence[Any] = (),
        states: int | Sequence[int] | None = None,
        return_info: bool = False,
    ) -> Any:
        """Solve ``z = f(z, x, *args)`` per sample.

        Args:
            x: input ``(B, ...)``, passed unchanged as the second argument of ``f`` (any dtype,
                e.g. token ids, when ``state_shape`` is set).
            z0: initial guess ``(B, *state_shape)`` (e.g. the previous equilibrium, for a warm
                start); default zeros. It receives no gradient.
            args: extra inputs of ``f``, passed after ``x`` (tensors receive gradients).
            states: trajectory sampling (torchdeq's ``n_states`` / ``indexing``): ``None``
                returns ``z*``; an int ``n`` returns a list of ``n`` states spread evenly along
                the solve, the last being ``z*``; a sequence of iteration indices returns the
                states after that many evaluations of ``f`` (an index past the end of the
                solve gives ``z*``). Each state carries the layer's backward mode's gradient,
                attached at that state (a step mode returns the state after its
                differentiated steps), so a correction loss is a sum of losses over the list.
            return_info: also return the :class:`~implicit_layers.SolveInfo` (fields of shape
                ``(B,)``; ``info.backward`` is set after ``backward()`` for implicit modes).

        Returns:
            ``z*`` of shape ``(B, *state_shape)`` (a list of such states if ``states`` is
            given), and the info if ``return_info``.

        Raises:
            ValueError: ``states`` is not ``None``, a positive int or a sequence of positive
                ints, or is given with a structured state ``z0`` or ``backward=Unrolled()``.
        """
        if self.compiled_solve:  # traced by torch.compile (no graph break)
            if states is not None or len(args) > 0:
                raise ValueError(
                    "compiled_solve=True supports f(z, x) without states= or args=; use "
                    "compiled_solve=False for trajectory states or extra inputs."
                )
            check_call(x, z0)
            z0 = _initial_guess(z0, "z0", x, self.state_shape, "state_shape", self)
            # f is an nn.Module here: __init__ refuses compiled_solve=True otherwise.
            f = cast(torch.nn.Module, self.f)
            z, info = compiled_fixed_point(f, z0, x, self.active_solver, self.backward)
            return (z, info) if return_info else z
        return self._eager_forward(x, z0, args=args, states=states, return_info=return_info)

    @run_eagerly
    def _eager_forward(
        self,
        x: Tensor,
        z0: Tensor | None = None,
        *,
        args: Sequence[Any] = (),
        states: int | Sequence[int] | None = None,
        return_info: bool = False,
    ) -> Any:
        """:meth:`forward` without the compiled solve (same arguments), run eagerly."""
        states = check_states(states)
        z0 = _initial_guess(z0, "z0", x, self.state_shape, "state_shape", self)
        args = tuple(args)
        if self.training and isinstance(self.f, torch.nn.Module):
            # One power-iteration step and one dropout mask per solve, not per iteration.
            reset_norm(self.f)
            reset_dropout(self.f)
        base = self._bounded_map(z0, x, args)
        if x.shape[0] == 0:
            # An empty batch has nothing to solve; like nn.Linear, return an empty batch
            # (through f, so that the parameters still receive their zero gradients).
            empty = base(z0, x, *args)
            return _empty_result(empty if states is None else [empty], self.active_solver,
                                 return_info)
        if states is not None and not isinstance(z0, Tensor):
            raise ValueError("states=... needs a tensor state; z0 is a structured state.")
        if states is not None and isinstance(self.backward, Unrolled):
            raise ValueError(
                "states=... attaches the layer's backward at each sampled state, which "
                "backward=Unrolled() cannot do; use an implicit backward, JacobianFree() or "
                "Phantom(k) with states."
            )
        f = base
        if states is not None:
            f = Recorder(base, None if isinstance(states, int) else set(states))
        normalised = isinstance(self.f, torch.nn.Module) and any(
            parametrize.is_parametrized(m) for m in self.f.modules()
        )
        # Parametrized weights (apply_norm) are computed once for the whole solve.
        with parametrize.cached() if normalised else contextlib.nullcontext():
            if normalised:
                precompute_norm(self.f)  # type: ignore[arg-type]
            z, info = _fixed_point(
                f, z0, x, *args, solver=self.active_solver, backward=self.backward,
                batched=True, return_info=True,
            )
            if isinstance(f, Recorder):
                picked = pick_states(f.iterates, z, states)  # type: ignore[arg-type]
                out: Any = [z if s is None else attach_state(base, s, (x, *args), self.backward)
                            for s in picked]
            else:
                out = z
        return (out, info) if return_info else out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "forward" in state:
            # A copy (copy.copy, deepcopy, unpickling) solves with its own settings and map.
            self.forward = self._eager_forward  # type: ignore[method-assign]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # New weights: the bound's power iterations start afresh from them on the next call.
        if self._bound is not None:
            self._bound.reset()
        super()._load_from_state_dict(*args, **kwargs)

    def _bounded_map(self, z0: Any, x: Tensor, args: tuple[Any, ...]) -> Callable[..., Any]:
        """The map the solve uses: ``f`` with its state layers' weights bounded (computed once
        for this solve), or ``f`` itself without a bound."""
        if self._bound is None or not isinstance(self.f, torch.nn.Module):
            return self.f
        if self._bound.names is None:
            self._bound.find_state_layers(self.f, z0, x, args)
        weights = self._bound.weights(self.f, advance=self.training) if self._bound.names else {}
        return BoundedMap(self.f, weights) if weights else self.f

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}", f"backward={self.backward!r}"]
        if self.lipschitz is not None:
            parts.append(f"lipschitz={self.lipschitz}")
        if self.eval_solver is not None:
            parts.append(f"eval_solver={self.eval_solver!r}")
        if self.state_shape is not None:
            parts.append(f"state_shape={self.state_shape}")
        if not isinstance(self.f, torch.nn.Module):
            parts.insert(0, f"f={getattr(self.f, '__qualname__', type(self.f).__name__)}")
        if self.compiled_solve:
            parts.append("compiled_solve=True")
        return ", ".join(parts)


def _resolve_lipschitz(lipschitz: object, f: object, compiled_solve: bool) -> float | None:
    """The DEQ's spectral bound: ``"auto"`` is 0.9 for an eager ``nn.Module`` map, else ``None``."""
    if isinstance(lipschitz, str) and lipschitz == "auto":
        return 0.9 if isinstance(f, torch.nn.Module) and not compiled_solve else None
    bound = check_lipschitz(lipschitz)
    if bound is not None and not isinstance(f, torch.nn.Module):
        raise ValueError(
            f"lipschitz={bound} bounds the layers of an nn.Module map, but f is a "
            f"{type(f).__name__}; pass lipschitz=None, or bound the layers the function uses "
            "with il.nn.apply_norm."
        )
    if bound is not None and compiled_solve:
        raise ValueError(
            f"lipschitz={bound} is not available with compiled_solve=True; pass lipschitz=None "
            "(and il.nn.apply_norm on the map for a bound) or compiled_solve=False."
        )
    return bound


def _empty_result(z: Any, solver: ForwardSolver, return_info: bool) -> Any:
    if not return_info:
        return z
    like = z[0] if isinstance(z, list) else z
    empty = like.new_empty(0)
    info = SolveInfo(
        converged=torch.zeros(0, dtype=torch.bool, device=like.device),
        steps=torch.zeros(0, dtype=torch.int64, device=like.device),
        residual=empty, solver=solver.name, tolerance=empty,
    )
    return z, info


class _CheckedObjective:
    """``objective(w, x)`` checked once per call to hold one value per sample of ``w``'s dtype,
    so that the layer's errors name ``objective`` (the functional core calls it ``fun``)."""

    def __init__(self, objective: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.objective = objective

    def __call__(self, w: Tensor, x: Tensor) -> Tensor:
        value = _objective_values(self.objective, w, x)
        if value.dtype != w.dtype:
            raise TypeError(
                f"objective returned dtype {value.dtype} but w has dtype {w.dtype}; make them "
                "agree (e.g. call .double() on the layer and the inputs)."
            )
        return value


class _ProjectedGradientMap:
    """``T(w, x) = clamp(w - η ∇_w L(w, x), lower, upper)``, differentiable in ``w``, ``x``, θ."""

    def __init__(
        self,
        objective: Callable[[Tensor, Tensor], Tensor],
        step: Tensor,
        lower: float | Tensor | None,
        upper: float | Tensor | None,
    ) -> None:
        self.objective = objective
        self.step = step
        self.lower = lower
        self.upper = upper

    def gradient(self, w: Tensor, x: Tensor) -> Tensor:
        # The gradient is needed even inside the no-grad forward solve; the graph of the
        # gradient itself is kept only when the caller records one (backward / unrolling).
        if torch.is_inference_mode_enabled() or transforms_active():
            # Autograd cannot record here; torch.func.grad can (and nests in the transforms).
            def total(ww: Tensor) -> Tensor:
                return _objective_values(self.objective, ww, x).sum()

            return torch.func.grad(total)(w)
        keep = torch.is_grad_enabled()
        with torch.enable_grad():
            wr = w if w.requires_grad else w.detach().requires_grad_(True)
            value = _objective_values(self.objective, wr, x)
            (g,) = torch.autograd.grad(value.sum(), wr, create_graph=keep)
        return g

    def __call__(self, w: Tensor, x: Tensor) -> Tensor:
        out = w - self.step * self.gradient(w, x)
        return project(out, self.lower, self.upper)


def _objective_values(objective: Callable[[Tensor, Tensor], Tensor], w: Tensor, x: Tensor) -> Tensor:
    """``objective(w, x)`` checked to hold one value per sample and to depend on ``w``."""
    value = objective(w, x)
    if not isinstance(value, Tensor) or value.shape not in ((w.shape[0],), (w.shape[0], 1)):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"objective must return one value per sample, shape ({w.shape[0]},), got {got}. "
            "Reduce over every dimension but the batch dimension."
        )
    if w.requires_grad and not value.requires_grad:
        raise ValueError(
            "objective(w, x) does not depend on w (its value has no gradient with respect to "
            "w); there is nothing to minimise. Check that objective uses w."
        )
    return value


def project(w: Tensor, lower: float | Tensor | None, upper: float | Tensor | None) -> Tensor:
    """Euclidean projection onto the box ``lower <= w <= upper`` (either bound may be ``None``)."""
    if lower is not None:
        w = w.clamp(min=lower)
    if upper is not None:
        w = w.clamp(max=upper)
    return w


class ArgminLayer(torch.nn.Module):
    """Returns ``w*(x) = argmin_w L(w, x)`` per sample, optionally subject to ``lower <= w <= upper``.

    Without bounds the minimiser is found by :func:`implicit_layers.argmin` (default L-BFGS)
    and differentiated through the Hessian (default CG). With bounds the layer solves the
    projected-gradient fixed point ``w = P(w - η ∇_w L(w, x))``, with ``P`` the projection on
    the box, by :func:`implicit_layers.fixed_point` (default Anderson), and differentiates that
    fixed point implicitly. The Jacobian of ``P`` is a 0/1 diagonal (1 on the free
    coordinates), so the implicit gradient is the exact gradient of the constrained minimiser
    wherever strict complementarity holds (every coordinate at a bound has a nonzero gradient
    ``∂L/∂w_i`` pushing it there): coordinates at a bound get zero sensitivity (or follow the
    bound, if it is a learnable tensor) and the free ones follow the reduced Hessian system.
    At degenerate points (a coordinate exactly at the bound with zero gradient) the minimiser
    is not differentiable and the layer returns one of the one-sided derivatives. The fixed
    points do not depend on ``η``, hence neither does the gradient.

    Args:
        objective: ``L(w, x)``, an ``nn.Module`` (registered as a submodule, so its parameters
            are trained and moved with the layer) or any callable (a module-level function if
            the layer is to be pickled), taking ``w`` of shape
            ``(B, *w_shape)`` and returning one value per sample, shape ``(B,)``. It must be
            twice differentiable in ``w`` (the implicit gradient uses Hessian-vector products).
        solver: forward solver: an argmin solver (``LBFGS``, ``Newton``, ``GradientDescent``;
            default ``LBFGS(max_steps=100)``) without bounds, a fixed-point solver
            (``Anderson``, ``Picard``; default ``Anderson(max_steps=200)``) with bounds.
        backward: backward mode or linear solver, as for :class:`DEQ` (default implicit, CG
            without bounds, GMRES with bounds).
        eval_solver: solver used in eval mode; ``None`` uses ``solver``.
        w_shape: per-sample shape of ``w``, used for the default initial guess (zeros, projected
            on the box). Required unless ``w0`` is passed to every call.
        lower, upper: box bounds, floats or tensors broadcastable to ``(B, *w_shape)`` (a tensor
            is registered as a buffer, or as a parameter if it is an ``nn.Parameter``, which then
            learns); ``None`` for no bound. ``lower=0.0`` alone is a non-negativity constraint.
        step_size: ``η`` of the projected-gradient map, a float; ``None`` (default) uses
            ``1 / (1.1 λ_max)`` per sample, ``λ_max`` the largest Hessian eigenvalue at ``w0``
            estimated by ``power_steps`` Hessian-vector products (exact for quadratics; pass a
            step size if the curvature grows far from ``w0``). Ignored without bounds.
        power_steps: power iterations for the step size estimate.
        prox: minimise ``L + g`` instead, with ``prox(w, step)`` the proximal operator of
            ``step·g`` on ``(B, *w_shape)`` (``step`` broadcasts against ``w``, one value per
            sample); solved by :class:`~implicit_layers.solvers.ProximalGradient` (default
            ``max_steps=1000``) and differentiated as in :func:`implicit_layers.argmin`.
        constraint: minimise over a set given by its projection ``constraint(w)`` (e.g.
            ``il.projection.simplex``, a sparsemax layer). Neither with ``lower``/``upper``.

    Shapes:
        ``x``: ``(B, ...)``; output ``w*``: ``(B, *w_shape)``.

    Raises:
        TypeError: ``objective`` is not callable, or a solver or backward has the wrong type.
        ValueError: invalid bounds (``lower >= upper``), ``step_size`` or ``w_shape``.

    Examples:
        A non-negative least-squares layer, ``w*(x) = argmin_{w >= 0} ½‖A w - x‖²``:

        >>> A = torch.randn(5, 3, dtype=torch.float64)
        >>> layer = il.nn.ArgminLayer(
        ...     lambda w, x: 0.5 * (w @ A.T - x).square().sum(1), w_shape=(3,), lower=0.0)
        >>> x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        >>> w = layer(x)
        >>> w.shape, bool((w >= 0).all())
        (torch.Size([4, 3]), True)
        >>> w.sum().backward()          # gradient of the constrained minimiser
        >>> x.grad.shape
        torch.Size([4, 5])
    """

    # A float, or a tensor registered as a buffer or parameter (see _set_bound).
    lower: float | Tensor | None
    upper: float | Tensor | None

    def __init__(
        self,
        objective: Callable[[Tensor, Tensor], Tensor],
        *,
        solver: ForwardSolver | None = None,
        backward: Backward = None,
        eval_solver: ForwardSolver | None = None,
        w_shape: Sequence[int] | int | None = None,
        lower: float | Tensor | None = None,
        upper: float | Tensor | None = None,
        step_size: float | None = None,
        power_steps: int = 20,
        prox: Callable[..., Tensor] | None = None,
        constraint: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(objective):
            raise TypeError(f"objective must be callable as objective(w, x), got {type(objective).__name__}.")
        self.objective = objective
        self.constrained = lower is not None or upper is not None
        for name, given in (("prox", prox), ("constraint", constraint)):
            if given is not None and not callable(given):
                raise TypeError(f"{name} must be callable, got {type(given).__name__}.")
        if (prox is not None or constraint is not None) and self.constrained:
            raise ValueError(
                "pass a box (lower/upper) or prox/constraint, not both; for a box with a "
                "penalty, pass constraint=lambda w: il.projection.box(w, lower, upper) or one "
                "prox that applies both."
            )
        self.prox = prox
        self.constraint = constraint
        composite = prox is not None or constraint is not None
        kind = "fixed_point" if self.constrained else ("composite" if composite else "argmin")
        default = (Anderson(max_steps=200) if self.constrained else
                   ProximalGradient(max_steps=1000) if composite else LBFGS(max_steps=100))
        self.solver = _check_solver(solver, "solver", kind) or default
        self.eval_solver = _check_solver(eval_solver, "eval_solver", kind)
        self.backward = _check_backward(backward)
        self.w_shape = _check_shape(w_shape, "w_shape")
        self._set_bound("lower", lower)
        self._set_bound("upper", upper)
        if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and not lower < upper:
            raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}.")
        self._check_box()
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
                raise ValueError(f"step_size must be a positive float or None, got {step_size!r}.")
            step_size = float(step_size)
        self.step_size = step_size
        if isinstance(power_steps, bool) or not isinstance(power_steps, int) or power_steps < 1:
            raise ValueError(f"power_steps must be a positive int, got {power_steps!r}.")
        self.power_steps = power_steps

    def _set_bound(self, name: str, value: object) -> None:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            setattr(self, name, None if value is None else float(value))
        elif isinstance(value, torch.nn.Parameter):
            self.register_parameter(name, value)
        elif isinstance(value, Tensor):
            self.register_buffer(name, value)
        else:
            raise TypeError(f"{name} must be a float, a tensor or None, got {type(value).__name__}.")

    @property
    def active_solver(self) -> ForwardSolver:
        """The solver the next forward call uses (``eval_solver`` in eval mode if set)."""
        if not self.training and self.eval_solver is not None:
            return self.eval_solver
        return self.solver

    def _check_box(self) -> None:
        """Raise if a coordinate has ``lower > upper`` (an empty box: the projection would
        silently return ``upper`` there). Tensor bounds are checked at every call, since a
        learnable bound may cross during training."""
        lower, upper = self.lower, self.upper
        if lower is None or upper is None:
            return
        if not isinstance(lower, Tensor) and not isinstance(upper, Tensor):
            return  # two floats: checked in the constructor
        crossed = torch.as_tensor(lower) > torch.as_tensor(upper)
        if bool(crossed.any()):
            raise ValueError(
                f"lower must not exceed upper, but lower > upper at {int(crossed.sum())} of "
                f"{crossed.numel()} coordinates (the box is empty there). Pass bounds with "
                "lower <= upper."
            )

    def _step(self, w0: Tensor, x: Tensor) -> Tensor:
        """Per-sample step ``(B, 1, ...)``: the fixed one, or ``1 / (1.1 λ_max)`` at ``w0``."""
        shape = (w0.shape[0],) + (1,) * (w0.dim() - 1)
        if self.step_size is not None:
            return torch.full(shape, self.step_size, dtype=w0.dtype, device=w0.device)
        with torch.enable_grad():
            wr = w0.detach().requires_grad_(True)
            xd = x.detach()
            value = _objective_values(self.objective, wr, xd)
            (g,) = torch.autograd.grad(value.sum(), wr, create_graph=True)
            if g.requires_grad:

                def hvp(v: Tensor) -> Tensor:
                    (hv,) = torch.autograd.grad(
                        g, wr, v.reshape(wr.shape), retain_graph=True, allow_unused=True
                    )
                    return torch.zeros_like(v) if hv is None else hv.reshape(v.shape)

                lam = power_iteration(hvp, wr.detach().flatten(1), self.power_steps)
                # Zero curvature (a linear objective): no scale to take the step from.
                lam = torch.where(lam > 0, lam, torch.ones_like(lam))
            else:  # linear objective: zero Hessian
                lam = torch.ones(w0.shape[0], dtype=w0.dtype, device=w0.device)
        lam = (1.1 * lam.detach()).clamp_min(torch.finfo(w0.dtype).eps)
        return (1.0 / lam).reshape(shape)

    @run_eagerly
    def forward(
        self, x: Tensor, w0: Tensor | None = None, *, return_info: bool = False
    ) -> Tensor | tuple[Tensor, SolveInfo]:
        """Minimise ``objective(w, x)`` per sample.

        Args:
            x: input ``(B, ...)``, passed unchanged as the second argument of the objective.
            w0: initial guess ``(B, *w_shape)``; default zeros projected on the box. It
                receives no gradient.
            return_info: also return the :class:`~implicit_layers.SolveInfo` (fields ``(B,)``).

        Returns:
            ``w*`` of shape ``(B, *w_shape)``, and the info if ``return_info``.
        """
        if w0 is None and self.w_shape is None:
            raise ValueError(
                "ArgminLayer needs w0 or, to start from zeros, the per-sample shape w_shape in "
                "the constructor; got neither."
            )
        w0 = _initial_guess(w0, "w0", x, self.w_shape, "w_shape", self)
        if not self.constrained:
            w, info = _argmin(
                _CheckedObjective(self.objective), w0, x, solver=self.active_solver,
                backward=self.backward, batched=True, return_info=True, prox=self.prox,
                constraint=self.constraint,
            )
        else:
            self._check_box()
            w0 = project(w0.detach(), self.lower, self.upper)
            if torch.is_inference_mode_enabled():
                # The step size needs Hessian-vector products: autograd outside inference mode.
                with torch.inference_mode(False):
                    step = self._step(w0.clone(), x.clone())
            else:
                step = self._step(w0, x)
            T = _ProjectedGradientMap(self.objective, step, self.lower, self.upper)
            w, info = _fixed_point(
                T, w0, x, solver=self.active_solver, backward=self.backward, batched=True,
                return_info=True,
            )
            # Accelerated iterates may leave the box by about the tolerance; the projection is
            # the identity (with unit Jacobian) on the free coordinates, so the gradient is
            # unchanged.
            w = project(w, self.lower, self.upper)
        return (w, info) if return_info else w

    def extra_repr(self) -> str:
        parts = [f"solver={self.solver!r}", f"backward={self.backward!r}"]
        if self.w_shape is not None:
            parts.append(f"w_shape={self.w_shape}")
        if self.constrained:
            for name in ("lower", "upper"):
                value = getattr(self, name)
                parts.append(f"{name}={'tensor' if isinstance(value, Tensor) else value}")
            parts.append(f"step_size={self.step_size}")
        return ", ".join(parts)


@run_eagerly
def jacobian_penalty(
    f: Callable[[Tensor, Tensor], Tensor],
    z_star: Tensor,
    x: Tensor,
    *,
    n_samples: int = 1,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
    normalize: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``‖∂f/∂z (z*, x)‖_F²`` per sample (Bai et al., 2021).

    For probes ``v`` with ``E[v vᵀ] = I`` (standard Gaussian or Rademacher),
    ``E‖vᵀ J‖² = tr(J Jᵀ) = ‖J‖_F²``; each probe costs one vector-Jacobian product. The
    estimate is built with ``create_graph=True``, so it can be added to the training loss
    (a small weight, e.g. ``loss + 0.1 * jacobian_penalty(...).mean()``, keeps the equilibrium
    map contractive and the forward solves short).

    If ``z_star`` carries a gradient (e.g. the output of :class:`DEQ`), the penalty's gradient
    also flows through ``z*`` — the total derivative, which costs nothing extra with the
    implicit backward since the cotangents meet before the adjoint solve. Pass
    ``z_star.detach()`` for the partial derivative at fixed ``z*``, as Bai et al. do.

    Args:
        f: the equilibrium map ``f(z, x)`` (e.g. ``deq.f``).
        z_star: the equilibrium, ``(B, *state_shape)``.
        x: the input passed to ``f``.
        n_samples: number of probes averaged.
        probe: ``"gaussian"`` or ``"rademacher"`` (lower variance).
        normalize: divide by the state size ``prod(state_shape)``, as in Bai et al.
        generator: random generator for the probes (for reproducibility).

    Returns:
        The per-sample estimate, shape ``(B,)``; reduce it with ``.mean()``.

    Raises:
        TypeError: ``f`` is not callable, or ``z_star`` is not a floating-point tensor with a
            leading batch dimension.
        ValueError: ``n_samples < 1``, an unknown ``probe``, or ``f(z_star, x)`` not shaped
            like ``z_star``.

    Examples:
        For a linear map the Jacobian is the matrix, and the estimate averages to its squared
        Frobenius norm:

        >>> W = torch.randn(6, 6, dtype=torch.float64)
        >>> f = lambda z, x: z @ W.T + x
        >>> z = torch.zeros(2, 6, dtype=torch.float64)
        >>> est = il.nn.jacobian_penalty(f, z, z, n_samples=4000)
        >>> est.shape, bool(((est - W.square().sum()).abs() < 0.2 * W.square().sum()).all())
        (torch.Size([2]), True)
    """
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x), got {type(f).__name__}.")
    if not isinstance(z_star, Tensor) or not z_star.is_floating_point() or z_star.dim() < 1:
        raise TypeError("z_star must be a floating-point tensor with a leading batch dimension.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    if probe not in ("gaussian", "rademacher"):
        raise ValueError(f"probe must be 'gaussian' or 'rademacher', got {probe!r}.")
    with torch.enable_grad():
        z = z_star if z_star.requires_grad else z_star.detach().requires_grad_(True)
        fz = f(z, x)
        if not isinstance(fz, Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
            raise ValueError(f"f must return a tensor shaped like z_star {tuple(z.shape)}, got {got}.")
        shape = (n_samples, *z.shape)
        if probe == "gaussian":
            v = torch.randn(shape, dtype=z.dtype, device=z.device, generator=generator)
        else:
            bits = torch.randint(0, 2, shape, device=z.device, generator=generator)
            v = (2 * bits - 1).to(z.dtype)
        dims = tuple(range(1, z.dim()))
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for k in range(n_samples):
            (vj,) = torch.autograd.grad(
                fz, z, v[k], create_graph=True, retain_graph=True, allow_unused=True
            )
            if vj is not None:  # None: f does not depend on z, so J = 0
                total = total + vj.pow(2).sum(dims)
    est = total / n_samples
    if normalize:
        est = est / z[0].numel()
    return est
