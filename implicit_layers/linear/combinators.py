"""Linear solvers made of other linear solvers.

Two families, named for what they do:

* **"X then Y": fall back on failure.** X runs first; Y takes over for the samples X did not
  solve (did not converge, or found a NaN/Inf). :class:`NeumannThenGMRES`,
  :class:`DenseThenGMRES`, and :class:`StepsOnFailure` (the ``fallback=`` of
  :class:`~implicit_layers.backward.Implicit`: a few step-mode gradient steps where the solver
  failed).
* **"X or Y": choose by timing.** One of the two is chosen per problem from measured times and
  remembered: :class:`~implicit_layers.linear.timed.DenseOrCG` and
  :class:`~implicit_layers.linear.timed.DenseOrGMRES`, whose choices sit in an inspectable
  :class:`~implicit_layers.linear.timed.TimedChoices` cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import GraphedSolverKeywords, check_positive_int
from .._info import ConvergenceWarning, NonFiniteError, SolveInfo, user_stacklevel
from ._base import LinearSolver
from ._operator import FunctionOperator, LinearOperator
from .dense import Dense
from .gmres import GMRES
from .neumann import Neumann

__all__ = ["NeumannThenGMRES", "DenseThenGMRES", "StepsOnFailure"]


class NeumannThenGMRES(LinearSolver):
    """Neumann series with a budget of ``terms``, then GMRES from its iterate for the samples
    it left unconverged (or from zero where the series diverged).

    The backward that :class:`Adaptive` picks after a well-contracting forward: the series needs
    about as many products as GMRES there, without its orthogonalisation; GMRES catches the
    samples whose adjoint contracts worse than the forward suggested.

    Args:
        terms: Neumann terms before GMRES takes over (default 100).
        restart: GMRES restart length (default 20).
        rtol, atol, max_steps, check_every, on_failure: see
            :class:`~implicit_layers.linear.LinearSolver` (``max_steps`` bounds the GMRES part).
        cuda_graph: replay the steps of both parts as CUDA graphs (see
            :class:`~implicit_layers.linear.Neumann`).
    """

    name = "Neumann+GMRES"
    supports_cuda_graph = True

    def __init__(
        self,
        terms: int = 100,
        *,
        restart: int = 20,
        **settings: Unpack[GraphedSolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.terms = check_positive_int(terms, "terms")
        self.restart = check_positive_int(restart, "restart")

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        common = dict(
            rtol=self.rtol, atol=self.atol, check_every=self.check_every,
            cuda_graph=self.cuda_graph,
        )
        neumann = Neumann(self.terms, alpha=1.0, on_failure="ignore", **common)  # type: ignore[arg-type]
        try:
            x, info = neumann._solve(op, b, x0)
        except NonFiniteError:
            x, info = None, None
        if x is not None and info is not None and bool(info.converged.all()):
            info.solver = "Neumann"
            return x, info
        start = x0
        if x is not None and info is not None:
            # A diverged series is no warm start: those samples start GMRES from zero.
            bnorm = torch.linalg.vector_norm(b, dim=-1)
            good = torch.isfinite(info.residual) & (info.residual <= bnorm)
            start = torch.where(good.unsqueeze(-1), x, torch.zeros_like(x) if x0 is None else x0)
        gmres = GMRES(self.restart, max_steps=self.max_steps, on_failure="ignore", **common)  # type: ignore[arg-type]
        x2, info2 = gmres._solve(op, b, start)
        if info is not None:
            info2.steps = info2.steps + info.steps
        info2.solver = "Neumann+GMRES"
        return x2, info2


class DenseThenGMRES(LinearSolver):
    """Dense, then GMRES for every sample if the Jacobian is singular (or holds NaN/Inf) for
    some sample: the default adjoint solver of small roots.

    Dense is the fastest exact method at these sizes, but raises on a singular Jacobian; GMRES
    then reports each sample it cannot solve (a :class:`~implicit_layers.ConvergenceWarning`)
    and returns a finite result. ``max_steps`` and ``check_every`` apply to GMRES;
    ``info.solver`` says which solver ran.
    """

    name = "DenseThenGMRES"

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        try:
            return Dense(rtol=self.rtol, atol=self.atol, on_failure="ignore")._solve(op, b, x0)
        except NonFiniteError:
            gmres = GMRES(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                          check_every=self.check_every, on_failure="ignore")
            return gmres._solve(op, b, x0)


#: ``step_size()``: the step ``η`` of the fallback steps, a float or a tensor (one per sample
#: or one in all), asked only when a sample failed.
StepSize = Callable[[], "float | Tensor"]


class StepsOnFailure(LinearSolver):
    """``solver``, then ``steps`` Neumann steps ``u ← u + η (g - A u)`` from zero for the
    samples it did not solve, with a :class:`~implicit_layers.ConvergenceWarning` naming them.

    At the solution of an implicit layer these steps are the gradient of a step mode
    (:class:`~implicit_layers.backward.Truncated`, ``JacobianFree``, ``Phantom``), which is how
    :class:`~implicit_layers.backward.Implicit` builds its ``fallback=``: one bad batch does
    not hand a garbage gradient to the optimizer.

    Args:
        solver: the linear solver tried first (its own ``on_failure`` is not used).
        steps: the number of fallback steps ``>= 1``.
        step_size: a callable returning ``η`` (a float, or a tensor: one value, or one per
            sample), called only when a sample failed (so an unknown step size is an error
            only then).
        label: the fallback's name in the warning (e.g. ``"Phantom"``).
    """

    name = "StepsOnFailure"

    def __init__(
        self, solver: LinearSolver, *, steps: int, step_size: StepSize, label: str = "step"
    ) -> None:
        if not isinstance(solver, LinearSolver):
            raise TypeError(
                f"solver must be an il.linear solver such as il.linear.GMRES(), got "
                f"{type(solver).__name__}."
            )
        if not callable(step_size):
            raise TypeError(
                f"step_size must be a callable returning the step size, got "
                f"{type(step_size).__name__}; pass e.g. lambda: 0.5."
            )
        # The wrapped solver's settings (validated already) are this one's: they name its
        # budget in the warning and let a caller read them as of any linear solver.
        shared = ("rtol", "atol", "max_steps", "check_every")
        super().__init__(**{setting: getattr(solver, setting) for setting in shared})
        self.solver = solver
        self.steps = check_positive_int(steps, "steps")
        self.step_size = step_size
        self.label = label

    @property
    def uses_initial_guess(self) -> bool:  # type: ignore[override]
        return self.solver.uses_initial_guess

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None, *, what: str = "linear solve"
    ) -> tuple[Tensor, SolveInfo]:
        quiet = self.solver.replace(on_failure="ignore")
        solved: tuple[Tensor, SolveInfo] | None
        try:
            solved = quiet.solve(op, b, x0, what=what)
        except NonFiniteError:
            solved = None
        if solved is not None and bool(solved[1].converged.all()):
            return solved
        u_fb = self._steps(op, b)
        B = b.shape[0]
        if solved is None:
            n_failed, reached = B, "its iterate became NaN or Inf"
        else:
            # Name the residual reached and the tolerance missed, as every non-convergence
            # warning does.
            u, binfo = solved
            failed = ~binfo.converged
            n_failed = int(failed.sum())
            worst = float(binfo.residual[failed].max())
            tol = float(binfo.tolerance[failed].max()) if binfo.tolerance is not None else 0.0
            reached = (f"stopped after {int(binfo.steps.max())} steps with residual "
                       f"{worst:.3e} > tolerance {tol:.3e}")
        warnings.warn(
            f"{self.solver.name} did not converge in the {what} for {n_failed} of {B} "
            f"sample(s) ({reached}); used the {self.label} gradient for them. For the implicit "
            f"gradient raise max_steps (now {self.solver.max_steps}) or choose another linear "
            "solver.",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
        if solved is None:
            binfo = SolveInfo(
                converged=torch.zeros(B, dtype=torch.bool, device=b.device),
                steps=torch.full((B,), self.steps, device=b.device),
                residual=torch.full((B,), float("nan"), device=b.device),
                solver=f"{self.solver.name} -> {self.label}",
            )
            return u_fb, binfo
        return torch.where(failed.unsqueeze(-1), u_fb, u), binfo

    def _steps(self, op: LinearOperator, b: Tensor) -> Tensor:
        eta = self.step_size()
        if isinstance(eta, Tensor):
            # A learnable step size of GradientDescent: the fallback only needs its value.
            eta = eta.detach()
            if eta.numel() == 1:
                eta = float(eta)
            else:
                # One step per sample: Neumann with step 1 on the row-scaled system
                # (η A) u = η g takes exactly the steps u ← u + η (g - A u).
                eta_b = eta.reshape(-1, 1).to(b.dtype)
                scaled = op
                op = FunctionOperator(
                    lambda v: eta_b * scaled.mv(v), op.batch, op.size, op.dtype, op.device
                )
                b = eta_b * b
                eta = 1.0
        neumann = Neumann(max_steps=self.steps, alpha=eta, rtol=0.0, on_failure="ignore")
        return neumann.solve(op, b)[0]
