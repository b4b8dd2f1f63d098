"""Gradient descent with a fixed (possibly learnable) step size."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo
from .._problem import MinimiseProblem, Problem
from ..linear._power import power_iteration_from, seeded_start
from ._base import ForwardSolver, Monitor

__all__ = ["GradientDescent"]


class GradientDescent(ForwardSolver):
    """Gradient descent ``w ← w - η ∇L(w)`` on an argmin problem.

    Used as ``solver=`` of :func:`~implicit_layers.argmin`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        step_size: ``η > 0``: a float, or a tensor (a scalar or one value per batch element,
            shape ``(B,)``). A tensor that requires grad receives a gradient under
            ``backward=Unrolled()`` or ``Truncated(k)`` (meta-descent: learning the learning
            rate). ``None`` (default) takes ``1 / L`` with ``L`` the largest Hessian eigenvalue
            at ``w0``, estimated by ``power_steps`` Hessian-vector products; for non-quadratic
            objectives whose curvature grows away from ``w0``, pass a step size. The one
            positional argument.
        power_steps: power iterations used when ``step_size`` is ``None`` (default 20).
        max_steps: iteration limit (default 1000).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).

    Raises:
        TypeError: if a setting has the wrong type (``step_size`` not a float, tensor or
            ``None``) or a setting other than ``step_size`` is passed positionally.
        ValueError: if a setting is out of range (a float ``step_size <= 0``,
            ``power_steps < 1``, ...); when solving, if a tensor ``step_size`` is neither a
            scalar nor of shape ``(B,)``.

    Examples:
        >>> t = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w = il.argmin(lambda w, t: ((w - t) ** 2).sum(), torch.zeros(2, dtype=torch.float64),
        ...               t, solver=il.solvers.GradientDescent(0.25))
        >>> torch.allclose(w, t)
        True

        A learnable step size, differentiated through the last 5 steps:

        >>> eta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> w = il.argmin(lambda w, t: ((w - t) ** 2).sum(), torch.zeros(2, dtype=torch.float64),
        ...               t, solver=il.solvers.GradientDescent(eta),
        ...               backward=il.backward.Truncated(5))
        >>> w.sum().backward()
        >>> eta.grad is not None
        True
    """

    name = "GradientDescent"
    problems = (MinimiseProblem,)
    default_max_steps = 1000

    def __init__(
        self,
        step_size: float | Tensor | None = None,
        *,
        power_steps: int = 20,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float, Tensor)):
                raise TypeError(
                    f"step_size must be a float, a tensor or None, got {type(step_size).__name__}."
                )
            if not isinstance(step_size, Tensor) and step_size <= 0:
                raise ValueError(f"step_size must be > 0, got {step_size}.")
        self.step_size = step_size
        self.power_steps = check_positive_int(power_steps, "power_steps")

    def gradient_step_size(self) -> float | Tensor | None:
        """The fixed ``step_size``, borrowed by the step backward modes on argmin problems.

        Returns:
            The ``step_size`` given (a float, or a tensor of shape ``()`` or ``(B,)``), or
                ``None`` when it is estimated at ``w0``.

        Examples:
            >>> il.solvers.GradientDescent(0.1).gradient_step_size()
            0.1
        """
        return self.step_size

    def step_for(self, problem: Problem, z: Tensor) -> Tensor | float:
        """The step size as used on the flat ``(B, n)`` iterate ``z``.

        Args:
            problem: the problem (its batch size, and its Hessian when the step is estimated).
            z: the flat iterate, shape ``(B, n)``.

        Returns:
            A float, a 0-d tensor, or a ``(B, 1)`` tensor that broadcasts over ``z``
                (``1 / L`` per sample when ``step_size`` is ``None``).

        Raises:
            ValueError: if a tensor ``step_size`` is neither a scalar nor of shape ``(B,)``.
        """
        eta = self.step_size
        if eta is None:
            return 1.0 / lipschitz_estimate(problem, z, self.power_steps).unsqueeze(-1)
        if isinstance(eta, Tensor):
            if eta.dim() == 0:
                return eta
            if eta.shape == (problem.batch,):
                return eta.unsqueeze(-1)
            raise ValueError(
                f"step_size must be a scalar or have shape ({problem.batch},), got "
                f"{tuple(eta.shape)}."
            )
        return eta

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        eta = self.step_for(problem, z0)
        z = z0
        g = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, g)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            z = torch.where(active.unsqueeze(-1), z - eta * g, z)
            g = problem.residual(z, create_graph=differentiable)
            mon.record(z, g, active)
        return mon.finish()


def lipschitz_estimate(problem: Problem, z: Tensor, steps: int) -> Tensor:
    """Largest Hessian eigenvalue per sample at ``z`` by power iteration, shape ``(B,)``.

    Hessian-vector products come from one recorded gradient graph, or, under
    ``torch.inference_mode`` where autograd cannot record, from ``torch.func.jvp`` of the
    gradient (``value_and_grad`` switches to ``torch.func.grad`` there)."""
    return lipschitz_estimate_from(problem, z, steps, None)[0]


def lipschitz_estimate_from(
    problem: Problem, z: Tensor, steps: int, start: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`lipschitz_estimate` from the start vectors ``start`` (``(B, n)``; ``None``: the
    shared seeded vector), and the last iterates of the power iteration."""
    if start is None:
        start = seeded_start(z)
    if torch.is_inference_mode_enabled():
        def hvp_func(v: Tensor) -> Tensor:
            return torch.func.jvp(lambda zz: problem.value_and_grad(zz)[1], (z,), (v,))[1]

        lam, v = power_iteration_from(hvp_func, start, steps)
    else:
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            _, g = problem.value_and_grad(zz, create_graph=True)

            def hvp(v: Tensor) -> Tensor:
                return torch.autograd.grad(g, zz, v, retain_graph=True)[0]

            lam, v = power_iteration_from(hvp, start, steps)
    # 10% margin: the power estimate approaches λ_max from below.
    return (1.1 * lam).clamp_min(torch.finfo(z.dtype).eps).detach(), v.detach()
