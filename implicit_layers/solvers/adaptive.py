"""The default fixed-point solver: plain iteration, Anderson once the contraction is slow.

The rule, in one place (``docs/choosing.md``, "How to choose", describes it for users):

* **Forward.** Start with plain (Picard) iteration: one map evaluation per step and nothing
  else. Every ``window`` steps measure the contraction factor ``ρ``, the geometric mean of the
  ratios of successive residual norms of the worst active sample. Switch to Anderson
  acceleration when ``ρ > switch_ratio`` (default 0.95: plain iteration would need more than
  ~450 steps per 10 decades there, and Anderson's Krylov-like mixing pays for its extra work per
  step), when plain iteration at the observed rate would not reach the tolerance within what
  is left of ``max_steps``, or at once when some residual grows (a map that is not
  contractive, where plain iteration diverges). The switch restarts from the best iterate seen.
* **Backward.** When the forward finished with plain iteration, the adjoint system
  ``(I - J)ᵀ u = g`` contracts with the same factor (the spectrum of ``Jᵀ`` is that of ``J``),
  so the Neumann series solves it with about ``log(rtol) / log ρ`` products and no
  orthogonalisation. It gets twice that budget; samples it leaves unconverged are finished by
  GMRES started from the Neumann iterate (never silently). After a switch to Anderson the
  backward is GMRES.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._config import check_positive_int, check_tolerance
from .._info import NonFiniteError, OnFailure, SolveInfo
from .._problem import Problem
from ..linear._base import LinearSolver
from ..linear._operator import LinearOperator
from ..linear.gmres import GMRES
from ..linear.neumann import Neumann
from ._base import ForwardSolver, Monitor

__all__ = ["Adaptive"]


class Adaptive(ForwardSolver):
    """Picard iteration that switches to Anderson acceleration when the contraction is slow,
    and picks the backward from the contraction it observed (the default of
    :func:`~implicit_layers.fixed_point` and :class:`~implicit_layers.nn.DEQ`).

    Forward: plain iteration ``z ← f(z)`` (``z ← z - F(z)`` for roots) while the observed
    contraction factor ``ρ`` (geometric mean over ``window`` steps of the ratio of successive
    residual norms, worst active sample) stays at most ``switch_ratio`` and predicts convergence
    within ``max_steps``; then Anderson acceleration with ``memory`` iterates, from the best
    iterate so far. A residual that grows switches at once (a map that is not contractive).
    Both phases share one convergence monitor and the ``max_steps`` budget.

    Backward (when the backward mode has no linear solver of its own): Neumann series when the
    forward stayed with plain iteration, with about ``2 log(rtol) / log ρ`` terms, finished by
    GMRES from the Neumann iterate for samples it leaves unconverged; GMRES after a switch.

    The returned :class:`~implicit_layers.SolveInfo` has ``contraction``: per sample, the
    observed ``ρ`` of the plain iteration (``(residual / initial residual)^(1/steps)``), or the
    ``ρ`` that triggered the switch to Anderson, for every sample, after a switch.

    Args:
        switch_ratio: contraction factor above which plain iteration gives way to Anderson, in
            ``(0, 1]`` (default 0.95).
        memory: Anderson's history length after a switch (default 5).
        window: steps over which ``ρ`` is measured (default 4).
        rtol, atol, max_steps, check_every, on_failure: see :class:`ForwardSolver`.

    Example:
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> z, info = il.fixed_point(lambda z: torch.tanh(W @ z + 1), torch.zeros(3, dtype=torch.float64),
        ...                          solver=il.solvers.Adaptive(), return_info=True)
        >>> info.solver, float(info.contraction) < 0.5
        ('Adaptive (Picard)', True)
    """

    name = "Adaptive"
    kinds = ("fixed_point", "root")

    def __init__(
        self,
        switch_ratio: float = 0.95,
        *,
        memory: int = 5,
        window: int = 4,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every,
            on_failure=on_failure,
        )
        self.switch_ratio = check_tolerance(switch_ratio, "switch_ratio", allow_none=False)
        if not 0 < self.switch_ratio <= 1:
            raise ValueError(
                f"switch_ratio must lie in (0, 1], got {switch_ratio}; 1 keeps plain iteration "
                "unless a residual grows."
            )
        self.memory = check_positive_int(memory, "memory")
        self.window = check_positive_int(window, "window")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        plain = problem.kind == "fixed_point"
        z = z0
        if plain:
            fz = problem.fixed_point_map(z)
            r = z - fz
        else:
            fz = z
            r = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, r)
        res0 = mon.res
        ref_res, ref_k = mon.res, 0
        k = 0  # plain steps taken
        switched_at: float | None = None
        xs: list[Tensor] = []
        rs: list[Tensor] = []
        for _ in range(self.max_steps):
            if mon.stop():
                break
            if switched_at is None and (mon.k - 1) % mon.check_every == 0 and k > ref_k:
                # Synchronised just now anyway: one more look at the residual norms.
                span = k - ref_k
                ratio = torch.where(
                    mon.done, 0.0, mon.res / ref_res.clamp_min(torch.finfo(z.dtype).tiny)
                )
                # Steps plain iteration would still need at the observed rate, per sample.
                need = torch.log(mon.tol / mon.res) / torch.log(ratio) * span
                worst, needed = torch.stack([ratio.max(), need.max()]).tolist()
                if worst > 1.0 or span >= self.window:
                    rho = worst ** (1.0 / span)
                    slow = rho > self.switch_ratio or needed > self.max_steps - k
                    if worst > 1.0 or slow:
                        switched_at = rho
                        # Restart from the best iterate: after growth the current one is worse.
                        if mon.best_z is not z:
                            z = mon.best_z
                            r = problem.residual(z, create_graph=differentiable)
                    ref_res, ref_k = mon.res, k
            active = mon.active
            if switched_at is None:
                new = fz if plain else z - r
                k += 1
            else:
                new = self._anderson_step(z, r, xs, rs)
            z = new if mon.all_active else torch.where(active.unsqueeze(-1), new, z)
            if plain and switched_at is None:
                fz = problem.fixed_point_map(z)
                r = z - fz
            else:
                r = problem.residual(z, create_graph=differentiable)
            mon.record(z, r, active)
        z, info = mon.finish()
        if switched_at is None:
            info.solver = "Adaptive (Picard)"
            steps = info.steps.clamp_min(1).to(info.residual.dtype)
            ratio = info.residual / res0.clamp_min(torch.finfo(z.dtype).tiny)
            info.contraction = torch.where(info.steps > 0, ratio ** (1 / steps), 0.0)
        else:
            info.solver = "Adaptive (Picard, then Anderson)"
            info.contraction = torch.full_like(info.residual, switched_at)
        return z, info

    def _anderson_step(self, z: Tensor, r: Tensor, xs: list[Tensor], rs: list[Tensor]) -> Tensor:
        """One Anderson (type II, mixing 1) step from the history plus ``(z, r)``: the mixing
        weights minimise ``‖Σ α_i r_i‖`` subject to ``Σ α_i = 1``, per sample."""
        xs.append(z)
        rs.append(r)
        if len(xs) > self.memory:
            xs.pop(0)
            rs.pop(0)
        if len(xs) == 1:
            return z - r
        X, R = torch.stack(xs, dim=1), torch.stack(rs, dim=1)
        tiny = torch.finfo(z.dtype).tiny
        # The weights do not depend on the scale of the residuals: normalising keeps the Gram
        # matrix away from under- and overflow.
        Rn = R / R.detach().abs().amax(dim=(-2, -1)).clamp_min(tiny)[:, None, None]
        H = torch.bmm(Rn, Rn.mT)
        m = H.shape[-1]
        diag = H.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(tiny)
        reg = 100 * torch.finfo(z.dtype).eps
        H = H + (reg * diag)[:, None, None] * torch.eye(m, dtype=z.dtype, device=z.device)
        ones = torch.ones(z.shape[0], m, 1, dtype=z.dtype, device=z.device)
        w = torch.linalg.solve_ex(H, ones, check_errors=False)[0].squeeze(-1)
        alpha = (w / w.sum(-1, keepdim=True)).unsqueeze(1)
        return torch.bmm(alpha, X - R).squeeze(1)

    def adjoint_solver(self, info: SolveInfo | None) -> LinearSolver | None:
        """The linear solver of the adjoint system chosen from what the forward observed
        (``None``: no observation, the caller's default applies)."""
        rho_t = getattr(info, "contraction", None)
        if rho_t is None or rho_t.numel() == 0:
            return None
        rho = float(rho_t.max())
        if not rho <= self.switch_ratio or info is None or info.solver.endswith("Anderson"):
            return GMRES()
        return NeumannThenGMRES(_neumann_terms(rho, self.resolved_rtol(info.residual.dtype)))


def _neumann_terms(rho: float, rtol: float) -> int:
    """Twice the terms a series contracting by ``rho`` needs to gain ``rtol``, plus slack for
    the transient."""
    if rho <= 0.0:
        return 10
    return 2 * math.ceil(math.log(max(rtol, 1e-300)) / math.log(min(rho, 1 - 1e-12))) + 10


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
    """

    name = "Neumann+GMRES"

    def __init__(
        self,
        terms: int = 100,
        *,
        restart: int = 20,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(
            rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every,
            on_failure=on_failure,
        )
        self.terms = check_positive_int(terms, "terms")
        self.restart = check_positive_int(restart, "restart")

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        common = dict(rtol=self.rtol, atol=self.atol, check_every=self.check_every)
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
