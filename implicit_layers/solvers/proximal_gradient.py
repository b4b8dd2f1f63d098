"""Accelerated proximal gradient (FISTA) with backtracking and adaptive restarts."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._composite import CompositeProblem
from .._config import SolverKeywords, check_bool, check_positive_int
from .._info import SolveInfo
from .._problem import Problem
from ._base import ForwardSolver, Monitor
from .gradient_descent import lipschitz_estimate

__all__ = ["ProximalGradient"]


class ProximalGradient(ForwardSolver):
    """FISTA on ``min_w L(w) + g(w)``: ``x ← prox_{s g}(y - s ∇L(y))``, ``y`` extrapolated.

    The solver of :func:`~implicit_layers.argmin` with ``prox=`` or ``constraint=``. Every
    sample of a batch has its own step size ``s``, momentum and convergence test:

    * **step**: starts at ``1 / L`` with ``L`` a power-iteration estimate of the largest
      Hessian eigenvalue at ``w0`` (or ``step_size``), and is multiplied by ``shrink`` until
      the sufficient-decrease test ``L(x) <= L(y) + ⟨∇L(y), x - y⟩ + ‖x - y‖² / (2s)`` holds;
    * **restart**: the momentum is reset when it points against the last step
      (``⟨y - x_new, x_new - x⟩ > 0``, O'Donoghue and Candès' gradient scheme), which keeps the
      linear rate of proximal gradient on strongly convex problems;
    * **convergence**: a sample is done when the proximal-gradient step ``‖y - x_new‖`` is at
      most ``max(atol, rtol · max(‖x_new‖, ‖x_1‖))``. This bounds the residual
      ``‖x - prox(x - s∇L(x))‖`` of the returned ``x`` (the map is non-expansive for
      ``s <= 2 / L``).

    Args:
        step_size: the initial step size (a float > 0); ``None`` (default) estimates ``1 / L``
            at ``w0`` by ``power_steps`` Hessian-vector products. The one positional argument.
        accelerated: use Nesterov momentum (FISTA, default ``True``); ``False`` is plain
            proximal gradient (ISTA).
        restart: reset the momentum adaptively (default ``True``).
        shrink: factor in ``(0, 1)`` applied to a step that fails the decrease test
            (default 0.5).
        max_backtracks: decrease tests per iteration at most (default 30).
        power_steps: power iterations for the initial step (default 20).
        rtol, atol, max_steps, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`); ``max_steps`` defaults to 5000.

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: a setting out of range (``step_size <= 0``, ``shrink`` outside ``(0, 1)``).

    Examples:
        >>> X, y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
        >>> p = il.prox.bind(il.prox.l1, 0.5)
        >>> w = il.argmin(lambda w: 0.5 * (X @ w - y).square().sum(), torch.zeros(5, dtype=torch.float64),
        ...               prox=p, solver=il.solvers.ProximalGradient(rtol=1e-12))
        >>> w.shape
        torch.Size([5])
    """

    name = "ProximalGradient"
    problems = (CompositeProblem,)
    default_max_steps = 5000

    def __init__(
        self,
        step_size: float | None = None,
        *,
        accelerated: bool = True,
        restart: bool = True,
        shrink: float = 0.5,
        max_backtracks: int = 30,
        power_steps: int = 20,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
                raise TypeError(f"step_size must be a float or None, got {type(step_size).__name__}.")
            if not 0 < step_size < math.inf:
                raise ValueError(f"step_size must be a finite number > 0, got {step_size}.")
            step_size = float(step_size)
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)):
            raise TypeError(f"shrink must be a float, got {type(shrink).__name__}.")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}.")
        self.step_size = step_size
        self.accelerated = check_bool(accelerated, "accelerated")
        self.restart = check_bool(restart, "restart")
        self.shrink = float(shrink)
        self.max_backtracks = check_positive_int(max_backtracks, "max_backtracks")
        self.power_steps = check_positive_int(power_steps, "power_steps")

    def gradient_step_size(self) -> float | None:
        """The ``step_size`` given (``None`` when it is estimated at ``w0``), borrowed by the
        step backward modes (``Truncated``, ``JacobianFree``, ``Phantom``) on composite
        problems.

        Examples:
            >>> il.solvers.ProximalGradient(0.05).gradient_step_size()
            0.05
        """
        return self.step_size

    def _initial_step(self, problem: Problem, z0: Tensor) -> Tensor:
        if self.step_size is not None:
            return torch.full((z0.shape[0], 1), self.step_size, dtype=z0.dtype, device=z0.device)
        return 1.0 / lipschitz_estimate(problem, z0, self.power_steps).unsqueeze(-1)

    def _prox_step(
        self, problem: CompositeProblem, y: Tensor, fy: Tensor, gy: Tensor, step: Tensor,
        differentiable: bool,
    ) -> tuple[Tensor, Tensor]:
        """The proximal-gradient point from ``y`` and the step that passed the decrease test."""
        x = problem.gradient_step(y, gy, step)
        # Rounding slack of the test: a step at the solution must not shrink forever.
        slack = 64 * torch.finfo(y.dtype).eps * (fy.abs() + 1)
        for _ in range(self.max_backtracks):
            fx = problem.objective(x) if differentiable else problem.objective(x).detach()
            d = x - y
            bound = fy + (gy * d).sum(-1) + d.square().sum(-1) / (2 * step.squeeze(-1)) + slack
            ok = (fx <= bound).detach()
            if bool(ok.all()):
                break
            step = torch.where(ok.unsqueeze(-1), step, step * self.shrink)
            x = torch.where(ok.unsqueeze(-1), x, problem.gradient_step(y, gy, step))
        return x, step

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        # A CompositeProblem (check_kind), or its fold under vmap, which has the same methods.
        composite = cast(CompositeProblem, problem)
        step = self._initial_step(problem, z0)
        x = y = z0
        momentum = torch.ones(z0.shape[0], 1, dtype=z0.dtype, device=z0.device)
        fy, gy = problem.value_and_grad(y, create_graph=differentiable)
        x_new, step = self._prox_step(composite, y, fy, gy, step, differentiable)
        mon = Monitor(self, problem, z0, y - x_new)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active.unsqueeze(-1)
            if self.accelerated:
                following = (1 + torch.sqrt(1 + 4 * momentum.square())) / 2
                beta = (momentum - 1) / following
                if self.restart:
                    # Restart where the momentum points against the step just taken.
                    against = ((y - x_new) * (x_new - x)).sum(-1, keepdim=True) > 0
                    following = torch.where(against, torch.ones_like(following), following)
                    beta = torch.where(against, torch.zeros_like(beta), beta)
                y_next = x_new + beta * (x_new - x)
                momentum = torch.where(active, following, momentum)
            else:
                y_next = x_new
            x = torch.where(active, x_new, x)
            y = torch.where(active, y_next, y)
            fy, gy = problem.value_and_grad(y, create_graph=differentiable)
            x_new, step = self._prox_step(composite, y, fy, gy, step, differentiable)
            mon.record(x_new, y - x_new, mon.active)
        return mon.finish()
