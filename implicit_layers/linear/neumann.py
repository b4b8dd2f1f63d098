"""Neumann series (Richardson iteration)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_tolerance
from .._info import SolveInfo
from ._base import LinearSolver, batched_dot, check_done, initial_residual, should_stop
from ._operator import LinearOperator

__all__ = ["Neumann"]


class Neumann(LinearSolver):
    """Truncated Neumann series ``x = α Σ_{j<k} (I - α A)^j b``.

    Computed as Richardson iteration ``x ← x + α (b - A x)``, so the residual is known at every
    term and the series stops early once it meets the tolerance. ``k = max_steps`` terms with
    ``rtol=0`` reproduce backpropagation through ``k`` steps of gradient descent (step ``α``)
    from the solution (Lorraine et al., 2020).

    The series converges only if every eigenvalue of ``α A`` lies in ``(0, 2)``; a diverging
    series is reported (warning or :class:`NonFiniteError`), never returned silently.

    Args:
        max_steps: number of terms (default 100).
        alpha: step size. ``None`` (default) picks ``1`` for non-symmetric operators (the
            natural choice for fixed points, where ``A = I - J``) and ``1 / λ_max`` for
            symmetric ones, with ``λ_max`` estimated by ``power_steps`` power iterations.
        power_steps: power iterations used to estimate ``λ_max`` when ``alpha`` is ``None``.
        rtol, atol, check_every, on_failure: see :class:`LinearSolver`.
    """

    name = "Neumann"
    default_max_steps = 100

    def __init__(
        self,
        max_steps: int | None = None,
        alpha: float | None = None,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        power_steps: int = 20,
        check_every: int | None = None,
        on_failure: str = "warn",
    ) -> None:
        super().__init__(rtol, atol, max_steps, check_every, on_failure)
        self.alpha = check_tolerance(alpha, "alpha")
        if self.alpha == 0:
            raise ValueError("alpha must be > 0, got 0.")
        self.power_steps = power_steps

    def _step_size(self, op: LinearOperator, b: Tensor) -> Tensor:
        if self.alpha is not None:
            return torch.full((b.shape[0], 1), self.alpha, dtype=b.dtype, device=b.device)
        if not op.symmetric:
            return torch.ones((b.shape[0], 1), dtype=b.dtype, device=b.device)
        # A fixed seed and one start vector for every sample: the step size must not depend on
        # the global RNG (nor consume it) or on a sample's position in the batch.
        gen = torch.Generator(device=b.device).manual_seed(0)
        v = torch.randn(b.shape[-1], dtype=b.dtype, device=b.device, generator=gen)
        v = v.expand(b.shape)
        lam = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
        for _ in range(self.power_steps):
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)
            Av = op.mv(v)
            lam = batched_dot(v, Av).abs()
            v = Av
        # 10% margin: the power estimate approaches λ_max from below.
        return (1.0 / (1.1 * lam.clamp_min(torch.finfo(b.dtype).tiny))).unsqueeze(-1)

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        _, tol, check_every = self._setup(op, b)
        alpha = self._step_size(op, b)
        x, r = initial_residual(op, b, x0)
        res = torch.linalg.vector_norm(r, dim=-1)
        done = res <= tol
        steps = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        unit = self.alpha == 1.0 or (self.alpha is None and not op.symmetric)
        inplace: bool | None = None
        for k in range(self.max_steps):
            all_active = False
            if k % check_every == 0:
                all_done, any_done = check_done(done, res, self.name)
                if all_done:
                    break
                all_active = not any_done
            step = r if unit else alpha * r
            Ms = op.mv(step)
            if inplace is None:
                # In place unless autograd records the solve (a differentiable operator or
                # right-hand side), whose graph must keep every saved tensor intact.
                inplace = not (torch.is_grad_enabled() and (
                    b.requires_grad or Ms.requires_grad or x.requires_grad
                ))
            if all_active:
                # No sample is done (known from this step's check): no masks.
                if inplace:
                    x.add_(step)
                    r.sub_(Ms)
                else:
                    x = x + step
                    r = r - Ms
                steps += 1
            else:
                active = (~done).unsqueeze(-1)
                x = torch.where(active, x + step, x)
                r = torch.where(active, r - Ms, r)
                steps = steps + active.squeeze(-1).long()
            res = torch.linalg.vector_norm(r, dim=-1)
            done = done | (res <= tol)
        else:
            should_stop(done, res, self.name)
        return x, self._info(res <= tol, steps, res, tol)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps} terms) or use CG (symmetric) / GMRES: the "
            "Neumann series converges slowly when the operator is ill-conditioned, and not at "
            "all when alpha times an eigenvalue leaves (0, 2)."
        )
