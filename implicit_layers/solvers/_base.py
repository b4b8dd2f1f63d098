"""The base class of forward solvers and the per-sample convergence monitor."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .._config import SolverSettings, default_check_every
from .._info import NonFiniteError, SolveInfo, report_failure
from .._problem import Kind, Problem

__all__ = ["ForwardSolver"]


class ForwardSolver(SolverSettings):
    """Base class of the algorithms that find ``z*`` in the forward pass.

    A sample has converged when its residual norm ``‖F(z)‖`` (``‖z - f(z)‖`` for a fixed point,
    ``‖∇L(z)‖`` for argmin) is at most ``max(atol, rtol * scale)``, where ``scale`` is ``‖z‖``
    for fixed points and the initial residual norm ``‖F(z0)‖`` for roots and argmin. Every
    sample of a batch is monitored on its own; converged samples stop changing, and the
    solver returns for each sample the iterate with the lowest residual it has seen.

    Args:
        rtol: relative tolerance; ``None`` means ``1e-10`` in float64 and ``1e-5`` in float32.
        atol: absolute tolerance.
        max_steps: iteration limit.
        check_every: test for convergence (a device synchronisation) every this many steps;
            ``None`` means every step on the CPU and every 8 steps on accelerators.
        on_failure: ``"warn"`` (default) emits a :class:`~implicit_layers.ConvergenceWarning`
            when a sample does not converge, ``"raise"`` raises
            :class:`~implicit_layers.ConvergenceError`, ``"ignore"`` only reports it in the info.
    """

    name: ClassVar[str] = "ForwardSolver"
    kinds: ClassVar[tuple[Kind, ...]] = ("fixed_point", "root", "argmin")
    default_max_steps: ClassVar[int] = 500
    supports_unrolled: ClassVar[bool] = True

    def gradient_step_size(self) -> float | Tensor | None:
        """The fixed step ``η`` of this solver's iteration ``z ← z - η F(z)``, or ``None``.

        Backward modes that differentiate a few such steps from the solution (``Truncated``,
        ``JacobianFree``, ``Phantom`` on argmin problems) borrow it when they are given no
        step size of their own. A float, or a tensor (a scalar, or one value per sample of
        shape ``(B,)``; a tensor that requires grad then receives a gradient). ``None`` (the
        default) when the solver has no fixed step.
        """
        return None

    def check_kind(self, kind: Kind) -> None:
        if kind not in self.kinds:
            suggestions = {
                "argmin": "LBFGS, Newton or GradientDescent",
                "fixed_point": "Anderson, Picard or Broyden",
                "root": "Broyden, Anderson or Picard",
            }
            raise ValueError(
                f"solver {self.name} does not solve {kind} problems; use {suggestions[kind]}."
            )

    def solve(self, problem: Problem, z0: Tensor, differentiable: bool = False) -> tuple[Tensor, SolveInfo]:
        """Find the solution for the flat initial guess ``z0`` of shape ``(B, n)``.

        With ``differentiable=False`` the caller runs this under :func:`torch.no_grad`; with
        ``True`` the iterations are recorded by autograd (the ``Unrolled`` backward).
        """
        z, info = self._solve(problem, z0, differentiable)
        report_failure(
            info, self.on_failure, f"forward solve of {problem.kind}", self._advice(problem)
        )
        return z, info

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        raise NotImplementedError

    def _advice(self, problem: Problem) -> str:
        base = f"Raise max_steps (now {self.max_steps}) or loosen rtol/atol"
        if problem.kind == "fixed_point":
            return base + "; a map that is not contractive may need damping, Anderson or Broyden."
        if problem.kind == "argmin":
            return base + "; check that the objective is bounded below and smooth."
        return base + "; check that a root exists near z0."


class Monitor:
    """Per-sample bookkeeping shared by the forward solvers.

    Tracks the tolerance, which samples are done, the steps each used and the lowest-residual
    iterate of each sample, without synchronising with the device except in :meth:`stop`.
    """

    def __init__(self, solver: ForwardSolver, problem: Problem, z0: Tensor, r0: Tensor) -> None:
        self.solver = solver
        self.problem = problem
        self.rtol = solver.resolved_rtol(z0.dtype)
        self.atol = solver.atol
        self.check_every = solver.check_every or default_check_every(z0.device)
        self.relative_to_z = problem.kind == "fixed_point"
        res = torch.linalg.vector_norm(r0, dim=-1)
        self.scale0 = None if self.relative_to_z else res
        self.tol = self._tol(z0)
        self.res = res
        self.best_z = z0
        self.best_res = res
        self.done = res <= self.tol
        self.steps = torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device)
        self.k = 0
        # True from a synchronisation that found no sample done until the next record(): the
        # solvers then step every sample without masks.
        self._all_active = False

    def _tol(self, z: Tensor) -> Tensor:
        scale = torch.linalg.vector_norm(z, dim=-1) if self.relative_to_z else self.scale0
        return torch.clamp(self.rtol * scale, min=self.atol)

    @property
    def active(self) -> Tensor:
        return ~self.done

    @property
    def all_active(self) -> bool:
        """Whether every sample is known (without a new synchronisation) to be still active."""
        return self._all_active

    def record(self, z: Tensor, r: Tensor, stepped: Tensor) -> None:
        """Register the new iterate ``z`` with residual ``r``; ``stepped`` marks who moved."""
        res = torch.linalg.vector_norm(r, dim=-1)
        if self.relative_to_z:
            self.tol = self._tol(z.detach())
        if self._all_active:
            # Every sample stepped: the same updates without the masks.
            self._all_active = False
            self.steps = self.steps + 1
            better = res <= self.best_res
            # On the CPU (a check every step) a synchronisation is cheaper than a masked copy
            # of the iterate, and the residual usually decreases for every sample.
            if self.check_every == 1 and bool(better.all()):
                self.best_z = z
                self.best_res = res
            else:
                self.best_z = torch.where(better.unsqueeze(-1), z, self.best_z)
                self.best_res = torch.where(better, res, self.best_res)
            self.res = res
            self.done = res <= self.tol
            return
        self.steps = self.steps + stepped.long()
        better = stepped & (res <= self.best_res)
        self.best_z = torch.where(better.unsqueeze(-1), z, self.best_z)
        self.best_res = torch.where(better, res, self.best_res)
        self.res = torch.where(stepped, res, self.res)
        self.done = self.done | (self.res <= self.tol)

    def stop(self, force: bool = False) -> bool:
        """Every ``check_every`` steps (or if ``force``): True when all samples are done."""
        self.k += 1
        if not force and (self.k - 1) % self.check_every != 0:
            return False
        flags = torch.stack(
            [self.done.all(), torch.isfinite(self.res).all(), self.done.any()]
        ).tolist()
        self._all_active = not flags[2]
        if not flags[1]:
            raise NonFiniteError(
                f"{self.solver.name}: the residual of the {self.problem.kind} problem became NaN "
                "or Inf during the forward solve. "
                + self.solver._advice(self.problem)
                + " Also check the inputs and parameters for NaN."
            )
        return bool(flags[0])

    def finish(self) -> tuple[Tensor, SolveInfo]:
        self.stop(force=True)
        converged = self.best_res <= self.tol
        info = SolveInfo(
            converged=converged,
            steps=self.steps,
            residual=self.best_res.detach(),
            solver=self.solver.name,
            tolerance=self.tol.detach(),
        )
        return self.best_z, info
