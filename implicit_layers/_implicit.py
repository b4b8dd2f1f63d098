"""The one implicit core shared by fixed_point, root, argmin and custom_root.

The whole layer is one ``torch.autograd.Function``, :class:`_Solution`, whose inputs are the
initial guess and every tensor the problem depends on (explicit arguments and the closed-over
tensors found by :func:`~implicit_layers._capture.capture`), and whose output is ``z*``:

* ``forward`` runs the forward solver without a graph;
* ``backward`` solves the adjoint system ``(∂F/∂z)ᵀ u = g`` and returns ``-(∂F/∂θ)ᵀ u``;
* ``jvp`` solves the tangent system ``(∂F/∂z) ż = -(∂F/∂θ) θ̇`` (forward mode).

An ordinary first-order backward records ``F`` once at the detached ``z*`` and reuses that graph
for every product (:class:`~implicit_layers._linearize.RecordedLinearization`). When a graph of
the backward is requested (``create_graph=True``, ``torch.func`` transforms), every step is
differentiable instead: ``z*`` is the layer's saved output, so the ``z*(θ)`` dependence of the
Jacobians is kept, and the adjoint solve is itself a linear implicit layer,
:class:`_LinearSolve`, whose backward solves with ``∂F/∂z`` (not its transpose). Derivatives of
every order follow by recursion.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ._capture import is_wrapped, transforms_active
from ._eager import run_eagerly
from ._folded import FoldedProblem
from ._info import ConvergenceWarning, SolveInfo, user_stacklevel
from ._linearize import Linearization, RecordedLinearization, func_vjp, transpose_of_vjp
from ._problem import Problem
from ._warm_start import warm_start
from .linear._base import LinearSolver
from .linear._operator import FunctionOperator
from .solvers._base import adjoint_slot

if TYPE_CHECKING:
    from .solvers._base import ForwardSolver

Forward = Callable[[Problem, Tensor], "tuple[Tensor, SolveInfo | None]"]


class LinearSolvers(NamedTuple):
    """The linear solvers of one implicit layer, already resolved (defaults chosen, tolerances
    inherited, fallbacks wrapped around)."""

    #: Solves ``A u = r``: the tangent solves of forward mode, the second solves of a double
    #: backward.
    tangent: LinearSolver
    #: Solves ``Aᵀ u = g``: the backward (adjoint) solves.
    adjoint: LinearSolver


#: ``choose(info)``: the linear solvers picked from the forward's statistics, or ``None`` to
#: keep those given.
ChooseLinear = Callable[[SolveInfo], "LinearSolvers | None"]


class ImplicitCore:
    """What the implicit layer's forward and backward need: the problem, the forward solve, the
    linear solvers, and where to put the statistics. Mechanism only: which linear solver to use
    (defaults, fallbacks) is decided by the backward mode that builds it.

    Args:
        problem: the problem, with its ``params`` captured.
        forward: ``forward(problem, z0) -> (z*, info)``, run without a graph.
        linear: the linear solvers of the tangent and adjoint systems.
        solver: the forward solver (it may keep a state for the adjoint's initial guess), or
            ``None``.
        choose: called with the forward's statistics after each forward solve; the linear
            solvers it returns replace ``linear`` (``None``: no such choice).
    """

    #: Whether the forward records ``F`` at ``z*`` for an ordinary backward (a core whose
    #: backward records it itself turns this off).
    records_at_forward = True

    def __init__(
        self,
        problem: Problem,
        forward: Forward,
        linear: LinearSolvers,
        solver: ForwardSolver | None = None,
        choose: ChooseLinear | None = None,
    ) -> None:
        self.problem = problem
        self._forward = forward
        self.solver = solver
        self.linear = linear
        self.choose = choose
        self.info: SolveInfo | None = None
        # Whether the forward records F at z* for a first-order backward (eager autograd only).
        self.records_linearization = torch.is_grad_enabled() and not transforms_active()
        self.linearization: RecordedLinearization | None = None
        # What the forward solver kept for the backward (its adjoint_guess reads it).
        self.adjoint_state: object | None = None
        self._warned_unconverged = False

    def _recorded_linearization(self, z: Tensor, values: tuple[Tensor, ...]) -> RecordedLinearization:
        """The graph of ``F`` recorded by the forward, or one recorded now at ``z``."""
        if self.linearization is not None:
            return self.linearization
        return RecordedLinearization(self.problem.bind(values, deferred=True), z)

    # -- forward -----------------------------------------------------------------------
    def forward(self, z0: Tensor, values: Sequence[Tensor]) -> Tensor:
        problem = self.problem.bind(values)
        with adjoint_slot(self.records_linearization and self.solver is not None) as kept:
            z, info = self._forward(problem, z0)
        if kept:
            self.adjoint_state = kept[-1]
        if self.info is None:
            self.info = info
        if self.choose is not None and info is not None:
            chosen = self.choose(info)
            if chosen is not None:
                self.linear = chosen
        if self.records_linearization and self.records_at_forward:
            # Record F at z* now, while the function sees the tensors it saw when called (a
            # functional_call swaps module parameters back when it returns); an ordinary
            # backward reuses this graph for every product.
            self.linearization = RecordedLinearization(problem, z)
        return z.clone() if z is z0 else z

    # -- linear solves -----------------------------------------------------------------
    def linear_solve(
        self, lin: Linearization | RecordedLinearization | _Repeated, rhs: Tensor, transpose: bool
    ) -> Tensor:
        """Solve ``Aᵀ u = rhs`` (``transpose``) or ``A u = rhs`` with the adjoint's solver."""
        problem = self.problem
        B, n = rhs.shape
        solver = self.linear.adjoint if transpose else self.linear.tangent
        mv: Callable[[Tensor], Tensor] = lin.rmv if transpose or problem.symmetric else lin.mv
        x0, mv = warm_start(mv, rhs, self._guess(solver, rhs, transpose), type(self.solver).__name__)
        # What the kind knows of its Jacobian: a fixed point's I - J is not symmetric, a root's
        # is unknown unless declared (choosing CG for it is the declaration).
        symmetric, positive_definite = problem.adjoint_structure()
        op = FunctionOperator(
            mv, B, n, rhs.dtype, rhs.device,
            symmetric=symmetric,
            positive_definite=positive_definite,
            dense=lambda: lin.dense(transpose),
            # Products through the graph recorded once (not warm-started: a wrapped product
            # costs differently) are the ones a timed solver may measure.
            recorded=isinstance(lin, RecordedLinearization) and x0 is None,
            transposed=transpose,
        )
        kind = "backward (adjoint)" if transpose else "tangent"
        u, binfo = solver.solve(op, rhs, x0, what=f"{kind} solve of {problem.kind}")
        if self.info is not None and transpose and B == problem.batch:
            self.info.backward = binfo if problem.batched else binfo.squeeze_batch()
        return u

    def _guess(self, linear: LinearSolver, rhs: Tensor, transpose: bool) -> Tensor | None:
        """The forward solver's initial guess for this solve (``None``: start from zero). Not
        under ``torch.func`` transforms, nor for the folded batches of vmap, nor for a
        ``linear`` solver that uses no start point (Dense)."""
        if (self.adjoint_state is None or self.solver is None or transforms_active()
                or not linear.uses_initial_guess):
            return None
        return self.solver.adjoint_guess(self.adjoint_state, rhs, transpose)

    def fold(self, V: int, dims: Sequence[int | None], values: Sequence[Tensor]) -> ImplicitCore:
        """The core of ``V`` vmapped copies of this problem solved as one batch."""
        folded = FoldedProblem(self.problem, V, dims, values)
        core = ImplicitCore(folded, self._forward, self.linear, self.solver, self.choose)  # type: ignore[arg-type]
        core.records_linearization = False
        return core

    # -- derivatives -------------------------------------------------------------------
    def vjp(self, z: Tensor, values: Sequence[Tensor], g: Tensor) -> tuple[Tensor, ...]:
        """``-(∂F/∂θ)ᵀ u`` with ``(∂F/∂z)ᵀ u = g``, one entry per parameter."""
        values = tuple(values)
        self._warn_if_unconverged()
        if _legacy_batched(g):
            return self._legacy_batched_vjp(z, values, g)
        if not torch.is_grad_enabled() and not transforms_active() and not is_wrapped(g):
            # An ordinary backward: no graph of the gradient is needed.
            lin: Linearization | RecordedLinearization = self._recorded_linearization(z, values)
            u = self.linear_solve(lin, g, transpose=True)
            grads = lin.param_vjp(-u)
        else:
            u = _LinearSolve.apply(g, z, self, True, *values)
            lin = Linearization(self.problem.bind(values), z, values)
            grads = lin.param_vjp(-u)
        return _zeros_for(grads, values)

    def _warn_if_unconverged(self) -> None:
        """Warn (once per layer call) when differentiating a forward solve that did not
        converge: the implicit derivative is then taken at a point that is not a solution and
        may be wrong, even of the wrong sign. Naming the samples here makes the gradient's own
        step say so, not only the forward's. Silent with ``on_failure="ignore"``."""
        info, solver = self.info, self.solver
        if self._warned_unconverged or info is None or solver is None or solver.on_failure != "warn":
            return
        if info._known_converged:  # the forward's last check saw every sample done: no op
            return
        if is_wrapped(info.converged):
            # Statistics of a solve run inside a transform (a nested layer) belong to that
            # transform's level, which may have exited; the forward's own warning stands.
            return
        failed = ~info.converged.reshape(-1)
        if not bool(failed.any()):
            return
        self._warned_unconverged = True
        listed = failed.nonzero().flatten().tolist()
        which = (f"sample(s) {', '.join(map(str, listed[:10]))}{', ...' if len(listed) > 10 else ''} "
                 f"of {failed.numel()}" if self.problem.batched else "the problem")
        warnings.warn(
            f"backward of the {self.problem.kind} solve that did not converge ({which}, "
            f"{info.solver}): the implicit gradient there is taken at a point that is not a "
            "solution and may be wrong. Make the forward converge (see the forward's warning), "
            "or pass on_failure='ignore' to the solver to accept it.",
            ConvergenceWarning, stacklevel=user_stacklevel(),
        )

    def _legacy_batched_vjp(
        self, z: Tensor, values: tuple[Tensor, ...], g: Tensor
    ) -> tuple[Tensor, ...]:
        """The vjp for the ``V`` cotangents that ``is_grads_batched=True`` (and
        ``jacobian(vectorize=True)``) pass as one legacy batched tensor: they become ``V · B``
        samples of one adjoint solve, since a solver loop cannot run under the legacy vmap."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "is_grads_batched=True with create_graph=True is not supported by implicit "
                "layers; use torch.func (e.g. torch.func.jacrev of torch.func.grad), which is."
            )
        level = torch._C._vmapmode_increment_nesting() - 1
        torch._C._vmapmode_decrement_nesting()
        gs = torch._remove_batch_dim(g, level, 1, 0)  # (V, B, n)
        V = gs.shape[0]
        # The solve runs outside the legacy vmap mode (which refuses every host-side test),
        # on plain tensors; the results are batched again for the caller.
        torch._C._vmapmode_decrement_nesting()
        try:
            lin = self._recorded_linearization(z, values)
            u = self.linear_solve(_Repeated(lin, V), gs.reshape(-1, gs.shape[-1]), transpose=True)
            grads = torch.func.vmap(lin.param_vjp)(-u.reshape(gs.shape))
        finally:
            torch._C._vmapmode_increment_nesting()
        return tuple(
            torch.zeros_like(v) if d is None else torch._add_batch_dim(d, 0, level)
            for d, v in zip(grads, values, strict=True)
        )

    def jvp(self, z: Tensor, values: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> Tensor:
        """``ż`` with ``(∂F/∂z) ż = -(∂F/∂θ) θ̇``."""
        values = tuple(values)
        if any(t is not None and _legacy_batched(t) for t in tangents):
            raise NotImplementedError(
                "torch.autograd.functional.jacobian(..., vectorize=True, "
                "strategy='forward-mode') cannot batch the tangents of an implicit layer (the "
                "legacy vmap it uses has no rule for custom functions). Use torch.func.jacfwd, "
                "or jacobian(..., vectorize=True) with the default strategy='reverse-mode'."
            )
        tangents = _zeros_for(tangents, values)
        lin = Linearization(self.problem.bind(values), z, values)
        rhs = -lin.param_jvp(tangents)
        return _LinearSolve.apply(rhs, z, self, False, *values)

    def curvature_vjp(
        self, z: Tensor, values: Sequence[Tensor], left: Tensor, right: Tensor
    ) -> tuple[Tensor, ...]:
        """The gradient of ``⟨(∂F/∂z)ᵀ left, right⟩`` with respect to ``z`` and each value."""
        problem = self.problem

        def pairing(zz: Tensor, *vals: Tensor) -> Tensor:
            F = problem.bind(vals, deferred=True).pure_residual
            _, vjp = func_vjp(F, zz)
            return (vjp(left)[0] * right).sum()

        argnums = tuple(range(1 + len(values)))
        return torch.func.grad(pairing, argnums=argnums)(z, *values)

    def product_jvp(
        self, z: Tensor, values: Sequence[Tensor], u: Tensor, transpose: bool,
        z_t: Tensor, values_t: Sequence[Tensor],
    ) -> Tensor:
        """The change of ``Aᵀ u`` (``transpose``) or ``A u`` along ``(ż, θ̇)`` at fixed ``u``."""
        problem = self.problem

        def product(zz: Tensor, *vals: Tensor) -> Tensor:
            F = problem.bind(vals, deferred=True).pure_residual
            out, vjp = func_vjp(F, zz)
            if transpose or problem.symmetric:
                return vjp(u)[0]
            return transpose_of_vjp(lambda w: vjp(w)[0], out, u)

        out, vjp = func_vjp(product, z, *values)
        return transpose_of_vjp(vjp, out, (z_t, *values_t))


class _Repeated:
    """``V`` stacked copies of a linearization, acting on ``(V · B, n)``."""

    def __init__(self, lin: Linearization | RecordedLinearization, V: int) -> None:
        self.lin = lin
        self.V = V

    def rmv(self, v: Tensor) -> Tensor:
        return torch.func.vmap(self.lin.rmv)(v.reshape(self.V, -1, v.shape[-1])).reshape(v.shape)

    def mv(self, v: Tensor) -> Tensor:
        return torch.func.vmap(self.lin.mv)(v.reshape(self.V, -1, v.shape[-1])).reshape(v.shape)

    def dense(self, transpose: bool = True) -> Tensor:
        return self.lin.dense(transpose).repeat(self.V, 1, 1)


def _legacy_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by the legacy vmap of ``is_grads_batched`` (not ``torch.func``)."""
    return bool(torch._C._functorch.is_legacy_batchedtensor(t))


def _zeros_for(parts: Sequence[Tensor | None], like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``parts`` (gradients or tangents) with zeros shaped like ``like`` in place of ``None``."""
    return tuple(torch.zeros_like(v) if t is None else t for t, v in zip(parts, like, strict=True))


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


class _Function(torch.autograd.Function):
    """An ``autograd.Function`` whose ``apply`` skips what torch's adds for nothing here.

    Outside ``torch.func`` transforms, torch's ``Function.apply`` binds the arguments to the
    signature of ``forward`` (``inspect.signature`` on every call, some 15 µs) to fill in
    defaults, which these ``forward`` methods do not have, then unwraps dead ``torch.func``
    wrappers and calls the C++ ``apply``. This does the last two alone; under transforms it is
    torch's ``apply``.
    """

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        args = tuple(_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args)
        return super(torch.autograd.Function, cls).apply(*args)  # type: ignore[misc]  # the C++ apply


class _Solution(_Function):
    """``z* = solve(z0; θ)``, differentiated by the implicit function theorem."""

    @staticmethod
    def forward(z0: Tensor, core: ImplicitCore, *values: Tensor) -> Tensor:  # type: ignore[override]
        return core.forward(z0, values)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:  # type: ignore[override]
        _, core, *values = inputs
        ctx.core = core
        ctx.save_for_backward(output, *values)
        ctx.save_for_forward(output, *values)

    @staticmethod
    @run_eagerly
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        z, *values = ctx.saved_tensors
        return (None, None, *ctx.core.vjp(z, values, g))

    @staticmethod
    def jvp(ctx: Any, z0_t: Tensor | None, core_t: None, *values_t: Tensor | None) -> Tensor:  # type: ignore[override]
        z, *values = ctx.saved_tensors
        return ctx.core.jvp(z, values, values_t)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, z0: Tensor, core: ImplicitCore, *values: Tensor) -> tuple:  # type: ignore[override]
        z0_dim, _, *value_dims = in_dims
        if z0_dim is None and all(d is None for d in value_dims):
            return _Solution.apply(z0, core, *values), None
        V = info.batch_size
        dims, moved = _move_to_front(V, value_dims, values)
        folded = core.fold(V, dims, moved)
        z = _Solution.apply(_fold_state(V, z0_dim, z0), folded, *moved)
        if core.info is None:
            core.info = folded.info
        return z.reshape(V, -1, z.shape[-1]), 0


def _move_to_front(
    V: int, dims: Sequence[int | None], tensors: Sequence[Tensor]
) -> tuple[list[int | None], list[Tensor]]:
    """Vmapped dimensions moved to the front (``0``) or absent (``None``)."""
    moved = [t if d is None else t.movedim(d, 0) for t, d in zip(tensors, dims, strict=False)]
    return [None if d is None else 0 for d in dims], moved


def _fold_state(V: int, dim: int | None, z: Tensor) -> Tensor:
    """A ``(B, n)`` state, vmapped along ``dim`` or shared, as ``(V · B, n)``."""
    z = z.unsqueeze(0).expand(V, *z.shape) if dim is None else z.movedim(dim, 0)
    return z.reshape(V * z.shape[1], z.shape[2])


class _LinearSolve(_Function):
    """``u = A⁻ᵀ rhs`` (``transpose``) or ``A⁻¹ rhs`` with ``A = ∂F/∂z`` at ``(z, θ)``: a linear
    implicit layer, differentiable in ``rhs``, ``z`` and ``θ`` to every order."""

    @staticmethod
    def forward(  # type: ignore[override]
        rhs: Tensor, z: Tensor, core: ImplicitCore, transpose: bool, *values: Tensor
    ) -> Tensor:
        lin = Linearization(core.problem.bind(values), z, values)
        return core.linear_solve(lin, rhs, transpose)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:  # type: ignore[override]
        _, z, core, transpose, *values = inputs
        ctx.core = core
        ctx.transpose = transpose
        ctx.save_for_backward(z, output, *values)
        ctx.save_for_forward(z, output, *values)

    @staticmethod
    @run_eagerly
    def backward(ctx: Any, u_bar: Tensor) -> tuple:  # type: ignore[override]
        z, u, *values = ctx.saved_tensors
        core, transpose = ctx.core, ctx.transpose
        # A u = r  =>  du = A⁻¹ (dr - dA u); Aᵀ u = g  =>  du = A⁻ᵀ (dg - dAᵀ u).
        w = _LinearSolve.apply(u_bar, z, core, not transpose, *values)
        left, right = (u, w) if transpose else (w, u)
        grads = core.curvature_vjp(z, values, left, right)
        return (w, -grads[0], None, None, *(-d for d in grads[1:]))

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, rhs_t: Tensor | None, z_t: Tensor | None, core_t: None, transpose_t: None,
        *values_t: Tensor | None,
    ) -> Tensor:
        z, u, *values = ctx.saved_tensors
        core, transpose = ctx.core, ctx.transpose
        z_t = torch.zeros_like(z) if z_t is None else z_t
        values_t = _zeros_for(values_t, values)
        change = core.product_jvp(z, values, u, transpose, z_t, values_t)
        rhs_t = -change if rhs_t is None else rhs_t - change
        return _LinearSolve.apply(rhs_t, z, core, transpose, *values)

    @staticmethod
    def vmap(  # type: ignore[override]
        info: Any, in_dims: tuple, rhs: Tensor, z: Tensor, core: ImplicitCore, transpose: bool,
        *values: Tensor,
    ) -> tuple:
        rhs_dim, z_dim, _, _, *value_dims = in_dims
        if rhs_dim is None and z_dim is None and all(d is None for d in value_dims):
            return _LinearSolve.apply(rhs, z, core, transpose, *values), None
        V = info.batch_size
        dims, moved = _move_to_front(V, value_dims, values)
        folded = core.fold(V, dims, moved)
        u = _LinearSolve.apply(
            _fold_state(V, rhs_dim, rhs), _fold_state(V, z_dim, z), folded, transpose, *moved
        )
        return u.reshape(V, -1, u.shape[-1]), 0


def implicit_solution(core: ImplicitCore, z0: Tensor) -> Tensor:
    """``z*`` as a differentiable function of ``core.problem.params``."""
    return _Solution.apply(z0, core, *core.problem.params)
