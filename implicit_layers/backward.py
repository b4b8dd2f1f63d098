"""Backward modes: how gradients flow through the solution of an implicit layer.

* :class:`Implicit` — the implicit function theorem with a linear solver (exact at convergence,
  memory independent of the number of forward steps, derivatives of every order, forward mode
  and ``torch.func`` transforms).
* :class:`Unrolled` — autograd through every forward iteration (memory grows with the steps).
* :class:`Truncated` — autograd through ``steps`` iterations of the basic step map
  ``z ← z - η F(z)`` started at the solution.
* :class:`JacobianFree` — one such step (Fung et al., 2022, "JFB").
* :class:`Phantom` — ``steps`` damped steps (Geng et al., 2021, "phantom gradients").

Passing a linear solver as ``backward=`` means ``Implicit(that solver)``.

Each mode owns its behaviour: :meth:`BackwardMode.solve` runs the forward solver and attaches
the mode's gradient, :meth:`BackwardMode.attach` attaches it to a solution found elsewhere (a
black-box solver wrapped by :func:`~implicit_layers.custom_root`). A new mode subclasses
:class:`BackwardMode` and overrides :meth:`~BackwardMode.attach` (and :meth:`~BackwardMode.solve`
if it must see the forward iterations).

Every mode gives the exact derivatives, of every order, of what it computes: ``Implicit`` those
of the exact solution map ``θ ↦ z*(θ)``; ``Unrolled`` those of the recorded iterations; the step
modes those of ``θ ↦ S_θ^k(z*)`` with the solution ``z*`` held fixed (``S_θ`` the step map).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._capture import vmap_active
from ._config import Settings, check_nonnegative, check_positive_int
from ._implicit import ChooseLinear, ImplicitCore, LinearSolvers, implicit_solution
from ._info import SolveInfo
from ._problem import Problem
from .linear._base import LinearSolver
from .linear.combinators import StepsOnFailure

__all__ = [
    "BackwardMode", "Implicit", "Unrolled", "Truncated", "JacobianFree", "Phantom", "GaussNewtonImplicit",
    "CompiledImplicit",
]


class BackwardMode(Settings):
    """Base class of the backward modes: immutable settings plus how to attach a gradient.

    Subclasses take their settings as constructor arguments (validated, stored under the same
    names; see :class:`~implicit_layers.solvers.base.Settings` for ``replace``, ``repr`` and
    ``==``) and implement :meth:`attach`; they override :meth:`solve` only if they must see
    the forward iterations. An instance is passed as ``backward=`` to
    :func:`~implicit_layers.fixed_point`, :func:`~implicit_layers.root`,
    :func:`~implicit_layers.argmin`, the ``custom_*`` decorators and the layers of
    :mod:`implicit_layers.nn`.

    Examples:
        A mode that stops the gradient at the solution (the solution is a constant):

        >>> class Detached(il.backward.BackwardMode):
        ...     def attach(self, problem, z, forward_rtol, solver=None, info=None):
        ...         return z
        >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> z = il.fixed_point(lambda z, x: 0.5 * torch.cos(z) + x,
        ...                    torch.zeros(2, dtype=torch.float64), x, backward=Detached())
        >>> z.requires_grad
        False
    """

    # -- behaviour ---------------------------------------------------------------------
    def solve(self, problem: Problem, z0: Tensor, solver: Any) -> tuple[Tensor, SolveInfo]:
        """Run ``solver`` from the flat ``z0`` ``(B, n)`` and attach this mode's gradient.

        The default solves without a graph, then calls :meth:`attach` if gradients are on.

        Args:
            problem: the problem (:class:`~implicit_layers.solvers.base.Problem`); its
                ``params`` are the tensors to differentiate.
            z0: flat initial guess, shape ``(B, n)``.
            solver: the forward solver (a :class:`~implicit_layers.solvers.ForwardSolver`).

        Returns:
            ``(z, info)``: the flat solution ``(B, n)`` carrying this mode's gradient, and the
                forward :class:`~implicit_layers.SolveInfo` (fields of shape ``(B,)``).

        Raises:
            ValueError: if the mode cannot differentiate this solver or problem (the message
                names what to use instead).
        """
        if problem.params and vmap_active():
            # Under vmap the solve runs as the implicit layer does (the vmapped dimension
            # folded into the solver's batch); its own gradient is not used.
            z, info = Implicit().solve(problem, z0, solver)
        else:
            with torch.no_grad():
                z, info = solver.solve(problem, z0.detach())
        z = z.detach()
        if torch.is_grad_enabled():
            z = self.attach(problem, z, solver.resolved_rtol(problem.dtype), solver, info)
        return z, info

    def attach(
        self,
        problem: Problem,
        z: Tensor,
        forward_rtol: float,
        solver: Any = None,
        info: SolveInfo | None = None,
    ) -> Tensor:
        """Return the detached flat solution ``z`` ``(B, n)`` carrying this mode's gradient.

        Args:
            problem: the problem (its ``params`` are the tensors to differentiate).
            z: the solution, ``(B, n)``, detached.
            forward_rtol: the tolerance the solution was found to.
            solver: the forward solver, or ``None`` for a black box.
            info: the forward statistics (its ``backward`` field may be filled in later).

        Returns:
            A tensor equal to ``z``, shape ``(B, n)``, whose autograd graph (or custom
                backward) gives the mode's gradient with respect to ``problem.params``.

        Raises:
            ValueError: if the mode cannot attach a gradient here (e.g. ``Unrolled`` on a
                black-box solver, a step mode on argmin without a step size).
        """
        raise NotImplementedError

    def _bind_recorded(
        self, problem: Problem, z: Tensor, explicit: list[Tensor]
    ) -> tuple[Problem, object] | None:
        """For ``custom_root``: where this mode's backward records ``F`` at the solution ``z``
        ``(B, n)`` itself, one call of the function that finds the tensors it reads that carry
        derivatives (``explicit`` first, the explicit arguments that do) and records it:
        ``(problem with those params, the recording)`` for :meth:`_attach_recorded`. ``None``
        (the default) where the caller finds them on its own call."""
        return None

    def _attach_recorded(self, problem: Problem, z: Tensor, forward_rtol: float, recording: object) -> Tensor:
        """:meth:`attach` for a black-box solution, with the recording of
        :meth:`_bind_recorded`."""
        return self.attach(problem, z, forward_rtol)


class _StepMode(BackwardMode):
    """Differentiates ``steps`` steps of ``z ← z - η F(z)`` started at the detached solution.

    For a fixed point ``F(z) = z - f(z)``, so a step is ``(1 - η) z + η f(z)``; for argmin it
    is a gradient step. At the solution this equals an ``steps``-term Neumann series with step
    ``η`` for the implicit system (Lorraine et al., 2020), which is also how it serves as a
    fallback for :class:`Implicit`.
    """

    steps: int
    step_size: float | None

    def step_size_for(self, problem: Problem, solver: Any) -> float | Tensor:
        """``η``: the mode's own, 1 for fixed points and roots, or the forward solver's step
        (argmin, composite argmin)."""
        if self.step_size is not None:
            return self.step_size
        if not problem.steps_need_size:
            return 1.0
        eta = solver.gradient_step_size() if solver is not None else None
        if isinstance(eta, Tensor):
            # A learnable step size (meta-descent): the differentiated steps use it, so it gets
            # a gradient. One value per sample broadcasts over the flat (B, n) iterate.
            return eta.unsqueeze(-1) if eta.dim() == 1 else eta
        if eta is not None:
            return float(eta)
        raise ValueError(
            f"{type(self).__name__} on an argmin problem needs a step size for its steps "
            f"(unit steps diverge where the largest Hessian eigenvalue exceeds 2); got "
            f"step_size=None and a forward solver ({type(solver).__name__}) without a fixed step "
            "size. Pass e.g. step_size=0.1 (about 1 / largest Hessian eigenvalue)."
        )

    def attach(
        self,
        problem: Problem,
        z: Tensor,
        forward_rtol: float,
        solver: Any = None,
        info: SolveInfo | None = None,
    ) -> Tensor:
        eta = self.step_size_for(problem, solver)
        zk = z
        for _ in range(self.steps):
            zk = zk - eta * problem.residual(zk, create_graph=True)
        return zk


class Implicit(BackwardMode):
    """Implicit differentiation: solve ``(∂F/∂z)ᵀ u = g`` at the solution, then
    ``∂ℓ/∂θ = -(∂F/∂θ)ᵀ u``.

    Derivatives of every order are exact: under ``create_graph=True`` (and ``torch.func``
    transforms) the adjoint solve is itself differentiated implicitly, with a second linear
    solve with ``∂F/∂z``. Forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``)
    solves ``(∂F/∂z) ż = -(∂F/∂θ) θ̇`` with the same linear solver.

    Args:
        linear_solver: the :class:`~implicit_layers.linear.LinearSolver` for the adjoint
            system. ``None`` (default) takes the one the forward solver picks from what it
            observed (:class:`~implicit_layers.solvers.Adaptive`: a Neumann series finished by
            GMRES after a good contraction, else GMRES), else the problem's default: for
            argmin, roots and symmetric problems, with ``n`` unknowns per sample and batch
            ``B`` (1 unbatched), :class:`~implicit_layers.linear.Dense` while ``n <= 128`` and
            ``B n³ <= 2**21`` (:class:`~implicit_layers.linear.DenseThenGMRES` for a
            non-symmetric root), then up to ``B n² <= 2**20`` the faster of Dense and the
            iterative solver as timed on the first backwards
            (:mod:`~implicit_layers.linear.timed`), beyond that
            :class:`~implicit_layers.linear.CG` (symmetric) or
            :class:`~implicit_layers.linear.GMRES`; for fixed points GMRES. A solver with
            ``rtol=None`` inherits the forward solver's tolerance, so the gradient is as
            accurate as the solution it differentiates.
        fallback: optional :class:`JacobianFree`, :class:`Phantom` or :class:`Truncated` whose
            gradient replaces the implicit one for the samples whose adjoint solve did not
            converge (or diverged), with a :class:`~implicit_layers.ConvergenceWarning`, so one
            bad batch does not hand a garbage gradient to the optimizer (the adjoint solver is
            wrapped in :class:`~implicit_layers.linear.StepsOnFailure`). Default ``None``.

    Raises:
        TypeError: if ``linear_solver`` is not an :mod:`implicit_layers.linear` solver, or
            ``fallback`` is not a step mode.

    Examples:
        The gradient of a fixed point ``z = A z + b`` is ``(I - A)⁻ᵀ g``:

        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> mode = il.backward.Implicit(il.linear.GMRES(), fallback=il.backward.Phantom(steps=5))
        >>> z = il.fixed_point(lambda z, b: A @ z + b, torch.zeros(2, dtype=torch.float64), b,
        ...                    backward=mode)
        >>> z.sum().backward()
        >>> expected = torch.linalg.solve((torch.eye(2, dtype=torch.float64) - A).T,
        ...                               torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(b.grad, expected)
        True
    """

    def __init__(
        self,
        linear_solver: LinearSolver | None = None,
        *,
        fallback: BackwardMode | None = None,
    ) -> None:
        if linear_solver is not None and not isinstance(linear_solver, LinearSolver):
            raise TypeError(
                "linear_solver must be an il.linear solver such as il.linear.CG(), got "
                f"{type(linear_solver).__name__}."
            )
        if fallback is not None and not isinstance(fallback, _StepMode):
            raise TypeError(
                "fallback must be JacobianFree(), Phantom(...) or Truncated(...), got "
                f"{type(fallback).__name__}."
            )
        self.linear_solver = linear_solver
        self.fallback = fallback

    def solve(self, problem: Problem, z0: Tensor, solver: Any) -> tuple[Tensor, SolveInfo]:
        if not problem.params:
            with torch.no_grad():
                return solver.solve(problem, z0.detach())

        def forward(bound: Problem, start: Tensor) -> tuple[Tensor, SolveInfo]:
            with torch.no_grad():
                return solver.solve(bound, start)

        core = self._core(problem, forward, solver.resolved_rtol(problem.dtype), solver)
        z = implicit_solution(core, z0.detach().clone())
        assert core.info is not None  # set by the forward solve
        return z, core.info

    def attach(
        self,
        problem: Problem,
        z: Tensor,
        forward_rtol: float,
        solver: Any = None,
        info: SolveInfo | None = None,
    ) -> Tensor:
        if not problem.params:
            return z
        core = self._core(problem, lambda bound, start: (start, info), forward_rtol, solver)
        core.info = info
        return implicit_solution(core, z)

    def _core(self, problem: Problem, forward: Any, forward_rtol: float, solver: Any) -> ImplicitCore:
        """The implicit core with this mode's linear solvers: the given one, else the one the
        forward solver picks from what it observed, else the problem's default; a solver with
        ``rtol=None`` inherits ``forward_rtol``; the adjoint solves wrapped in the fallback."""
        fallback = self.fallback

        def resolved(linear: LinearSolver) -> LinearSolvers:
            if linear.rtol is None:
                linear = linear.replace(rtol=forward_rtol)
            if fallback is None:
                return LinearSolvers(linear, linear)
            adjoint = StepsOnFailure(
                linear, steps=fallback.steps, label=type(fallback).__name__,
                step_size=lambda: fallback.step_size_for(problem, solver),
            )
            return LinearSolvers(linear, adjoint)

        choose: ChooseLinear | None = None
        if self.linear_solver is None and solver is not None:
            # A forward solver that observed the problem may pick the adjoint's solver
            # (Adaptive: Neumann after a good contraction, GMRES otherwise).
            def choose(info: SolveInfo) -> LinearSolvers | None:
                chosen = solver.adjoint_solver(info)
                return None if chosen is None else resolved(chosen)

        given = self.linear_solver
        linear = resolved(problem.default_adjoint_solver() if given is None else given)
        return ImplicitCore(problem, forward, linear, solver, choose)


class Unrolled(BackwardMode):
    """Backpropagate through every iteration of the forward solver.

    Exact for the computation performed, including non-converged solves and learnable solver
    settings (a tensor step size of :class:`~implicit_layers.solvers.GradientDescent`), but its
    memory grows linearly with the number of forward steps. Higher derivatives are those of the
    recorded iterations. Takes no settings.

    Raises:
        ValueError: when solving, if the forward solver cannot be differentiated through
            (``Newton``), under :func:`torch.func.vmap`, or for a black-box solver wrapped by
            :func:`~implicit_layers.custom_root`.

    Examples:
        >>> t = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> w = il.argmin(lambda w, t: ((w - t) ** 2).sum(), torch.zeros(2, dtype=torch.float64),
        ...               t, solver=il.solvers.GradientDescent(0.25, max_steps=100),
        ...               backward=il.backward.Unrolled())
        >>> w.sum().backward()
        >>> torch.allclose(t.grad, torch.ones(2, dtype=torch.float64))
        True
    """

    def solve(self, problem: Problem, z0: Tensor, solver: Any) -> tuple[Tensor, SolveInfo]:
        if not torch.is_grad_enabled():
            return super().solve(problem, z0, solver)
        if vmap_active():
            raise ValueError(
                "backward=Unrolled() cannot run under torch.func.vmap: the recorded solver loop "
                "stops on data, which vmap cannot batch. Use an implicit backward (the default) "
                "or a step mode (Truncated, JacobianFree, Phantom) under vmap, or loop over the "
                "batch."
            )
        if not solver.supports_unrolled:
            raise ValueError(
                f"backward=Unrolled() cannot differentiate through {solver.name}; use LBFGS, "
                "GradientDescent, Picard, Anderson or Broyden as solver, or an implicit backward."
            )
        return solver.solve(problem, z0, differentiable=True)

    def attach(
        self,
        problem: Problem,
        z: Tensor,
        forward_rtol: float,
        solver: Any = None,
        info: SolveInfo | None = None,
    ) -> Tensor:
        raise ValueError(
            "backward=Unrolled() needs a forward solver to unroll; a black-box solver wrapped "
            "by custom_root cannot be unrolled. Use an implicit backward."
        )


class Truncated(_StepMode):
    """Backpropagate through ``steps`` steps ``z ← z - η F(z)`` taken from the solution.

    For a forward solver that is itself this iteration (Picard, GradientDescent) this is
    truncated backpropagation through its last ``steps`` steps.

    Args:
        steps: number of differentiated steps ``K >= 1``; the one positional argument.
        step_size: ``η > 0``; ``None`` (default) means 1 for fixed points and roots, and for
            argmin the ``step_size`` of a :class:`~implicit_layers.solvers.GradientDescent`
            forward solver (of a :class:`~implicit_layers.solvers.ProximalGradient` with
            ``prox=`` or ``constraint=``).

    Raises:
        TypeError: if ``steps`` is not an int or ``step_size`` not a float.
        ValueError: if ``steps < 1`` or ``step_size <= 0``; when solving an argmin problem,
            if neither this mode nor the forward solver has a step size.

    Examples:
        For ``z = A z + b`` the gradient is the ``K``-term Neumann sum ``Σ_{j<K} (Aᵀ)ʲ g``:

        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> z = il.fixed_point(lambda z, b: A @ z + b, torch.zeros(2, dtype=torch.float64), b,
        ...                    backward=il.backward.Truncated(3))
        >>> z.sum().backward()
        >>> g = torch.ones(2, dtype=torch.float64)
        >>> torch.allclose(b.grad, g + A.T @ g + A.T @ A.T @ g)
        True
    """

    def __init__(self, steps: int, *, step_size: float | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.step_size = _positive_step(step_size, "step_size")


class JacobianFree(_StepMode):
    """Jacobian-free backpropagation (Fung et al., 2022): one step from the solution.

    For a fixed point ``z = f(z, θ)`` the gradient is ``(∂f/∂θ)ᵀ g``, i.e. the inverse
    ``(I - J)⁻¹`` is replaced by ``I``. Cheap, biased, often good enough for training DEQs.

    Args:
        step_size: ``η > 0`` of the step; ``None`` (default) means 1 for fixed points and
            roots, and for argmin the ``step_size`` of a
            :class:`~implicit_layers.solvers.GradientDescent` forward solver (of a
            :class:`~implicit_layers.solvers.ProximalGradient` with ``prox=`` or
            ``constraint=``). Keyword-only.

    Raises:
        TypeError: if ``step_size`` is not a float, or is passed positionally.
        ValueError: if ``step_size <= 0``; when solving an argmin problem, if neither this
            mode nor the forward solver has a step size.

    Examples:
        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> z = il.fixed_point(lambda z, b: A @ z + b, torch.zeros(2, dtype=torch.float64), b,
        ...                    backward=il.backward.JacobianFree())
        >>> z.sum().backward()
        >>> b.grad                                     # (∂f/∂b)ᵀ g = g
        tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, *, step_size: float | None = None) -> None:
        self.steps = 1
        self.step_size = _positive_step(step_size, "step_size")


class Phantom(_StepMode):
    """Phantom gradient (Geng et al., 2021): ``steps`` damped steps from the solution.

    Args:
        steps: number of differentiated steps (default 5); the one positional argument.
        damping: ``λ > 0`` in ``z ← (1 - λ) z + λ f(z)`` (default 0.5); for argmin the step
            size of the gradient steps. Keyword-only.

    Raises:
        TypeError: if ``steps`` is not an int or ``damping`` not a float (``None`` included).
        ValueError: if ``steps < 1`` or ``damping <= 0``.

    Examples:
        >>> A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
        >>> b = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> mode = il.backward.Phantom(10, damping=0.8)
        >>> z = il.fixed_point(lambda z, b: A @ z + b, torch.zeros(2, dtype=torch.float64), b,
        ...                    backward=mode)
        >>> z.sum().backward()
        >>> exact = torch.linalg.solve((torch.eye(2, dtype=torch.float64) - A).T,
        ...                            torch.ones(2, dtype=torch.float64))
        >>> bool((b.grad - exact).abs().max() < 1e-2), mode.damping
        (True, 0.8)
    """

    def __init__(self, steps: int = 5, *, damping: float = 0.5) -> None:
        self.steps = check_positive_int(steps, "steps")
        step = _positive_step(damping, "damping")
        if step is None:
            raise TypeError("damping must be a float > 0, got None.")
        self.step_size = step

    @property
    def damping(self) -> float:
        """``λ``, the step weight of the damped steps (stored as ``step_size``)."""
        assert self.step_size is not None
        return self.step_size


def _positive_step(value: object, name: str) -> float | None:
    step = check_nonnegative(value, name)
    if step == 0:
        raise ValueError(f"{name} must be > 0, got 0.0 (a zero step gives zero gradients).")
    return step


#: The backward mode of ``backward=None``.
_DEFAULT = Implicit()


def resolve_backward(backward: BackwardMode | LinearSolver | None) -> BackwardMode:
    """The backward mode meant by ``backward=`` (a mode, a linear solver, or ``None``)."""
    if backward is None:
        return _DEFAULT  # immutable settings: one instance serves every call
    if isinstance(backward, LinearSolver):
        return Implicit(backward)
    if isinstance(backward, BackwardMode):
        return backward
    raise TypeError(
        "backward must be a backward mode (il.backward.Implicit(), Unrolled(), Truncated(k), "
        "JacobianFree(), Phantom(k, damping=...)) or a linear solver such as il.linear.CG(); got "
        f"{type(backward).__name__}."
    )


from ._compiled_adjoint import CompiledImplicit  # noqa: E402  (it subclasses Implicit)
from ._gauss_newton_backward import GaussNewtonImplicit  # noqa: E402  (subclasses Implicit)
