"""Broyden's ("good") quasi-Newton method with a limited-memory inverse Jacobian."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_positive_int
from .._info import OnFailure, SolveInfo
from .._problem import FixedPointProblem, Problem, RootProblem
from ._base import ForwardSolver, Monitor, _norm

__all__ = ["Broyden"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _secant_scale(s: Tensor, y: Tensor, fallback: Tensor) -> Tensor:
    """Per sample ``sᵀy / yᵀy`` (a scalar inverse Jacobian along the secant pair), shape
    ``(B, 1)``, or ``fallback`` where the pair is degenerate."""
    yy = _dot(y, y).unsqueeze(-1)
    bb = _dot(s, y).unsqueeze(-1) / yy.clamp_min(torch.finfo(y.dtype).tiny)
    return torch.where((yy > 0) & torch.isfinite(bb) & (bb != 0), bb, fallback)


class InverseEstimate:
    """A per-sample inverse-Jacobian estimate ``H = γ I + Uᵀ V`` (``Σ_i u_i v_iᵀ``), detached.

    Args:
        U, V: the rank-one factors ``u_i``, ``v_i``, ``(B, k, n)``.
        gamma: the scale of the initial estimate, ``(B, 1)``.
    """

    def __init__(self, U: Tensor, V: Tensor, gamma: Tensor) -> None:
        self.U, self.V, self.gamma = U.detach(), V.detach(), gamma.detach()

    def apply(self, x: Tensor, transpose: bool) -> Tensor | None:
        """``Hᵀ x`` (``transpose``) or ``H x`` for ``x`` of shape ``(B, n)``, with zero for
        a sample whose product is not finite; ``None`` if ``x`` does not fit the factors
        (another batch size, dtype or device)."""
        U, V = self.U, self.V
        if x.shape != (U.shape[0], U.shape[2]) or x.dtype != U.dtype or x.device != U.device:
            return None
        first, second = (U, V) if transpose else (V, U)
        # row-vector products, as in the solver (Hᵀ x = γ x + Vᵀ (U x), H x = γ x + Uᵀ (V x))
        hx = torch.addcmul(((x.unsqueeze(1) @ first.mT) @ second).squeeze(1), self.gamma, x)
        finite = torch.isfinite(hx).all(-1, keepdim=True)
        return torch.where(finite, hx, torch.zeros_like(hx))


class Broyden(ForwardSolver):
    """Good Broyden's method on ``F(z) = 0``, per sample.

    Keeps an inverse-Jacobian estimate ``H = γ I + Σ u_i v_iᵀ`` and tries the step
    ``z ← z - t H F(z)``. ``γ`` starts at 1 (exact for a fixed point with ``f`` constant) and is
    rescaled after the first step to ``sᵀy / yᵀy`` of the first secant pair, which also finds
    its sign: ``F(z) = f(z) - z`` (``∂F/∂z ≈ -I``) and ``z - f(z)`` are solved alike.
    At most ``memory`` rank-one factors are kept: when they are all used the estimate restarts
    from ``γ I``, so memory stays at ``2 · memory · B · n`` however many steps are taken. An
    update whose denominator ``sᵀ H y`` is below ``sqrt(eps) ‖s‖ ‖H y‖`` is skipped for that
    sample.

    Globalisation, per sample: a trial step that increases ``‖F‖`` (or overflows) is rejected;
    the sample stays where it was, its estimate still learns from the trial's secant pair, and
    the next trial is half as long. After 6 rejections in a row the sample's estimate restarts
    from ``γ I`` with ``γ`` from its last secant pair. One evaluation of ``F`` per step, trial
    or not; ``steps`` counts them.

    Reuse in the backward (opt-in, ``warm_start_backward=True``): inside a layer whose implicit
    backward will run, the final estimate ``H ≈ (∂F/∂z)⁻¹`` is kept (``2 · memory · B · n``
    numbers, until the layer's autograd graph is freed) and ``Hᵀ g`` starts the adjoint solve
    ``(∂F/∂z)ᵀ u = g`` (``H v`` a non-transposed one), as in SHINE (Ramzi et al., 2022), scaled
    per sample to the least residual so that it never starts worse than zero (one extra
    product). The linear solver then iterates to its usual tolerance, so the gradient is as
    accurate as without it. Off by default: ``H`` is accurate only along the forward's secant
    directions, and on the DEQ benchmarks ``Hᵀ g`` starts no closer than ``g`` itself: one
    product saved of ~20 at best, four more on the hardest case (``docs/benchmarks.md``,
    "Forward reuse"). Nothing is kept under ``no_grad`` or ``inference_mode``.

    Used as ``solver=`` of :func:`~implicit_layers.root`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        memory: number of rank-one updates kept before a restart (default 30); the one
            positional argument.
        max_steps: limit on the number of evaluations of ``F`` (default 500).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).
        warm_start_backward: keep the final estimate as the implicit backward's initial guess
            (default ``False``: nothing is kept and the backward starts from zero).

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``memory`` is
            passed positionally.
        ValueError: if a setting is out of range (``memory < 1``, ``rtol < 0``, ...).

    Examples:
        >>> c = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> z = il.root(lambda z, c: z**3 + z - c, torch.zeros(2, dtype=torch.float64), c,
        ...             solver=il.solvers.Broyden(10))
        >>> torch.allclose(z**3 + z, c)
        True
    """

    name = "Broyden"
    problems = (FixedPointProblem, RootProblem)

    def __init__(
        self,
        memory: int = 30,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
        warm_start_backward: bool = False,
    ) -> None:
        super().__init__(
            rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every,
            on_failure=on_failure,
        )
        self.memory = check_positive_int(memory, "memory")
        if not isinstance(warm_start_backward, bool):
            raise TypeError(
                f"warm_start_backward must be True or False, got {warm_start_backward!r}."
            )
        self.warm_start_backward = warm_start_backward

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        z = z0
        r = problem.residual(z, create_graph=differentiable)
        mon = Monitor(self, problem, z, r)
        B, n = z.shape
        us: list[Tensor] = []
        vs: list[Tensor] = []
        # Without autograd the factors live in preallocated (B, memory, n) buffers, filled in
        # order and reset on restart: no re-stacking of the history at every product. Unrolled
        # (differentiable) solves keep lists, since autograd forbids overwriting saved tensors.
        buffered = not differentiable
        if buffered:
            Ubuf = z.new_empty(B, self.memory, n)
            Vbuf = z.new_empty(B, self.memory, n)
        # Per sample: the initial estimate H0 = gamma I (gamma = 1, exact for a fixed point of
        # a constant map, until a restart rescales it) and the length t of the next trial step.
        gamma = z.new_ones(B, 1)
        t = z.new_ones(B, 1)
        rnorm = _norm(r)

        def factors() -> tuple[Tensor, Tensor]:
            if buffered:
                return Ubuf[:, : len(us)], Vbuf[:, : len(us)]
            return torch.stack(us, 1), torch.stack(vs, 1)

        # Products with the history as row vectors, (B, 1, n) @ (B, n, k) and (B, 1, k) @
        # (B, k, n): several times faster on the CPU than the column form (B, k, n) @ (B, n, 1).
        def apply_h(x: Tensor) -> Tensor:  # H x = gamma x + Uᵀ (V x)
            if not us:
                return gamma * x
            U, V = factors()
            row = x.unsqueeze(1)
            return torch.addcmul(((row @ V.mT) @ U).squeeze(1), gamma, x)

        def apply_ht(x: Tensor) -> Tensor:  # Hᵀ x = gamma x + Vᵀ (U x)
            if not us:
                return gamma * x
            U, V = factors()
            row = x.unsqueeze(1)
            return torch.addcmul(((row @ U.mT) @ V).squeeze(1), gamma, x)

        # An update whose denominator sᵀHy is tiny relative to ‖s‖‖Hy‖ carries no reliable
        # curvature information and would blow up the estimate: it is skipped (per sample).
        guard = torch.finfo(z.dtype).eps ** 0.5
        # Globalisation: a trial step z + t d (d = -H F(z)) is accepted only if it does not
        # increase ‖F‖. A rejected trial still gives a valid secant pair at z, so it updates H
        # (the estimate learns, e.g., that ∂F/∂z ≈ -I where H0 = I points the wrong way) and
        # the sample retries from z with a halved t: no extra synchronisation, one evaluation
        # of F per step as before. After `max_halvings` rejections in a row the sample's
        # estimate restarts from gamma I with the scale (and sign) of the last secant pair.
        max_halvings = 6
        rejections = torch.zeros(B, dtype=torch.int64, device=z.device)
        Hr = apply_h(r)
        first = True
        shortened = False  # whether some sample's t may be below 1
        step = 0
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            mask = active.unsqueeze(-1)
            step_dir = -t * Hr if shortened else -Hr
            s = step_dir if mon.all_active else torch.where(mask, step_dir, torch.zeros_like(r))
            z_trial = z + s
            r_trial = problem.residual(z_trial, create_graph=differentiable)
            trial_norm = _norm(r_trial)
            finite = torch.isfinite(trial_norm)
            accept = active & finite & (trial_norm <= rnorm)
            # On the CPU (a check every step) one synchronisation finds the usual case, every
            # sample accepting its step, and skips the masked updates below.
            easy = mon.check_every == 1 and bool(accept.all())
            if not easy:
                # A non-finite trial (overflow far from z) teaches nothing: no update.
                fin = finite.unsqueeze(-1)
                r_trial = torch.where(fin, r_trial, r)
                s = torch.where(fin, s, torch.zeros_like(s))
            if first:
                # Scale H0 = gamma I by the first secant pair (sᵀy / yᵀy, as L-BFGS scales its
                # initial Hessian): this gets the sign right when ∂F/∂z ≈ -I (F(z) = f(z) - z
                # rather than z - f(z)), where H0 = I steps away from the root.
                first = False
                gamma = torch.where(finite.unsqueeze(-1), _secant_scale(s, r_trial - r, gamma), gamma)
                Hr = gamma * r
            if len(us) == self.memory:
                # Restart from H = gamma I when the memory is full. Dropping only the oldest
                # update would leave the others, each built on the estimate that included it,
                # inconsistent; on a slowly contracting map that made the iteration diverge.
                us.clear()
                vs.clear()
                h = gamma * r_trial
                Hr = gamma * r
            else:
                h = apply_h(r_trial)
            # H y = H r_trial - H r reuses H r from the step.
            Hy = h - Hr
            denom = _dot(s, Hy)
            scale = torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(Hy, dim=-1)
            ok = active & finite & (denom.abs() > guard * scale) & (scale > 0)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok.unsqueeze(-1), (s - Hy) / safe.unsqueeze(-1), torch.zeros_like(s))
            v = apply_ht(s)
            if buffered:
                Ubuf[:, len(us)] = u
                Vbuf[:, len(us)] = v
            us.append(u)
            vs.append(v)
            if easy:
                # The updated estimate H + u vᵀ applied to the new residual, for the next step.
                Hr = h + u * _dot(v, r_trial).unsqueeze(-1)
                z, r, rnorm = z_trial, r_trial, trial_norm
                if shortened:
                    t = torch.ones_like(t)
                    shortened = False
                rejections.zero_()
                mon.record(z, r, active)
                continue
            acc = accept.unsqueeze(-1)
            r_next = torch.where(acc, r_trial, r)
            Hr = torch.where(acc, h, Hr) + u * _dot(v, r_next).unsqueeze(-1)
            y = r_trial - r
            z = torch.where(acc, z_trial, z)
            r = r_next
            rnorm = torch.where(accept, trial_norm, rnorm)
            rejections = torch.where(accept | ~active, 0, rejections + 1)
            t = torch.where(acc, torch.ones_like(t), 0.5 * t)
            shortened = True
            restart = (rejections >= max_halvings).unsqueeze(-1)
            step += 1
            # Whether any sample must restart is asked only as often as the monitor
            # synchronises (every step on the CPU); meanwhile such a sample keeps halving t.
            if step % mon.check_every == 0 and bool(restart.any()):
                keep = (~restart).to(z.dtype)
                gamma = torch.where(restart, _secant_scale(s, y, gamma), gamma)
                if buffered:
                    Ubuf[:, : len(us)] *= keep.unsqueeze(-1)
                else:
                    us[:] = [uu * keep for uu in us]
                t = torch.where(restart, torch.ones_like(t), t)
                rejections = torch.where(restart.squeeze(-1), 0, rejections)
                Hr = torch.where(restart, gamma * r, Hr)
            mon.record(z, r, active)
        if buffered and us and self.warm_start_backward and self.adjoint_state_wanted():
            # The estimate at the last iterate, for the backward's initial guess: views of the
            # buffers (kept whole, B x memory x n x 2 numbers), never written again.
            k = len(us)
            self.keep_for_adjoint(InverseEstimate(Ubuf[:, :k], Vbuf[:, :k], gamma))
        return mon.finish()

    def adjoint_guess(self, state: object, rhs: Tensor, transpose: bool) -> Tensor | None:
        """``Hᵀ rhs`` (``transpose``) or ``H rhs``: the forward's inverse-Jacobian estimate
        ``H ≈ (∂F/∂z)⁻¹`` applied to the right-hand side (the warm start of SHINE, Ramzi et
        al. 2022, refined by the backward's linear solver to its tolerance)."""
        if not isinstance(state, InverseEstimate):
            return None
        return state.apply(rhs, transpose)
