"""A batched primal-dual interior-point method (Mehrotra predictor-corrector) for convex QPs.

Solves, for every sample of a batch at once,

    min ½ zᵀQz + qᵀz   s.t.   Gz + s = h,  s ≥ 0,   Az = b

in the slack form. Each iteration eliminates ``s`` and ``λ`` to the reduced system

    [Q + Gᵀ diag(λ/s) G + δI    Aᵀ ] [dz]   [r₁]
    [A                         -εI ] [dν] = [r₂]

and solves it by one batched Cholesky factorisation of the ``(n, n)`` block and one of the
``(p, p)`` Schur complement ``A H⁻¹ Aᵀ + εI``, shared by the predictor and the corrector.
The regularisation ``δ, ε > 0`` keeps both factorisations defined for LPs (``Q = 0``), a
singular ``Q`` and rank-deficient or duplicated constraints; it only changes the Newton
direction, never the residuals the iteration drives to zero, so the limit is the exact
solution. For the same reason the first iterations on the CPU, far from the solution, form and
factorise the reduced matrix in float32 (see ``_SINGLE_ABOVE``): their directions are inexact,
their residuals are not.

Samples stop independently: a sample that converged (or was found infeasible) keeps its
iterate while the others go on. Convergence and the infeasibility certificates are checked
every ``check_every`` iterations with one host synchronisation. On the CPU, where asking the
device costs nothing, the samples that stopped also leave the working batch at each check, so
the later iterations factorise only the samples still running.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ._linalg import (
    bmtv,
    bmv,
    cholesky,
    cholesky_or_identity,
    cholesky_solve,
    inf_norm,
    matrix_scale,
    normal_matrix,
    weighted_gram,
)

__all__ = ["IPMResult", "interior_point", "polish", "solve_scales", "SOLVED", "PRIMAL_INFEASIBLE",
           "DUAL_INFEASIBLE", "MAX_STEPS", "INACCURATE", "STATUS_NAMES", "inaccurate_hint"]

# Per-sample status codes (see QPInfo.status).
SOLVED = 0
PRIMAL_INFEASIBLE = 1
DUAL_INFEASIBLE = 2
MAX_STEPS = 3
# An answer the interior point called solved that fails the check in the original units
# (data of very different scales: see _scaling.py).
INACCURATE = 4
STATUS_NAMES = ("solved", "primal infeasible", "dual infeasible", "max steps", "inaccurate")


def inaccurate_hint(codes: list[int]) -> str:
    """The advice for samples whose answer failed the check in the original units (status
    ``INACCURATE`` among ``codes``), or an empty string."""
    if INACCURATE not in codes:
        return ""
    return (" 'inaccurate' means the answer fails the check made in the original units for data "
            "of very different scales (a free variable inside bounds far below the cost's scale, "
            "variables of very different orders): more steps do not help; the troubleshooting "
            "guide, 'Data of very different scales', says which data this happens for and what "
            "helps.")

_STEP_FRACTION = 0.99  # fraction of the distance to the boundary s, λ ≥ 0 taken per step
_STRICT = 1e-3  # a sample stops at tol * _STRICT, or below tol once it stalls
_STALL = 3  # iterations without halving the residual that count as a stall below tol
_GIVE_UP = 12  # iterations without halving the residual after which a sample stops anyway
# The active-set polish is tried on samples whose residual is below _POLISH_FROM * tol (and at most
# _POLISH_BELOW): with the indicator guess (see interior_point) it usually succeeds from a residual
# of 1e-2 on, two iterations before the test λᵢ > sᵢ names the active set.
_POLISH_FROM = 1e7
_POLISH_BELOW = 1e-2
# On the CPU, iterations at which every running sample's residual is above _SINGLE_ABOVE form and
# factorise the reduced matrix in float32 (about twice as fast); far from the solution an inexact
# Newton direction costs no iterations (the residuals stay float64), and near it the matrix is too
# ill-conditioned for float32. A sample whose pivots span more than _SINGLE_PIVOTS is redone in float64.
# Only batches whose GᵀWG product has at least _SINGLE_WORK multiply-adds (B n² m) do so: below,
# the conversions and checks cost more than the faster product saves.
_SINGLE_ABOVE = 1e-3
_SINGLE_PIVOTS = 1e-4
_SINGLE_WORK = 2**21
_ROUNDING = 1e-14  # relative residual at which the polish's refinement stops early (CPU)


@dataclass
class IPMResult:
    """The iterate of a batched solve, shapes ``(B, n)``, ``(B, m)``, ``(B, p)``, ``(B,)``."""

    z: Tensor
    lam: Tensor
    nu: Tensor
    s: Tensor
    status: Tensor
    steps: Tensor
    residual: Tensor
    tolerance: Tensor
    # The Cholesky factor of the polish that ended each sample ``(B, n, n)``, its guessed active
    # set ``(B, m)`` and which samples have one ``(B,)`` (see ``ReducedKKT``), or ``None``.
    polish_factor: tuple[Tensor, Tensor, Tensor] | None = None


class _Reduced:
    """The factorised reduced system of one iteration (Cholesky of H and of the Schur complement).

    ``H = Q + δI + Gᵀ diag(w) G`` is :func:`weighted_gram` with ``δ`` added to its diagonal in
    place. With equalities, ``Y = L⁻¹Aᵀ``
    is formed once here (one triangular solve with ``p`` columns), so that each solve below
    costs two triangular solves with ``L`` and one ``(p, p)`` Cholesky solve.
    """

    def __init__(self, Q: Tensor, delta: Tensor, G: Tensor, A: Tensor, w: Tensor, eps: Tensor) -> None:
        self.dtype = w.dtype  # of the right-hand sides and solutions; the factors are in Q's
        w = w.to(Q.dtype)
        H = weighted_gram(Q, G, w)
        # δI added in place: a regularised copy of Q kept for the whole solve would add to the
        # memory each call takes from the system (page faults, measured 5-10 % of the time).
        H.diagonal(dim1=-2, dim2=-1).add_(delta[:, None].to(H.dtype))
        h_diag = H.diagonal(dim1=-2, dim2=-1).clone()  # for the fallback below (H is overwritten)
        L, info = cholesky(H)
        # A sample whose H is not numerically positive definite (a diverging, infeasible iterate)
        # takes a diagonally scaled step instead of a Newton step; the others are untouched. On
        # an accelerator this is decided without a host synchronisation; on the CPU, where
        # asking costs nothing, the masked replacement is skipped when no sample needs it.
        if L.device.type != "cpu" or bool(info.any()):
            bad = (info != 0)[:, None, None]
            jacobi = torch.diag_embed(h_diag.abs().clamp(min=1.0).sqrt())
            L = torch.where(bad, jacobi, L)
        self.L = L
        self.p = A.shape[-2]
        if self.p:
            self.Y = torch.linalg.solve_triangular(L, A.mT, upper=False)  # L⁻¹ Aᵀ, (B, n, p)
            S = self.Y.mT @ self.Y
            S.diagonal(dim1=-2, dim2=-1).add_(eps[:, None].to(S.dtype))
            self.LS, info_s = torch.linalg.cholesky_ex(S)
            info = info | info_s
        self.failed = info != 0

    def well_conditioned(self, ratio: float) -> Tensor:
        """Per sample ``(B,)``: whether its factorisations succeeded with squared pivots within
        ``ratio`` of each other."""
        d = self.L.diagonal(dim1=-2, dim2=-1)
        ok = ~self.failed & (d.amin(-1) ** 2 >= ratio * d.amax(-1) ** 2)
        if self.p:
            ds = self.LS.diagonal(dim1=-2, dim2=-1)
            ok = ok & (ds.amin(-1) ** 2 >= ratio * ds.amax(-1) ** 2)
        return ok

    def solve(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        factors = self.L.dtype
        if factors != self.dtype:
            dz, dnu = self._solve(r1.to(factors), r2.to(factors))
            return dz.to(self.dtype), dnu.to(self.dtype)
        return self._solve(r1, r2)

    def _solve(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        if not self.p:
            x = cholesky_solve(r1.unsqueeze(-1), self.L).squeeze(-1)
            return x, r1.new_zeros(r1.shape[:-1] + (0,))
        # H dz + Aᵀ dν = r₁, A dz - ε dν = r₂ with u = L⁻¹ r₁:  (YᵀY + εI) dν = Yᵀu - r₂,
        # then dz = L⁻ᵀ (u - Y dν).
        u = torch.linalg.solve_triangular(self.L, r1.unsqueeze(-1), upper=False)
        dnu = torch.cholesky_solve(self.Y.mT @ u - r2.unsqueeze(-1), self.LS)
        dz = torch.linalg.solve_triangular(self.L.mT, u - self.Y @ dnu, upper=True)
        return dz.squeeze(-1), dnu.squeeze(-1)


class _Patched:
    """A float32 factorisation whose few samples that failed the pivot check (``rows``) are solved
    by their own float64 one (``fix``) instead."""

    def __init__(self, base: _Reduced, rows: Tensor, fix: _Reduced) -> None:
        self.base, self.rows, self.fix = base, rows, fix

    def solve(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        dz, dnu = self.base.solve(r1, r2)
        fz, fnu = self.fix.solve(r1[self.rows], r2[self.rows])
        return dz.index_copy(0, self.rows, fz), dnu.index_copy(0, self.rows, fnu)


_Factor = _Reduced | _Patched


def _factorise(
    Q: Tensor, delta: Tensor, G: Tensor, A: Tensor, w: Tensor, eps: Tensor,
    single: tuple[Tensor, Tensor, Tensor] | None,
) -> _Factor:
    """The iteration's factorisation: from ``single``, float32 copies of ``(Q, G, A)``, when
    given and its pivots pass the check, else in float64. When only a few samples fail the
    check (at most a quarter), only those are factorised again in float64."""
    if single is not None:
        red = _Reduced(single[0], delta, single[1], single[2], w, eps)
        ok = red.well_conditioned(_SINGLE_PIVOTS)
        if bool(ok.all()):
            return red
        bad = (~ok).nonzero().squeeze(1)
        if 4 * bad.shape[0] <= ok.shape[0]:
            return _Patched(red, bad, _Reduced(Q[bad], delta[bad], G[bad], A[bad], w[bad], eps[bad]))
        del red  # freed before the float64 factorisation (memory, as above)
    return _Reduced(Q, delta, G, A, w, eps)


def _direction(
    red: _Factor, G: Tensor, w: Tensor, lam: Tensor, s: Tensor,
    rd: Tensor, rpi: Tensor, rpe: Tensor, rc: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Newton direction ``(dz, dλ, dν, ds)`` for the complementarity target ``rc``, and ``G dz``.

    ``s`` and ``λ`` are eliminated: ``dλ = W G dz + S⁻¹(Λ rpi - rc)``, ``ds = -rpi - G dz``.
    """
    corr = (lam * rpi - rc) / s
    dz, dnu = red.solve(-rd - bmtv(G, corr), -rpe)
    Gdz = bmv(G, dz)
    return dz, torch.addcmul(corr, w, Gdz), dnu, -rpi - Gdz, Gdz


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest α ≤ 1 with v + α dv ≥ 0, per sample (v > 0)."""
    if v.shape[-1] == 0:
        return v.new_ones(v.shape[:-1])
    # α = 1 / max(1, maxᵢ -dvᵢ/vᵢ): one quotient and one reduction over the rows instead of a
    # masked quotient (the rows with dvᵢ ≥ 0 cannot bring the maximum above 0). v is clamped
    # away from 0 so that a 0/0 never makes α NaN.
    worst = (dv / v.clamp(min=torch.finfo(v.dtype).tiny)).amin(dim=-1)
    return worst.neg().clamp(min=1.0).reciprocal()


def interior_point(
    Q: Tensor,
    q: Tensor,
    G: Tensor,
    h: Tensor,
    A: Tensor,
    b: Tensor,
    *,
    tol: float,
    max_steps: int,
    check_every: int,
    warm: tuple[Tensor, Tensor, Tensor] | None = None,
) -> IPMResult:
    """Solve a batch of QPs; every input carries the batch dimension ``B``.

    Args:
        Q: ``(B, n, n)`` positive semidefinite.
        q: ``(B, n)``.
        G: ``(B, m, n)``; h: ``(B, m)``.
        A: ``(B, p, n)``; b: ``(B, p)``.
        tol: relative tolerance on the KKT residuals and the duality measure.
        max_steps: iteration limit.
        check_every: iterations between the convergence checks (host synchronisations).
        warm: an initial ``(z, λ, ν)`` (shapes ``(B, n)``, ``(B, m)``, ``(B, p)``), or ``None``.

    Returns:
        The final iterate with per-sample status, step counts and KKT residuals.
    """
    B, n = q.shape
    m, p = h.shape[-1], b.shape[-1]
    dtype, device = q.dtype, q.device
    tiny = torch.finfo(dtype).tiny

    q_scale, h_scale, delta = solve_scales(Q, q, G, h, A, b)
    eps = delta
    # G is used as given (row-major): every product takes it in that layout, and a transposed
    # copy would add its memory to what each call takes from the system (page faults).
    single = (Q.float(), G.float(), A.float()) if (
        device.type == "cpu" and dtype == torch.float64 and B * n * n * m >= _SINGLE_WORK) else None

    # Initial point: the reduced system with unit scaling (λ/s = 1), then shifted into s, λ > 0.
    # Factorised in float32 where the first iterations are (see _SINGLE_ABOVE): the start is only
    # a starting point, and the first iteration reuses the factorisation, far from the solution.
    ones_m = q.new_ones(B, m)
    unit: _Factor | None = None
    if warm is None:
        red = unit = _factorise(Q, delta, G, A, ones_m, eps, single)
        z, nu = red.solve(-q + bmtv(G, h), b)
        Gz = bmv(G, z)
        s = h - Gz
        lam = -s.clone()
    else:
        z, lam, nu = (t.to(dtype=dtype) for t in warm)
        Gz = bmv(G, z)
        s = h - Gz
    floor = 1.0 if warm is None else 1e-2
    if m:
        s = s + torch.clamp(floor - s.amin(-1, keepdim=True), min=0.0) * (s.amin(-1, keepdim=True) < floor)
        lam = lam + torch.clamp(floor - lam.amin(-1, keepdim=True), min=0.0) * (
            lam.amin(-1, keepdim=True) < floor)
    if warm is None:
        # s = λ (their geometric mean, which keeps each sᵢλᵢ) makes λ/s = 1 again, so the first
        # iteration reuses the factorisation above instead of one of its own.
        s = lam = (s * lam).sqrt()

    status = torch.full((B,), MAX_STEPS, dtype=torch.int64, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    steps = torch.zeros(B, dtype=torch.int64, device=device)

    # Gz is carried along with z (see the step below), not recomputed for every residual.
    def kkt(
        z: Tensor, lam: Tensor, nu: Tensor, s: Tensor, Gz: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rd = bmv(Q, z) + q + bmtv(G, lam) + bmtv(A, nu)
        rpi = Gz + s - h
        rpe = bmv(A, z) - b
        mu = (s * lam).sum(-1) / max(m, 1)
        return rd, rpi, rpe, mu

    best = (z, lam, nu, s)
    best_res = torch.full((B,), float("inf"), dtype=dtype, device=device)
    since_better = torch.zeros(B, dtype=torch.int64, device=device)
    # Samples that stopped leave the working batch at the next check (see _Finished), so the
    # later iterations factorise only the samples still running; `rows` maps the working
    # batch to the caller's.
    finished = _Finished(B, n, m, p, dtype, device)
    rows = torch.arange(B, device=device)
    prev_lam: Tensor | None = None  # the previous iterate's λ and s (the active-set indicator)
    prev_s: Tensor | None = None
    for it in range(max_steps + 1):
        rd, rpi, rpe, mu = kkt(z, lam, nu, s, Gz)
        # Every iteration decides per sample without a host synchronisation; the loop only
        # asks the device whether any sample is left every `check_every` iterations.
        err_d = inf_norm(rd) / q_scale
        err_p = torch.maximum(inf_norm(rpi), inf_norm(rpe)) / h_scale
        gap = mu * max(m, 1) / (q_scale * h_scale)
        res = torch.maximum(torch.maximum(err_d, err_p), gap)
        res = torch.where(torch.isfinite(res), res, float("inf"))
        # The iterate with the lowest residual is kept: far below the tolerance rounding can
        # make later steps worse, and a sample that stops at max_steps returns its best point.
        better = active & (res < best_res)
        since_better = torch.where(active & (res < 0.5 * best_res), 0, since_better + 1)
        best_res = torch.where(better, res, best_res)
        keep = better[:, None]
        best = (torch.where(keep, z, best[0]), torch.where(keep, lam, best[1]),
                torch.where(keep, nu, best[2]), torch.where(keep, s, best[3]))
        # An interior point alone reaches an accurate z only at a tiny duality measure (its
        # error along a constraint is about μ/λᵢ); it stops there, or when it stalls.
        done = active & ((res <= _STRICT * tol) | ((best_res <= tol) & (since_better >= _STALL)))
        checking = it == max_steps or (it + 1) % check_every == 0
        if single is not None and not bool(((res > _SINGLE_ABOVE) | ~active).all()):
            # The residuals only fall from here on: float64 to the end, and the float32 copies
            # are freed before this check's polish.
            single = None
        if m and checking:
            # Near the solution one equality-constrained solve on the guessed active set reaches
            # the solution to rounding (see _polish); tried at the checks on samples close enough.
            near = active & ~done & (res <= min(_POLISH_FROM * tol, _POLISH_BELOW))
            # The active set is guessed by El-Bakry and Tapia's indicator: from one iterate to the
            # next the slack of an active constraint falls faster than its multiplier
            # (λᵢ⁺/λᵢ > sᵢ⁺/sᵢ), and that of an inactive one the other way round; it names the
            # active set iterations before the test λᵢ > sᵢ does (kept as well). A polish that
            # fails gives the second guess, a primal-dual active-set step: its constraints with
            # a negative multiplier leave the set, those its point violates join it.
            guess = lam > s
            if prev_lam is not None and prev_s is not None:
                guess = guess | (lam * prev_s > s * prev_lam)
            for _attempt in range(2):
                if not bool(near.any()):
                    break
                # Only the samples near their solution are factorised (a gather, then a scatter);
                # when they are most of the working batch, the whole batch is (the others' results
                # are masked out below): the gathered copies of Q and G would be fresh memory, whose
                # page faults cost more than the few samples polished in vain.
                idx = near.nonzero().squeeze(1)
                whole = 4 * idx.shape[0] >= 3 * near.shape[0]
                if whole:
                    idx = torch.arange(near.shape[0], device=device)

                def take(t: Tensor) -> Tensor:
                    return t if whole else t[idx]  # noqa: B023 (used within the iteration only)

                out = _polish(
                    take(Q), take(q), take(G), take(h), take(A), take(b), take(z), take(lam),
                    take(nu), take(guess), take(q_scale), take(h_scale), take(delta),
                )
                factor = out[5]
                if whole:
                    pz, pl, pnu, ps, pres = out[:5]
                else:
                    pz, pl, pnu, ps = (torch.zeros_like(t).index_copy(0, idx, o)
                                       for t, o in zip((z, lam, nu, s), out[:4], strict=True))
                    pres = torch.full_like(res, float("inf")).index_copy(0, idx, out[4])
                # A polished point below the interior point's strict threshold ends the sample; one
                # only below the best residual so far is kept as its answer while the iterations go
                # on (the stall rule then returns it), so that a polish short of rounding (a badly
                # scaled problem) does not stop a sample the iterations would take further.
                better = near & (pres < best_res)
                won = near & (pres <= _STRICT * tol) & better
                t = better[:, None]
                best = (torch.where(t, pz, best[0]), torch.where(t, pl, best[1]),
                        torch.where(t, pnu, best[2]), torch.where(t, ps, best[3]))
                best_res = torch.where(better, pres, best_res)
                done = done | won
                near = near & ~won
                # The backward's KKT system at a polished solution has the polish's matrix (up to
                # its diagonal regularisation): its factor is kept for the samples it ended.
                finished.store_factor(rows[idx], factor, guess[idx], won[idx])
                # The second attempt only for the samples whose guess the first one changed.
                changed = torch.zeros_like(near).index_copy(0, idx, (out[6] != guess[idx]).any(-1))
                near = near & changed
                guess = guess.index_copy(0, idx, out[6])
        stuck = active & ~done & (since_better >= _GIVE_UP)
        status = torch.where(done, SOLVED, status)
        if checking:
            pinf, dinf = _certificates(Q, q, G, h, A, b, z, lam, nu, tol)
            pinf = active & ~done & pinf
            dinf = active & ~done & ~pinf & dinf
            status = torch.where(pinf, PRIMAL_INFEASIBLE, status)
            status = torch.where(dinf, DUAL_INFEASIBLE, status)
            done = done | pinf | dinf
        active = active & ~(done | stuck)
        if it == max_steps or (checking and not bool(active.any())):
            break
        if checking and device.type == "cpu" and not bool(active.all()):
            # Gathering the running samples costs a copy of their data, far less than the
            # iterations it saves; on an accelerator the batch keeps its shape instead, so that
            # the loop needs no synchronisation beyond the checks.
            finished.store(~active, rows, best, status, steps, best_res)
            keep = active.nonzero().squeeze(1)
            rows = rows[keep]
            Q, q, G, h, A, b = (t[keep] for t in (Q, q, G, h, A, b))
            if single is not None:
                single = (single[0][keep], single[1][keep], single[2][keep])
            q_scale, h_scale, delta, eps = (t[keep] for t in (q_scale, h_scale, delta, eps))
            rd, rpi, rpe, mu = (t[keep] for t in (rd, rpi, rpe, mu))
            z, lam, nu, s, Gz, status, steps, best_res, since_better = (
                t[keep] for t in (z, lam, nu, s, Gz, status, steps, best_res, since_better))
            best = (best[0][keep], best[1][keep], best[2][keep], best[3][keep])
            if prev_lam is not None and prev_s is not None:
                prev_lam, prev_s = prev_lam[keep], prev_s[keep]
            active = active[keep]
        steps = steps + active

        w = lam / s.clamp(min=tiny)
        if it == 0 and unit is not None and rows.shape[0] == B:
            red, unit = unit, None
        else:
            unit = None
            red = _factorise(Q, delta, G, A, w, eps, single)

        # Predictor (affine scaling), then Mehrotra's centring and second-order correction.
        sl = s * lam
        dz, dlam, dnu, ds, Gdz = _direction(red, G, w, lam, s, rd, rpi, rpe, sl)
        alpha = torch.minimum(_max_step(s, ds), _max_step(lam, dlam))
        alpha_d = alpha
        if m:
            a = alpha[:, None]
            mu_aff = (torch.addcmul(s, a, ds) * torch.addcmul(lam, a, dlam)).sum(-1) / m
            sigma = (mu_aff / mu.clamp(min=tiny)).clamp(0.0, 1.0) ** 3
            rc = torch.addcmul(sl, ds, dlam).sub_((sigma * mu)[:, None])
            dz, dlam, dnu, ds, Gdz = _direction(red, G, w, lam, s, rd, rpi, rpe, rc)
            # The primal (z, s) and dual (λ, ν) steps have lengths of their own: far from the
            # solution the multipliers of the inactive rows block the dual step at 0.7-0.8 while
            # the primal one is 0.99, and one common length would hold both back (at B = 128,
            # n = 50: 123 samples polished at iteration 5 instead of 111).
            alpha = (_STEP_FRACTION * _max_step(s, ds)).clamp(max=1.0)
            alpha_d = (_STEP_FRACTION * _max_step(lam, dlam)).clamp(max=1.0)
        # The factors are freed before the next check's polish and the next factorisation: each
        # (n, n) matrix alive at once adds to the memory a call takes from the system, and to its
        # page faults.
        del red
        step = torch.where(active, alpha, 0.0)[:, None]
        step_d = torch.where(active, alpha_d, 0.0)[:, None]
        z_new, lam_new = torch.addcmul(z, step, dz), torch.addcmul(lam, step_d, dlam)
        nu_new, s_new = torch.addcmul(nu, step_d, dnu), torch.addcmul(s, step, ds)
        # G z carried along with z by the product G dz the direction made: one product with G fewer
        # per iteration, the same value to rounding.
        Gz_new = torch.addcmul(Gz, step, Gdz)
        prev_lam, prev_s = lam, s
        # A non-finite step (a diverging sample) leaves its iterate as it was. On the CPU, where
        # asking costs nothing, one sum of everything decides first: it is finite when every
        # entry is (an overflowing sum of finite entries only takes the per-sample test below),
        # and four sums cost far less than the four per-row isfinite tests (0.02 against 0.14 ms
        # at B = 128, n = 50).
        if device.type == "cpu" and bool(torch.isfinite(
                z_new.sum() + lam_new.sum() + nu_new.sum() + s_new.sum())):
            z, lam, nu, s, Gz = z_new, lam_new, nu_new, s_new, Gz_new
        else:
            ok = torch.isfinite(z_new).all(-1) & torch.isfinite(lam_new).all(-1) & torch.isfinite(
                nu_new).all(-1) & torch.isfinite(s_new).all(-1)
            ok = ok[:, None]
            z = torch.where(ok, z_new, z)
            lam = torch.where(ok, lam_new, lam)
            nu = torch.where(ok, nu_new, nu)
            s = torch.where(ok, s_new, s)
            Gz = torch.where(ok, Gz_new, Gz)

    finished.store(torch.ones_like(active), rows, best, status, steps, best_res)
    z, lam, nu, s = finished.best
    # A sample that stalled or ran out of steps below the tolerance counts as solved.
    status = torch.where((finished.status == MAX_STEPS) & (finished.res <= tol), SOLVED, finished.status)
    return IPMResult(z=z, lam=lam, nu=nu, s=s, status=status, steps=finished.steps, residual=finished.res,
                     tolerance=tol * q.new_ones(B), polish_factor=finished.factor)


class _Finished:
    """The final values of the samples that left the working batch, in the caller's order."""

    def __init__(self, B: int, n: int, m: int, p: int, dtype: torch.dtype, device: torch.device) -> None:
        new = functools.partial(torch.zeros, dtype=dtype, device=device)
        self.best = (new(B, n), new(B, m), new(B, p), new(B, m))
        self.status = torch.full((B,), MAX_STEPS, dtype=torch.int64, device=device)
        self.steps = torch.zeros(B, dtype=torch.int64, device=device)
        self.res = torch.full((B,), float("inf"), dtype=dtype, device=device)
        # The polish factors (see IPMResult), made at the first polish that ends a sample.
        self.factor: tuple[Tensor, Tensor, Tensor] | None = None

    def store(self, leaving: Tensor, rows: Tensor, best: tuple[Tensor, Tensor, Tensor, Tensor],
              status: Tensor, steps: Tensor, res: Tensor) -> None:
        """Record the working samples flagged by ``leaving``; ``rows`` are their caller's indices."""
        sel = leaving.nonzero().squeeze(1)
        at = rows[sel]
        for out, value in zip(self.best, best, strict=True):
            out.index_copy_(0, at, value[sel])
        self.status.index_copy_(0, at, status[sel])
        self.steps.index_copy_(0, at, steps[sel])
        self.res.index_copy_(0, at, res[sel])

    def store_factor(self, at: Tensor, L: Tensor, active: Tensor, won: Tensor) -> None:
        """Record the polish factors ``L`` ``(k, n, n)`` and active sets ``(k, m)`` of the caller's
        samples ``at`` ``(k,)`` that the polish ended (``won``, ``(k,)``)."""
        if self.factor is None and at.shape[0] == self.status.shape[0]:
            # A polish of the whole call (``at`` is then every sample in order): its factors are
            # kept as they are, with the samples it did not end flagged out, instead of a gather
            # and a copy into a fresh (B, n, n) buffer (memory whose page faults cost more).
            self.factor = (L, active.clone(), won.clone())
            return
        sel = won.nonzero().squeeze(1)
        at, L, active = at[sel], L[sel], active[sel]
        if self.factor is None:
            B, n, m = self.status.shape[0], L.shape[-1], active.shape[-1]
            # Row-major matrices, as the factors of cholesky_or_identity are: the solves then take
            # them uncopied.
            self.factor = (L.new_empty(B, n, n), active.new_zeros(B, m), torch.zeros(
                B, dtype=torch.bool, device=L.device))
        self.factor[0].index_copy_(0, at, L)
        self.factor[1].index_copy_(0, at, active)
        self.factor[2][at] = True


def _certificates(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    z: Tensor, lam: Tensor, nu: Tensor, tol: float,
) -> tuple[Tensor, Tensor]:
    """Per-sample infeasibility certificates read off diverging iterates.

    Primal infeasibility (Farkas): ``y = (λ, ν)`` with ``λ ≥ 0``, ``Gᵀλ + Aᵀν ≈ 0`` and
    ``hᵀλ + bᵀν < 0``; dual infeasibility (unboundedness): ``d = z`` with ``Qd ≈ 0``,
    ``qᵀd < 0``, ``Gd ≤ 0``, ``Ad ≈ 0``. Both are tested on the normalised iterates, which
    approach such directions when the problem has no solution.
    """
    cert_tol = max(tol, 1e-6) ** 0.5 * 1e-2
    y_norm = torch.maximum(inf_norm(lam), inf_norm(nu)).clamp(min=torch.finfo(q.dtype).tiny)
    d_norm = inf_norm(z).clamp(min=torch.finfo(q.dtype).tiny)
    if q.device.type == "cpu" and not bool(((y_norm > 1.0 / cert_tol) | (d_norm > 1.0 / cert_tol)).any()):
        # Both certificates need a diverging iterate; on the CPU, where asking costs nothing,
        # the products below are skipped while no sample diverges.
        none = torch.zeros_like(y_norm, dtype=torch.bool)
        return none, none
    lam_n, nu_n = lam / y_norm[:, None], nu / y_norm[:, None]
    g_scale = 1.0 + torch.maximum(inf_norm(G.flatten(1)), inf_norm(A.flatten(1)))
    stat = inf_norm(bmtv(G, lam_n) + bmtv(A, nu_n)) / g_scale
    farkas = (h * lam_n).sum(-1) + (b * nu_n).sum(-1)
    hb_scale = 1.0 + torch.maximum(inf_norm(h), inf_norm(b))
    pinf = (y_norm > 1.0 / cert_tol) & (stat <= cert_tol) & (farkas < -cert_tol * hb_scale)

    d = z / d_norm[:, None]
    m_scale = 1.0 + torch.maximum(inf_norm(Q.flatten(1)), g_scale)
    cond_q = inf_norm(bmv(Q, d)) <= cert_tol * m_scale
    cond_g = (bmv(G, d).amax(-1) if G.shape[-2] else d_norm.new_zeros(d.shape[0])) <= cert_tol * m_scale
    cond_a = inf_norm(bmv(A, d)) <= cert_tol * m_scale
    cond_obj = (q * d).sum(-1) < -cert_tol * (1.0 + inf_norm(q))
    dinf = (d_norm > 1.0 / cert_tol) & cond_q & cond_g & cond_a & cond_obj
    return pinf, dinf


def _kkt_error(
    Q: Tensor, q: Tensor, G: Tensor, A: Tensor, z: Tensor, lam: Tensor, nu: Tensor,
    slack: Tensor, r_eq: Tensor, q_scale: Tensor, h_scale: Tensor,
) -> Tensor:
    """Relative KKT error of a primal-dual point with ``λ ≥ 0`` (stationarity, feasibility, gap),
    given its slack ``h - Gz`` and equality residual ``Az - b``."""
    rd = bmv(Q, z) + q + bmtv(G, lam) + bmtv(A, nu)
    err_d = inf_norm(rd) / q_scale
    err_p = torch.maximum(inf_norm((-slack).clamp(min=0.0)), inf_norm(r_eq)) / h_scale
    gap = inf_norm(lam * slack.clamp(min=0.0)) / (q_scale * h_scale)
    return torch.maximum(torch.maximum(err_d, err_p), gap)


def solve_scales(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The scales of the relative stopping tests, ``1 + ‖q‖`` and ``1 + max(‖h‖, ‖b‖)``, and the
    regularisation ``δ`` (1e-9 of the matrices' scale in float64, ``√eps`` of it otherwise), each
    ``(B,)``."""
    reg = torch.finfo(q.dtype).eps ** 0.5 if q.dtype != torch.float64 else 1e-9
    return (1.0 + inf_norm(q), 1.0 + torch.maximum(inf_norm(h), inf_norm(b)),
            reg * matrix_scale(Q, G, A))


def polish(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    z: Tensor, lam: Tensor, nu: Tensor, guess: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One active-set polish of the point ``(z, λ, ν)`` on the guessed active set ``guess``
    ``(B, m)`` (see :func:`_polish`), outside the interior point's loop.

    Returns:
        The polished ``(z, λ, ν, s)`` and the next guess of the active set.
    """
    q_scale, h_scale, delta = solve_scales(Q, q, G, h, A, b)
    pz, pl, pnu, ps, _, _, nxt = _polish(Q, q, G, h, A, b, z, lam, nu, guess, q_scale, h_scale,
                                         delta)
    return pz, pl, pnu, ps, nxt


def _polish(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    z: Tensor, lam: Tensor, nu: Tensor, guess: Tensor,
    q_scale: Tensor, h_scale: Tensor, delta: Tensor, refine: int = 3,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Refine samples by one equality-constrained solve on the guessed active set.

    An interior point stops at a small but positive duality measure μ, which leaves an error of
    order μ/λᵢ in ``z`` along weakly held constraints. Guessing the active set (``guess``) and
    solving the KKT system with those rows (``C``, right-hand side ``d``) as equalities, and
    ``λᵢ = 0`` for the others, gives the solution to rounding. The system is regularised,

        [Q + ρI   Cᵀ ] [dz]   [r₁]
        [C       -ρI ] [dy] = [r₂],

    solved through its Schur complement ``Q + ρI + CᵀC/ρ`` (one ``(n, n)`` Cholesky
    factorisation), and refined against the exact system, so duplicated active rows do not
    break it (the OSQP polish, batched). Each correction gains about five digits (ρ is 1e-6 of
    the data's scale): ``refine = 3`` takes a point at a residual of 1e-2, where the polish is
    first tried, to rounding; the KKT error below checks the result. The caller keeps a
    polished point only if it reaches the tolerance with a lower KKT error than the interior
    point.

    Returns:
        The polished ``(z, λ, ν, s)``, its KKT error ``(B,)``, the Cholesky factor of
        ``Q + ρI + CᵀC/ρ`` ``(B, n, n)``, which is also that of the backward's reduced KKT
        system at the polished point (``ReducedKKT``, ρ on the diagonal), and the next guess
        of the active set ``(B, m)``: the rows of ``guess`` whose multiplier came out
        positive and the others that the polished point violates.
    """
    active = guess.to(z.dtype)
    rho = 1e3 * delta[:, None]  # δ is 1e-9 of the data's scale in float64
    # A failed factorisation leaves the sample's polish to fail (its KKT error is set to inf
    # below).
    L, failed = cholesky_or_identity(normal_matrix(Q, G, active / rho, A, rho, rho))
    y_g, y_a = lam * active, nu.clone()
    # Gz and Az are carried along with z, updated by the products G dz and A dz the multipliers'
    # corrections take anyway, instead of recomputed at every residual (a product with G fewer per
    # correction, and none for the KKT error below).
    Gz, Az = bmv(G, z), bmv(A, z)
    for step in range(refine):
        # Residuals of the exact system, then the regularised correction.
        r1 = -(bmv(Q, z) + q + bmtv(G, y_g) + bmtv(A, y_a))
        r2_g = active * (h - Gz)
        r2_a = b - Az
        if step and z.device.type == "cpu" and bool((torch.maximum(
                inf_norm(r1) / q_scale, torch.maximum(inf_norm(r2_g), inf_norm(r2_a)) / h_scale)
                <= _ROUNDING).all()):
            break  # every sample refined to rounding: a further correction would change nothing
        rhs = r1 + (bmtv(G, r2_g) + bmtv(A, r2_a)) / rho
        dz = cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        Gdz, Adz = bmv(G, dz), bmv(A, dz)
        z, Gz, Az = z + dz, Gz + Gdz, Az + Adz
        y_g = y_g + active * (Gdz - r2_g) / rho
        y_a = y_a + (Adz - r2_a) / rho
    lp = y_g.clamp(min=0.0)
    slack = h - Gz
    res = _kkt_error(Q, q, G, A, z, lp, y_a, slack, Az - b, q_scale, h_scale)
    res = torch.where(torch.isfinite(res) & ~failed, res, float("inf"))
    # The next guess: a guessed row with a negative multiplier leaves, a violated row joins.
    next_guess = (guess & (y_g > 0)) | (~guess & (slack < -_ROUNDING * h_scale[:, None]))
    return z, lp, y_a, slack.clamp(min=0.0), res, L, next_guess
