"""Broyden's ("good") quasi-Newton method applied to a linear residual."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo
from ._base import LinearSolver, batched_dot
from ._loop import LinearLoop
from ._operator import LinearOperator
from ._restart import one_and_zero, run_in_rounds

__all__ = ["Broyden"]


class Broyden(LinearSolver):
    """Limited-memory "good" Broyden method on the residual ``r(x) = b - A x``, batched.

    A quasi-Newton iteration ``x ← x + H r`` whose inverse-Jacobian approximation ``H ≈ A⁻¹``
    starts as ``γ I`` and receives one rank-one secant update per step,
    ``H ← H + (s - H y) sᵀH / (sᵀH y)`` with ``s`` the step and ``y = A s``. It is the linear
    counterpart of the Broyden solver used in deep equilibrium models, and suits their
    non-symmetric backward systems ``(I - Jᵀ) u = g``: for a contractive fixed point
    (``A = I - M`` with spectral radius of ``M`` below 1) the first step is a (scaled) Neumann
    step and the secant updates accelerate it. On linear problems good Broyden terminates in at most
    ``2n`` steps in exact arithmetic (Gay, 1979); :class:`GMRES` usually needs fewer products.

    ``γ`` is chosen at the start of each round as the step length that minimises the residual
    along ``r`` (``γ = rᵀAr / ‖Ar‖²``), which costs nothing extra (the product ``A r`` is the
    first step's product) and makes the method invariant to the scale of ``A``. Later steps are
    full quasi-Newton steps ``s = H r``; they need not decrease the residual, so each round
    returns its best iterate. ``line_search=True`` instead scales every step by the
    residual-minimising length ``rᵀAs / ‖As‖²`` (free as well): the residual then never grows,
    but convergence is usually slower.

    ``H`` is stored as ``γ I + U Wᵀ`` with ``memory`` pairs of vectors; when they are used up the
    method restarts from its iterate with the true residual ``b - A x``. The true residual is
    also recomputed when every sample's (recursively updated) residual meets its tolerance; the
    reported residual is the true one.

    Cost: one operator product and ``O(k n)`` work per step (``k`` = updates stored); memory
    ``2 B min(memory, max_steps) n`` numbers.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        memory: number of rank-one updates kept before restarting (default 30); the one
            positional argument.
        line_search: scale each step to minimise the residual along it (default ``False``:
            plain quasi-Newton steps ``s = H r``).
        max_steps: limit on the number of steps (operator products in steps), default 1000.
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).

    Raises:
        TypeError: if a setting has the wrong type (``line_search`` not a bool, ``memory`` not
            an int) or a setting other than ``memory`` is passed positionally.
        ValueError: if a setting is out of range (``memory < 1``, ``rtol < 0``, ...).

    Examples:
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([4.0, 1.0], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, b, il.linear.Broyden(10))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), bool(info.converged)
        (True, True)
    """

    name = "Broyden"

    def __init__(
        self,
        memory: int = 30,
        *,
        line_search: bool = False,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.memory = check_positive_int(memory, "memory")
        if not isinstance(line_search, bool):
            raise TypeError(
                f"line_search must be True or False, got {type(line_search).__name__} "
                f"{line_search!r}."
            )
        self.line_search = line_search

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        line_search = self.line_search
        mem = min(self.memory, self.max_steps)
        batch, n = b.shape
        eps = torch.finfo(b.dtype).eps

        def inner(
            x: Tensor, r: Tensor, beta1: Tensor, active: Tensor, loop: LinearLoop
        ) -> tuple[Tensor, Tensor]:
            tol = loop.tol
            one, zero = one_and_zero(b)
            U = torch.zeros(batch, mem, n, dtype=b.dtype, device=b.device)
            W = torch.zeros(batch, mem, n, dtype=b.dtype, device=b.device)
            gamma = torch.ones_like(beta1)
            res = beta1.clone()
            x_best, res_best = x, beta1.clone()
            used = torch.zeros(batch, dtype=torch.int64, device=b.device)
            for k in range(mem):
                # k == 0: the round starts right after a check.
                if not loop.proceed(res, done=~active, check=k > 0):
                    break
                if k == 0:
                    direction = r
                else:
                    Uk, Wk = U[:, :k], W[:, :k]
                    # H r = γ r + U (Wᵀ r)
                    direction = gamma.unsqueeze(-1) * r + torch.bmm(
                        torch.bmm(Wk, r.unsqueeze(-1)).mT, Uk
                    ).squeeze(1)
                Ad = op.mv(direction)
                AdAd = batched_dot(Ad, Ad)
                broke = AdAd <= 0  # A d = 0: d is in the null space (or zero)
                t_opt = batched_dot(r, Ad) / torch.where(AdAd > 0, AdAd, one)
                if k == 0:
                    gamma = torch.where(t_opt != 0, t_opt, one)
                    t = gamma
                    broke = broke | (t_opt == 0)
                elif line_search:
                    t = t_opt
                    broke = broke | (t_opt == 0)
                else:
                    t = torch.ones_like(t_opt)
                valid = active & ~broke
                s = t.unsqueeze(-1) * direction
                y = t.unsqueeze(-1) * Ad
                x = torch.where(valid.unsqueeze(-1), x + s, x)
                r = torch.where(valid.unsqueeze(-1), r - y, r)
                # Secant update of H with the pair (s, y = A s).
                if k == 0:
                    Hy = gamma.unsqueeze(-1) * y
                    Hts = gamma.unsqueeze(-1) * s
                else:
                    Hy = gamma.unsqueeze(-1) * y + torch.bmm(
                        torch.bmm(Wk, y.unsqueeze(-1)).mT, Uk
                    ).squeeze(1)
                    Hts = gamma.unsqueeze(-1) * s + torch.bmm(
                        torch.bmm(Uk, s.unsqueeze(-1)).mT, Wk
                    ).squeeze(1)
                sHy = batched_dot(s, Hy)
                upd = valid & (sHy.abs() > eps * torch.linalg.vector_norm(s, dim=-1)
                               * torch.linalg.vector_norm(Hy, dim=-1))
                coef = (1.0 / torch.where(upd, sHy, one)).unsqueeze(-1)
                U[:, k] = torch.where(upd.unsqueeze(-1), (s - Hy) * coef, zero)
                W[:, k] = torch.where(upd.unsqueeze(-1), Hts, zero)
                used = used + valid.long()
                res = torch.where(valid, torch.linalg.vector_norm(r, dim=-1), res)
                # Full quasi-Newton steps need not decrease the residual: keep the best iterate.
                better = res < res_best
                x_best = torch.where(better.unsqueeze(-1), x, x_best)
                res_best = torch.where(better, res, res_best)
                active = valid & (res > tol)
            return x_best, used

        return run_in_rounds(self, op, b, x0, inner)

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}) or memory (now {self.memory}), or loosen "
            "rtol/atol; GMRES usually needs fewer operator products, and Dense is exact for "
            "small problems."
        )
