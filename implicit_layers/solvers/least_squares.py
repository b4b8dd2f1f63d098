"""Gauss-Newton and Levenberg-Marquardt for ``min ½‖r(w)‖²``, from Jacobian products of ``r``."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo
from .._least_squares import LeastSquaresProblem
from .._problem import Problem
from ..linear._operator import FunctionOperator
from ..linear.cg import CG
from ._base import ForwardSolver, Monitor

__all__ = ["GaussNewton", "LevenbergMarquardt"]


class _Linearised:
    """``r`` and products with its Jacobian ``J`` (``(B, m, n)`` per batch) at a point ``z``.

    Products come from ``torch.func.jvp`` / ``vjp`` (samples are independent, so one product
    with a ``(B, n)`` tangent gives every sample's); the matrix is formed only on request,
    from ``n`` JVPs.
    """

    def __init__(self, residuals: Callable[[Tensor], Tensor], z: Tensor, dense: bool) -> None:
        self.residuals = residuals
        self.z = z
        self.J: Tensor | None = None
        if dense:
            # n JVPs at once; Jᵀu is then a matrix product, no VJP graph needed.
            B, n = z.shape
            basis = torch.eye(n, dtype=z.dtype, device=z.device).unsqueeze(1).expand(n, B, n)
            self.r = residuals(z)
            self.J = torch.func.vmap(self.jv)(basis).permute(1, 2, 0)  # (B, m, n)
        else:
            result = torch.func.vjp(residuals, z)
            self.r, self._vjp = result[0], result[1]

    def jv(self, v: Tensor) -> Tensor:
        return torch.func.jvp(self.residuals, (self.z,), (v,))[1]

    def jtv(self, u: Tensor) -> Tensor:
        if self.J is not None:
            return (self.J.mT @ u.unsqueeze(-1)).squeeze(-1)
        return self._vjp(u)[0]


def _decrease(r: Tensor, r_new: Tensor) -> Tensor:
    """``½‖r‖² - ½‖r_new‖²`` per sample, as ``½ Σ (r - r_new)(r + r_new)``: without the
    cancellation of two nearly equal sums of squares, which near the solution would refuse
    every step below ``eps·‖r‖²`` and stall the gradient far above its tolerance."""
    return 0.5 * ((r - r_new) * (r + r_new)).sum(-1)


def _noise(r: Tensor) -> Tensor:
    """A decrease of ``½‖r‖²`` below this is lost in the rounding of ``r`` itself (each entry
    is a difference of model and data, larger than ``r`` near a good fit). Steps predicted to
    gain less are taken on the model's word: the convergence test on ``‖Jᵀr‖`` and the
    monitor's best iterate, not the cost, judge them."""
    return 1e3 * torch.finfo(r.dtype).eps * 0.5 * r.square().sum(-1)


class _NormalEquationsKeywords(SolverKeywords, total=False):
    dense_max_size: int
    cg_max_steps: int | None


class _NormalEquations(ForwardSolver):
    """What Gauss-Newton and Levenberg-Marquardt share: settings, the damped normal-equation
    solve ``(JᵀJ + μ I) δ = -Jᵀr`` (dense up to ``dense_max_size`` unknowns, CG beyond)."""

    problems = (LeastSquaresProblem,)
    default_max_steps = 200
    supports_unrolled = False

    def __init__(
        self,
        *,
        dense_max_size: int = 128,
        cg_max_steps: int | None = None,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.dense_max_size = check_positive_int(dense_max_size, "dense_max_size", allow_zero=True)
        self.cg_max_steps = (
            None if cg_max_steps is None else check_positive_int(cg_max_steps, "cg_max_steps")
        )

    def _direction(self, lin: _Linearised, g: Tensor, mu: Tensor) -> Tensor:
        """``δ`` solving ``(JᵀJ + μ I) δ = -g`` per sample (``mu`` of shape ``(B, 1)``)."""
        B, n = g.shape
        if lin.J is not None:
            J = lin.J
            A = J.mT @ J + mu.unsqueeze(-1) * torch.eye(n, dtype=g.dtype, device=g.device)
            # lstsq, not a Cholesky: Gauss-Newton's JᵀJ may be singular (μ = 0).
            return torch.linalg.lstsq(A, -g.unsqueeze(-1)).solution.squeeze(-1)
        op = FunctionOperator(
            lambda v: lin.jtv(lin.jv(v)) + mu * v, B, n, g.dtype, g.device,
            symmetric=True, positive_definite=True,
        )
        cg = CG(rtol=1e-2 * self.resolved_rtol(g.dtype) ** 0.5, max_steps=self.cg_max_steps or 2 * n,
                on_failure="ignore")
        return cg.solve(op, -g, what=f"{self.name} step")[0]

    def _start(self, problem: Problem, z0: Tensor) -> tuple[Callable[[Tensor], Tensor], _Linearised, Tensor]:
        # A LeastSquaresProblem (check_kind), or its fold under vmap, which has residuals().
        residuals = cast(LeastSquaresProblem, problem).residuals
        lin = _Linearised(residuals, z0, self._dense(z0))
        return residuals, lin, lin.jtv(lin.r)

    def _dense(self, z: Tensor) -> bool:
        return z.shape[-1] <= self.dense_max_size


class LevenbergMarquardt(_NormalEquations):
    """Levenberg-Marquardt with per-sample damping, the solver of
    :func:`~implicit_layers.least_squares` by default.

    Each step solves ``(JᵀJ + μ I) δ = -Jᵀr`` (``J`` the Jacobian of the residuals): with the
    dense ``JᵀJ`` formed from ``n`` Jacobian-vector products up to ``dense_max_size`` unknowns,
    by conjugate gradients on products ``Jᵀ(J v)`` beyond. The damping ``μ`` of each sample
    follows the gain ratio ``ρ`` of actual to predicted decrease (Nielsen's update): a step
    with ``ρ > 0`` is taken and ``μ`` multiplied by ``max(1/3, 1 - (2ρ - 1)³)``; otherwise the
    step is refused and ``μ`` multiplied by ``ν`` (``ν`` doubling after each refusal).

    A sample has converged when its gradient ``‖Jᵀr‖`` is at most ``max(atol, rtol·‖Jᵀr(w0)‖)``.

    Args:
        damping: initial ``μ`` relative to the largest diagonal entry of ``JᵀJ`` at ``w0``
            (default ``1e-3``). The one positional argument.
        dense_max_size: largest number of unknowns solved with the dense normal equations
            (default 128).
        cg_max_steps: CG steps per step beyond (default ``2n``).
        rtol, atol, max_steps, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`); ``max_steps`` defaults to 200.

    Examples:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-3.0 * t)
        >>> w = il.least_squares(lambda w: w[0] * torch.exp(-w[1] * t) - y,
        ...                      torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(w, torch.tensor([2.0, 3.0], dtype=torch.float64))
        True
    """

    name = "LevenbergMarquardt"

    def __init__(self, damping: float = 1e-3, **settings: Unpack[_NormalEquationsKeywords]) -> None:
        super().__init__(**settings)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a float, got {type(damping).__name__}.")
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}.")
        self.damping = float(damping)

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        residuals, lin, g = self._start(problem, z0)
        z = z0
        mon = Monitor(self, problem, z, g)
        if lin.J is not None:
            diag = lin.J.square().sum(-2).amax(-1, keepdim=True)
        else:
            diag = g.abs().amax(-1, keepdim=True)  # a scale without forming JᵀJ
        mu = self.damping * diag.clamp_min(torch.finfo(z.dtype).tiny)
        # Refused steps at rounding level grow μ without bound; past this the step is nil.
        mu_max = mu / (self.damping * torch.finfo(z.dtype).eps ** 2)
        nu = torch.full_like(mu, 2.0)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active.unsqueeze(-1)
            delta = self._direction(lin, g, mu)
            trial = z + delta
            r_trial = residuals(trial)
            predicted = 0.5 * (delta * (mu * delta - g)).sum(-1)
            rho = _decrease(lin.r, r_trial) / predicted.clamp_min(torch.finfo(z.dtype).tiny)
            accept = ((rho > 0) | (predicted < _noise(lin.r))) & active.squeeze(-1)
            acc = accept.unsqueeze(-1)
            scale = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3).unsqueeze(-1)
            mu = torch.where(acc, mu * scale, torch.where(active, mu * nu, mu)).minimum(mu_max)
            nu = torch.where(acc, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
            z = torch.where(acc, trial, z)
            lin = _Linearised(residuals, z, self._dense(z))
            g = lin.jtv(lin.r)
            mon.record(z, g, mon.active)
        return mon.finish()


class GaussNewton(_NormalEquations):
    """Gauss-Newton with a backtracking line search: ``δ`` solves ``JᵀJ δ = -Jᵀr`` (least
    norm where ``JᵀJ`` is singular; dense up to ``dense_max_size`` unknowns, CG beyond), and
    the step ``α δ`` halves ``α`` until ``½‖r‖²`` decreases sufficiently (Armijo, ``c = 1e-4``).

    Fast on zero- or small-residual problems; prefer
    :class:`LevenbergMarquardt` (the default) far from the solution or on large residuals.

    Args:
        max_halvings: line-search halvings per step (default 30).
        dense_max_size, cg_max_steps, rtol, atol, max_steps, check_every, on_failure: as for
            :class:`LevenbergMarquardt`.

    Examples:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> w = il.least_squares(lambda w: w[0] * torch.exp(-w[1] * t) - 2 * torch.exp(-3 * t),
        ...                      torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...                      solver=il.solvers.GaussNewton())
        >>> torch.allclose(w, torch.tensor([2.0, 3.0], dtype=torch.float64))
        True
    """

    name = "GaussNewton"

    def __init__(self, *, max_halvings: int = 30, **settings: Unpack[_NormalEquationsKeywords]) -> None:
        super().__init__(**settings)
        self.max_halvings = check_positive_int(max_halvings, "max_halvings")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        residuals, lin, g = self._start(problem, z0)
        z = z0
        mon = Monitor(self, problem, z, g)
        zero = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            delta = self._direction(lin, g, zero)
            slope = (delta * g).sum(-1)
            alpha = torch.ones_like(slope)
            pending = active.clone()
            for _ in range(self.max_halvings):
                trial = z + alpha.unsqueeze(-1) * delta
                ok = (_decrease(lin.r, residuals(trial)) >= -1e-4 * alpha * slope) | (
                    -slope < _noise(lin.r))
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
                alpha = torch.where(pending, alpha / 2, alpha)
            take = active & ~pending
            z = torch.where(take.unsqueeze(-1), z + alpha.unsqueeze(-1) * delta, z)
            lin = _Linearised(residuals, z, self._dense(z))
            g = lin.jtv(lin.r)
            mon.record(z, g, active)
        return mon.finish()
