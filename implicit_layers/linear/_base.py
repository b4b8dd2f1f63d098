"""The base class of linear solvers and the shared convergence bookkeeping."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .._config import (
    SolverSettings,
    default_check_every,
    default_rtol,
)
from .._info import SolveInfo, report_failure
from ._operator import LinearOperator

__all__ = ["LinearSolver"]


class LinearSolver(SolverSettings):
    """Base class: solves ``A x = b`` for a batch of systems, each to its own tolerance.

    A sample has converged when ``‖b - A x‖ <= max(atol, rtol * ‖b‖)`` (the criterion of
    ``scipy.sparse.linalg``). Converged samples stop changing; the loop ends when every sample
    has converged or after ``max_steps`` iterations.

    Args:
        rtol: relative tolerance. ``None`` means: inherit the forward solver's tolerance when
            used as a backward solver, else ``1e-10`` in float64 and ``1e-5`` in float32.
        atol: absolute tolerance.
        max_steps: iteration limit; ``None`` picks a solver-specific default.
        check_every: test for convergence (a device synchronisation) every this many steps;
            ``None`` means every step on the CPU and every 8 steps on accelerators.
        on_failure: ``"warn"`` (default) emits a :class:`ConvergenceWarning` when a sample
            does not converge, ``"raise"`` raises :class:`ConvergenceError`, ``"ignore"`` does
            neither (the result is still reported in the returned :class:`SolveInfo`).
    """

    name = "LinearSolver"
    default_max_steps = 1000
    needs_symmetric = False
    needs_positive_definite = False

    def with_rtol(self, rtol: float) -> LinearSolver:
        """Return a copy whose unset ``rtol`` is ``rtol`` (used to tie backward to forward)."""
        if self.rtol is not None:
            return self
        new = copy.copy(self)
        new.rtol = rtol
        return new

    # -- to be implemented -------------------------------------------------------------
    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------
    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None, *, what: str = "linear solve"
    ) -> tuple[Tensor, SolveInfo]:
        """Solve ``op x = b``.

        Args:
            op: the operator, acting on ``(B, n)``.
            b: right-hand side, shape ``(B, n)``.
            x0: optional initial guess, shape ``(B, n)``.
            what: names the solve in warnings.

        Returns:
            ``(x, info)`` with ``x`` of shape ``(B, n)`` and per-sample :class:`SolveInfo`.
        """
        self._check_structure(op)
        x, info = self._solve(op, b, x0)
        report_failure(info, self.on_failure, what, self._advice())
        return x, info

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}), loosen rtol/atol, or choose another linear "
            "solver (Dense is exact for small problems)."
        )

    def _check_structure(self, op: LinearOperator) -> None:
        if self.needs_symmetric and not op.symmetric:
            raise ValueError(
                f"{self.name} needs a symmetric operator, but the operator is not tagged "
                "symmetric. Pass symmetric=True if it is, or use GMRES, BiCGStab or Dense for a "
                "non-symmetric system."
            )
        if self.needs_positive_definite and op.positive_definite is False:
            raise ValueError(
                f"{self.name} needs a positive-definite operator, but the operator is tagged "
                "positive_definite=False. Use MINRES for symmetric indefinite systems, or GMRES."
            )

    # -- helpers shared by subclasses --------------------------------------------------
    def _setup(self, op: LinearOperator, b: Tensor) -> tuple[float, Tensor, int]:
        rtol = default_rtol(b.dtype) if self.rtol is None else self.rtol
        bnorm = torch.linalg.vector_norm(b, dim=-1)
        tol = torch.clamp(rtol * bnorm, min=self.atol)
        check_every = self.check_every or default_check_every(b.device)
        return rtol, tol, check_every

    def _info(self, converged: Tensor, steps: Tensor, residual: Tensor, tol: Tensor) -> SolveInfo:
        return SolveInfo(
            converged=converged, steps=steps, residual=residual, solver=self.name, tolerance=tol
        )


def initial_residual(op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
    """The starting iterate and its residual ``b - A x0`` (``x0 = 0`` when not given), as new
    tensors the solver may update in place."""
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    x = x0.clone()
    return x, b - op.mv(x)


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot product of two ``(B, n)`` tensors (one fused kernel, not mul + sum)."""
    return torch.linalg.vecdot(a, b)


def should_stop(done: Tensor, watch: Tensor, solver: str) -> bool:
    """One synchronisation: are all samples done? Raises if ``watch`` is not finite."""
    return check_done(done, watch, solver)[0]


def check_done(done: Tensor, watch: Tensor, solver: str) -> tuple[bool, bool]:
    """One synchronisation: ``(all samples done, any sample done)``; raises if ``watch`` is
    not finite."""
    flags = torch.stack([done.all(), torch.isfinite(watch).all(), done.any()]).tolist()
    if not flags[1]:
        from .._info import NonFiniteError

        raise NonFiniteError(
            f"{solver}: the residual became NaN or Inf. Check the operator and right-hand side "
            "for NaN, and that the operator suits the solver (e.g. Neumann needs the step size "
            "times the largest eigenvalue below 2)."
        )
    return bool(flags[0]), bool(flags[2])
