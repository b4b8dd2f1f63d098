"""Backward modes: how gradients flow through the solution of an implicit layer.

* :class:`Implicit` — the implicit function theorem with a linear solver (exact at convergence,
  memory independent of the number of forward steps).
* :class:`Unrolled` — autograd through every forward iteration (memory grows with the steps).
* :class:`Truncated` — autograd through ``steps`` iterations of the basic step map
  ``z ← z - η F(z)`` started at the solution.
* :class:`JacobianFree` — one such step (Fung et al., 2022, "JFB").
* :class:`Phantom` — ``steps`` damped steps (Geng et al., 2021, "phantom gradients").

Passing a linear solver as ``backward=`` means ``Implicit(that solver)``.
"""

from __future__ import annotations

from torch import Tensor

from ._config import check_positive_int, check_tolerance
from .linear._base import LinearSolver

__all__ = ["BackwardMode", "Implicit", "Unrolled", "Truncated", "JacobianFree", "Phantom"]


class BackwardMode:
    """Base class of the backward modes."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _StepMode(BackwardMode):
    """Differentiates ``steps`` steps of ``z ← z - η F(z)`` started at the detached solution.

    For a fixed point ``F(z) = z - f(z)``, so a step is ``(1 - η) z + η f(z)``; for argmin it
    is a gradient step. At the solution this equals an ``steps``-term Neumann series with step
    ``η`` for the implicit system (Lorraine et al., 2020), which is also how it serves as a
    fallback for :class:`Implicit`.
    """

    steps: int
    step_size: float | None

    def resolved_step_size(self, kind: str, solver: object) -> float | Tensor:
        if self.step_size is not None:
            return self.step_size
        if kind != "argmin":
            return 1.0
        from .solvers.gradient_descent import GradientDescent

        if isinstance(solver, GradientDescent) and isinstance(solver.step_size, (int, float)):
            return float(solver.step_size)
        if isinstance(solver, GradientDescent) and isinstance(solver.step_size, Tensor):
            # A learnable step size (meta-descent): the differentiated steps use it, so it gets
            # a gradient. One value per sample broadcasts over the flat (B, n) iterate.
            eta = solver.step_size
            return eta.unsqueeze(-1) if eta.dim() == 1 else eta
        raise ValueError(
            f"{type(self).__name__} on an argmin problem needs a step size for its gradient "
            f"steps; got step_size=None and a forward solver ({type(solver).__name__}) without "
            "a fixed float step_size. Pass e.g. step_size=0.1 (about 1 / largest Hessian "
            "eigenvalue)."
        )


class Implicit(BackwardMode):
    """Implicit differentiation: solve ``(∂F/∂z)ᵀ u = g`` at the solution, then
    ``∂ℓ/∂θ = -(∂F/∂θ)ᵀ u``.

    Args:
        linear_solver: the :class:`~implicit_layers.linear.LinearSolver` for the adjoint
            system. ``None`` picks, for symmetric problems (argmin, whose Hessian is symmetric
            positive definite at a strict minimum, and ``custom_root(..., symmetric=True)``),
            :class:`~implicit_layers.linear.Dense` when the system size ``n`` (elements of one
            sample's solution) is at most 128 and ``B · n²`` (``B`` the batch, 1 unbatched) is at
            most ``2**22``, else :class:`~implicit_layers.linear.CG`; for the others (fixed
            points, roots) :class:`~implicit_layers.linear.GMRES`. A solver with ``rtol=None``
            inherits the forward solver's tolerance, so the gradient is as accurate as the
            solution it differentiates.
        fallback: optional :class:`JacobianFree`, :class:`Phantom` or :class:`Truncated` whose
            gradient replaces the implicit one for the samples whose adjoint solve did not
            converge (or diverged), with a :class:`~implicit_layers.ConvergenceWarning`, so one
            bad batch does not hand a garbage gradient to the optimizer.
    """

    def __init__(
        self,
        linear_solver: LinearSolver | None = None,
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


class Unrolled(BackwardMode):
    """Backpropagate through every iteration of the forward solver.

    Exact for the computation performed, including non-converged solves and learnable solver
    settings (a tensor step size of :class:`~implicit_layers.solvers.GradientDescent`), but its
    memory grows linearly with the number of forward steps.
    """


class Truncated(_StepMode):
    """Backpropagate through ``steps`` steps ``z ← z - η F(z)`` taken from the solution.

    For a forward solver that is itself this iteration (Picard, GradientDescent) this is
    truncated backpropagation through its last ``steps`` steps.

    Args:
        steps: number of differentiated steps (``K``).
        step_size: ``η``; ``None`` means 1 for fixed points and roots, and for argmin the
            ``step_size`` of a :class:`~implicit_layers.solvers.GradientDescent` forward solver.
    """

    def __init__(self, steps: int, step_size: float | None = None) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.step_size = check_tolerance(step_size, "step_size")


class JacobianFree(_StepMode):
    """Jacobian-free backpropagation (Fung et al., 2022): one step from the solution.

    For a fixed point ``z = f(z, θ)`` the gradient is ``(∂f/∂θ)ᵀ g``, i.e. the inverse
    ``(I - J)⁻¹`` is replaced by ``I``. Cheap, biased, often good enough for training DEQs.

    Args:
        step_size: ``η`` of the step (see :class:`Truncated`).
    """

    def __init__(self, step_size: float | None = None) -> None:
        self.steps = 1
        self.step_size = check_tolerance(step_size, "step_size")


class Phantom(_StepMode):
    """Phantom gradient (Geng et al., 2021): ``steps`` damped steps from the solution.

    Args:
        steps: number of differentiated steps (default 5).
        damping: ``λ`` in ``z ← (1 - λ) z + λ f(z)`` (default 0.5); for argmin the step size
            of the gradient steps.
    """

    def __init__(self, steps: int = 5, damping: float = 0.5) -> None:
        self.steps = check_positive_int(steps, "steps")
        self.step_size = check_tolerance(damping, "damping", allow_none=False)
        if self.step_size == 0:
            raise ValueError("damping must be > 0, got 0.")

    @property
    def damping(self) -> float:
        return self.step_size
