"""Newton-CG: Hessian-free Newton steps with an inexact CG inner solve."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._capture import transforms_active
from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo
from .._problem import MinimiseProblem, Problem
from ..linear._operator import FunctionOperator
from ..linear.cg import CG
from ._base import ForwardSolver, Monitor
from ._linesearch import descent_step, where_active

__all__ = ["Newton"]


class Newton(ForwardSolver):
    """Newton-CG (truncated Newton) for argmin problems.

    Each step solves ``H d = -∇L`` approximately by conjugate gradients with Hessian-vector
    products (double backward; the Hessian is never formed), to the forcing tolerance
    ``min(0.5, sqrt(‖∇L‖ / ‖∇L(w0)‖))`` relative, then backtracks along ``d``. Converges
    quadratically near a strict minimum. Where CG meets negative curvature the step falls back
    to steepest descent for that sample.

    Cannot be differentiated through (``backward=Unrolled()`` raises); its implicit and step
    backward modes work as for any solver.

    Used as ``solver=`` of :func:`~implicit_layers.argmin`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        cg_max_steps: limit on inner CG iterations per Newton step (default 50).
        max_steps: limit on the number of Newton steps (default 100).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).

    Raises:
        TypeError: if a setting has the wrong type or any setting is passed positionally.
        ValueError: if a setting is out of range (``rtol < 0``, ``max_steps < 1``, ...).

    Examples:
        >>> t = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> w, info = il.argmin(lambda w, t: ((w - t) ** 2).sum() + (w**4).sum(),
        ...                     torch.zeros(2, dtype=torch.float64), t,
        ...                     solver=il.solvers.Newton(), return_info=True)
        >>> torch.allclose(2 * (w - t) + 4 * w**3, torch.zeros(2, dtype=torch.float64))
        True
        >>> int(info.steps) < 20
        True
    """

    name = "Newton"
    problems = (MinimiseProblem,)
    default_max_steps = 100
    supports_unrolled = False

    def __init__(self, *, cg_max_steps: int = 50, **settings: Unpack[SolverKeywords]) -> None:
        super().__init__(**settings)
        self.cg_max_steps = check_positive_int(cg_max_steps, "cg_max_steps")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        z = z0.detach()
        v, g = problem.value_and_grad(z)
        mon = Monitor(self, problem, z, g)
        g0 = torch.linalg.vector_norm(g, dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            with torch.enable_grad():
                op = FunctionOperator(
                    _hessian_product(problem, z), z.shape[0], z.shape[1], z.dtype, z.device,
                    symmetric=True,
                )
                forcing = torch.sqrt(torch.linalg.vector_norm(g, dim=-1) / g0).clamp(max=0.5)
                inner = CG(rtol=float(forcing.min()), max_steps=self.cg_max_steps,
                           on_failure="ignore")
                d, _ = inner.solve(op, -g.detach())
            z_new, v_new, g_new = descent_step(problem, z, v, g, d, active, False)
            z, v, g = where_active(active, (z_new, v_new, g_new), (z, v, g))
            mon.record(z, g, active)
        return mon.finish()


def _hessian_product(problem: Problem, z: Tensor) -> Callable[[Tensor], Tensor]:
    """``x ↦ H(z) x`` for the objective's Hessian ``H``: by reverse mode on one recorded
    gradient, or, where autograd cannot record (``torch.inference_mode``, ``torch.func``
    transforms), as the forward-mode derivative of ``torch.func.grad``."""
    if torch.is_inference_mode_enabled() or transforms_active():
        grad = torch.func.grad(lambda zz: problem.objective(zz).sum())
        return lambda x: torch.func.jvp(grad, (z,), (x,))[1]
    zz = z.detach().requires_grad_(True)
    _, gg = problem.value_and_grad(zz, create_graph=True)
    return lambda x: torch.autograd.grad(gg, zz, x, retain_graph=True)[0]
