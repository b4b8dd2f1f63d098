"""The Gauss-Newton backward of least squares: implicit differentiation with ``JᵀJ``.

The exact implicit system of ``min ½‖r(w, θ)‖²`` has the full Hessian ``JᵀJ + Σ rᵢ ∇²rᵢ``
and the mixed term ``Jᵀ ∂r/∂θ + Σ rᵢ ∂²rᵢ/∂w∂θ``. The Gauss-Newton backward drops the terms
weighted by the residual, by differentiating ``F(w) = J(w̄, θ̄)ᵀ r(w, θ)`` with the Jacobian
frozen at the solution (no derivative flows through it): ``∂F/∂w = JᵀJ``,
``∂F/∂θ = Jᵀ ∂r/∂θ``. Both are exact only where the residual vanishes at the solution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._info import SolveInfo
from ._least_squares import LeastSquaresProblem
from ._problem import Problem
from .backward import Implicit

__all__ = ["GaussNewtonImplicit"]


class _GaussNewtonProblem(LeastSquaresProblem):
    """A least-squares problem whose implicit residual is ``J(w̄, θ̄)ᵀ r(w, θ)``."""

    def _frozen_jt(self, z: Tensor, r: Tensor) -> Tensor:
        frozen = self.bind([v.detach() for v in self.values], deferred=True)
        assert isinstance(frozen, LeastSquaresProblem)  # bind keeps the class
        result = torch.func.vjp(frozen.residuals, z.detach())
        return result[1](r)[0]

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return self._frozen_jt(z, self.residuals(z))

    def pure_residual(self, z: Tensor) -> Tensor:
        return self._frozen_jt(z, self.residuals(z))


class GaussNewtonImplicit(Implicit):
    """Implicit differentiation of :func:`~implicit_layers.least_squares` with the Gauss-Newton
    matrix ``JᵀJ`` in place of the Hessian of ``½‖r‖²``.

    Exact only where the residual vanishes at the solution (an exact fit): elsewhere it drops
    the curvature terms ``Σ rᵢ ∇²rᵢ`` and ``Σ rᵢ ∂²rᵢ/∂w∂θ`` and the gradient is an
    approximation. The default backward of ``least_squares`` (:class:`Implicit`) is exact at
    every residual; use this one only where ``JᵀJ`` products are much cheaper than
    Hessian-vector products and the fit is (nearly) exact. Same arguments as
    :class:`Implicit`.

    Raises:
        ValueError: when used with a problem that is not a least-squares problem.

    Examples:
        >>> t = torch.linspace(0, 1, 10, dtype=torch.float64)
        >>> y = (2 * torch.exp(-3 * t)).requires_grad_()
        >>> w = il.least_squares(lambda w, y: w[0] * torch.exp(-w[1] * t) - y,
        ...                      torch.ones(2, dtype=torch.float64), y,
        ...                      backward=il.backward.GaussNewtonImplicit())
        >>> w.sum().backward()  # exact here: the fit is perfect
    """

    @staticmethod
    def _gauss_newton(problem: Problem) -> Problem:
        if not isinstance(problem, LeastSquaresProblem):
            raise ValueError(
                f"GaussNewtonImplicit differentiates least-squares problems (il.least_squares), "
                f"got a {problem.kind} problem; use Implicit()."
            )
        new = object.__new__(_GaussNewtonProblem)
        new.__dict__.update(problem.__dict__)
        return new

    def solve(self, problem: Problem, z0: Tensor, solver: Any) -> tuple[Tensor, SolveInfo]:
        return super().solve(self._gauss_newton(problem), z0, solver)

    def attach(
        self, problem: Problem, z: Tensor, forward_rtol: float, solver: Any = None,
        info: SolveInfo | None = None,
    ) -> Tensor:
        return super().attach(self._gauss_newton(problem), z, forward_rtol, solver, info)
