"""The interior point's answer checked in the original units, and solved again on
equilibrated data where the check fails.

The interior point's stopping tests are relative to ``1 + ‖q‖`` and ``1 + ‖h‖``: they suit
data of order 1, and accept points far from the solution when the parts of the data have very
different scales (bounds of order 1e-8 with ``q`` of order 1, a row of ``G`` of order 1e-10,
a cost of order 1e-10). Every sample is solved as given first (data uniformly far below 1
divided by their largest vector norm, which is exact). A batch whose data are all near
order 1 (every factor below within ``_BAND``, 1000) is done. Otherwise the answer of each sample
that is not near order 1 is checked in the original units (``kkt_verdict``: stationarity,
feasibility and complementarity relative to the magnitudes of their own terms), and one the
check does not accept at a hundredth of the solve's tolerance is solved again in scaled units,

    z = σ D z',    rows of G and h scaled by E,    rows of A and b by F,

with ``D, E, F`` from Ruiz's equilibration of the KKT matrix ``[Q Gᵀ Aᵀ; G 0 0; A 0 0]`` (each
pass divides every row and column by the square root of its largest entry), ``σ`` the typical
bound (the median of the nonzero ``|Eh|``, ``|Fb|``, which a loose bound of another order does
not move) and ``t`` the cost's scale, so that the scaled problem

    Q' = (σ/t) DQD,  q' = Dq/t,  G' = EGD,  h' = Eh/σ,  A' = FAD,  b' = Fb/σ

has matrices and vectors of order 1 (a row whose bound is still far above the others, a loose
one, is scaled down further). Its solution gives the original one exactly:

    z = σ D z',  λ = t E λ',  ν = t F ν',  s = σ s' / E.

Every factor is a power of two, so the scaling and its inverse are exact in floating point.
The scaled answer is kept where the check accepts it (and the first answer is not closer);
where the check accepts neither, the first answer is kept (or the scaled solve's verdict of
infeasibility, or its answer where the first solve did not call its own solved), reported as
not solved (``INACCURATE``, with the check's error as its residual): a point far from the
solution never comes back as solved without a warning, and a sample the scaling does not help
(an equality whose bound is the rounding of a zero) keeps the answer it had. Last, the answer of
each sample solved twice is polished on a guessed active set (one equality-constrained solve)
and the polished point kept where the check accepts it and finds it closer: an interior point
leaves a weakly active bound (zero multiplier and zero slack at the solution) about the square
root of its duality measure off, which on bounds of 1e-9 to 1e-6 was up to 0.8 of the bound
with an error the check accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._ipm import (
    DUAL_INFEASIBLE,
    INACCURATE,
    PRIMAL_INFEASIBLE,
    SOLVED,
    IPMResult,
    interior_point,
    polish,
)
from ._linalg import bmtv, bmv, inf_norm, largest_abs

__all__ = ["Scaling", "equilibrate", "kkt_verdict", "interior_point_scaled"]

_PASSES = 10  # Ruiz passes (proxsuite's default; the factors settle within a few)
_BAND = 1e3  # a sample whose norms and scales are all within [1/_BAND, _BAND] is not scaled
_LOOSE = 16.0  # a row of G whose scaled bound is above _LOOSE is scaled down to it
_VERDICT = 1e3  # the check in the original units fails above _VERDICT * tol
_FLOOR = 1e-3  # of the solve's own units: the least scale a term is measured against
_ACCEPT = 1e-2  # an unscaled answer within _ACCEPT * tol is not compared with a scaled solve


@dataclass
class Scaling:
    """The factors of a batch's scaling: ``D`` ``(B, n)``, ``E`` ``(B, m)``, ``F`` ``(B, p)``,
    ``sigma`` and ``t`` ``(B, 1)``, and the samples it scales ``(B,)`` (the others have every
    factor 1)."""

    D: Tensor
    E: Tensor
    F: Tensor
    sigma: Tensor
    t: Tensor
    scaled: Tensor

    def apply(self, Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        """The scaled problem ``(Q', q', G', h', A', b')``."""
        D, E, F, sigma, t = self.D, self.E, self.F, self.sigma, self.t
        Dr = D.unsqueeze(-2)
        return ((sigma / t).unsqueeze(-1) * D.unsqueeze(-1) * Q * Dr, D * q / t,
                E.unsqueeze(-1) * G * Dr, E * h / sigma, F.unsqueeze(-1) * A * Dr, F * b / sigma)

    def take(self, at: Tensor) -> Scaling:
        """The scaling of the samples ``at`` ``(k,)``."""
        return Scaling(*(x[at] for x in (self.D, self.E, self.F, self.sigma, self.t, self.scaled)))

    def to_scaled(self, z: Tensor, lam: Tensor, nu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A point ``(z, λ, ν)`` in the scaled units (a warm start)."""
        return z / (self.sigma * self.D), lam / (self.t * self.E), nu / (self.t * self.F)

    def unscale(self, out: IPMResult) -> None:
        """The scaled solve's iterate in the original units, in place. Its polish factors stay
        those of the scaled KKT matrix, which the backward solves with (see ``kkt_factors``)."""
        out.z = self.sigma * self.D * out.z
        out.lam = self.t * self.E * out.lam
        out.nu = self.t * self.F * out.nu
        out.s = self.sigma * out.s / self.E

    def kkt_factors(self) -> tuple[Tensor, Tensor]:
        """``(P, R)`` ``(B, n + m + p)`` with ``F'(x') = P F(x)`` at ``x = R x'`` for the KKT
        residual ``F`` of ``_kkt.py``: the scaled KKT matrix is ``K' = P K R``, so
        ``K⁻¹ r = R K'⁻¹ (P r)`` and ``K⁻ᵀ r = P K'⁻ᵀ (R r)``."""
        m = self.E.shape[-1]
        ts = (self.t * self.sigma).expand(-1, m)
        P = torch.cat([self.D / self.t, 1.0 / ts, self.F / self.sigma], -1)
        R = torch.cat([self.sigma * self.D, self.t * self.E, self.t * self.F], -1)
        return P, R


def _pow2(x: Tensor) -> Tensor:
    """The power of two nearest to ``x > 0`` (in the logarithm)."""
    return torch.exp2(torch.round(torch.log2(x)))


def _norms(Q: Tensor, G: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The largest entry of each column of the KKT matrix (``(B, n)`` for ``z``) and of each row
    of ``G`` ``(B, m)`` and ``A`` ``(B, p)``."""
    col = torch.maximum(largest_abs(Q, -2), torch.maximum(largest_abs(G, -2), largest_abs(A, -2)))
    return col, largest_abs(G), largest_abs(A)


def _typical(h: Tensor, b: Tensor) -> Tensor:
    """The median of the nonzero ``|h|``, ``|b|`` per sample, 1 where every bound is 0: ``(B,)``."""
    v = torch.cat([h, b], -1).abs()
    if v.shape[-1] == 0:
        return v.new_ones(v.shape[:-1])
    med = torch.where(v > 0, v, float("nan")).nanmedian(-1).values
    return torch.where(torch.isnan(med), 1.0, med)


def _within(x: Tensor, band: float) -> Tensor:
    """Per sample: every entry of ``x`` ``(B, k)`` is 0 or within ``[1/band, band]``."""
    ok = (x == 0) | ((x >= 1.0 / band) & (x <= band))
    return ok.all(-1)


def equilibrate(Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> Scaling | None:
    """The scaling of each sample (see the module's docstring), or ``None`` when every sample
    is near order 1 already."""
    col, row_g, row_a = _norms(Q, G, A)
    q_max = largest_abs(Q.flatten(1))
    sigma0 = _typical(h, b)
    t0 = torch.maximum(sigma0 * q_max, inf_norm(q))
    bound = torch.maximum(inf_norm(h), inf_norm(b))
    plain = (_within(col, _BAND) & _within(row_g, _BAND) & _within(row_a, _BAND)
             & _within(q_max[:, None], _BAND) & _within(sigma0[:, None], _BAND)
             & _within(t0[:, None], _BAND) & (bound <= _BAND * sigma0))
    if bool(plain.all()):  # one host synchronisation, among the solve's many
        return None

    # Ruiz's equilibration of the KKT matrix, of the samples that are not near order 1 alone;
    # a zero row or column keeps its factor.
    keep = ~plain
    at = keep.nonzero().squeeze(1)
    Q, q, G, h, A, b = (x[at] for x in (Q, q, G, h, A, b))
    col, row_g, row_a = col[at], row_g[at], row_a[at]
    D, E, F = torch.ones_like(q), torch.ones_like(h), torch.ones_like(b)
    Qs, Gs, As = Q, G, A
    for _ in range(_PASSES):
        d, e, f = (torch.where(x > 0, x, 1.0).rsqrt() for x in (col, row_g, row_a))
        D, E, F = D * d, E * e, F * f
        dr = d.unsqueeze(-2)
        Qs = d.unsqueeze(-1) * Qs * dr
        Gs = e.unsqueeze(-1) * Gs * dr
        As = f.unsqueeze(-1) * As * dr
        col, row_g, row_a = _norms(Qs, Gs, As)
    D, E, F = _pow2(D), _pow2(E), _pow2(F)

    # The typical bound, and the loose rows scaled down to _LOOSE times it.
    sigma = _pow2(_typical(E * h, F * b))[:, None]
    over = (E * h).abs() / (_LOOSE * sigma)
    E = torch.where(over > 1.0, E * torch.exp2(-torch.ceil(torch.log2(over))), E)
    # The cost's scale: the largest entry of Q' = (σ/t) DQD and of q' = Dq/t is 1.
    cost = torch.maximum(sigma.squeeze(-1) * largest_abs((D.unsqueeze(-1) * Q * D.unsqueeze(-2)).flatten(1)),
                         inf_norm(D * q))
    t = torch.where(cost > 0, _pow2(torch.where(cost > 0, cost, 1.0)), 1.0)[:, None]
    def spread(x: Tensor) -> Tensor:  # every factor of the other samples is 1
        return x.new_ones((keep.shape[0], *x.shape[1:])).index_copy(0, at, x)

    return Scaling(D=spread(D), E=spread(E), F=spread(F), sigma=spread(sigma), t=spread(t),
                   scaled=keep)


def kkt_verdict(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    z: Tensor, lam: Tensor, nu: Tensor, scaling: Scaling,
) -> Tensor:
    """The relative KKT error ``(B,)`` of ``(z, λ, ν)`` in the original units.

    Stationarity coordinate by coordinate against the magnitude of its terms,
    ``|Q||z| + |q| + |G|ᵀ|λ| + |A|ᵀ|ν|`` (a variable whose terms are all far below the others',
    the free coordinate of a face left by tiny bounds, is judged against its own terms).
    Feasibility against ``|G||z| + |h|`` and ``|A||z| + |b|`` (magnitudes of the terms, not of
    ``Gz``, whose terms may cancel: an equality ``z₁ + z₂ = 0`` meets rounding there), with
    the rows weighted by ``E, F`` (so that a row of another order counts as much as the
    others). Complementarity ``Σ λᵢ|sᵢ|`` against the largest of ``|zᵀQz|``, ``|qᵀz|``,
    ``|bᵀν|`` and ``Σ λᵢ(|G||z| + |h|)ᵢ``. Feasibility and complementarity against at least
    ``_FLOOR`` times the solve's unit (``σ``, ``σt``): at ``z = 0`` on bounds ``h = 0`` every
    term is the rounding of the solve. Multiplying ``z`` (with the bounds), the cost, a row or
    a variable by a constant changes none of the three."""
    tiny = torch.finfo(q.dtype).tiny
    E, F = scaling.E, scaling.F
    sigma, t = scaling.sigma.squeeze(-1), scaling.t.squeeze(-1)
    za, la, na = z.abs(), lam.abs(), nu.abs()
    Qz, Gz, Az = bmv(Q, z), bmv(G, z), bmv(A, z)
    rd = Qz + q + bmtv(G, lam) + bmtv(A, nu)
    Ga, Aa = G.abs(), A.abs()
    dual = bmv(Q.abs(), za) + q.abs() + bmtv(Ga, la) + bmtv(Aa, na)
    err_d = inf_norm(rd / dual.clamp(min=tiny))
    row_g, row_a = bmv(Ga, za) + h.abs(), bmv(Aa, za) + b.abs()
    viol = torch.maximum(inf_norm(E * (Gz - h).clamp(min=0.0)), inf_norm(F * (Az - b)))
    err_p = viol / torch.maximum(torch.maximum(inf_norm(E * row_g), inf_norm(F * row_a)),
                                 _FLOOR * sigma).clamp(min=tiny)
    gap = (lam.clamp(min=0.0) * (h - Gz).abs()).sum(-1)
    objective = torch.stack([(z * Qz).sum(-1).abs(), (q * z).sum(-1).abs(), (b * nu).sum(-1).abs(),
                             (la * row_g).sum(-1)], -1).amax(-1)
    err_c = gap / torch.maximum(objective, _FLOOR * sigma * t).clamp(min=tiny)
    err = torch.maximum(torch.maximum(err_d, err_p), err_c)
    return torch.where(torch.isfinite(err), err, float("inf"))


def _take(out: IPMResult, sub: IPMResult, at: Tensor) -> None:
    """``out`` with the samples ``at`` ``(k,)`` replaced by ``sub``'s ``k`` samples, in place
    (the polish factors too: ``out``'s are those of the unscaled problem for its other samples,
    ``sub``'s those of the scaled one, which the backward is then given)."""
    for name in ("z", "lam", "nu", "s", "status", "steps", "residual", "tolerance"):
        setattr(out, name, getattr(out, name).index_copy(0, at, getattr(sub, name)))
    base, new = out.polish_factor, sub.polish_factor
    if base is None and new is None:
        return
    B, n, m = out.z.shape[0], out.z.shape[-1], out.lam.shape[-1]
    if base is None:
        base = (out.z.new_zeros(B, n, n), torch.zeros(B, m, dtype=torch.bool, device=out.z.device),
                torch.zeros(B, dtype=torch.bool, device=out.z.device))
    if new is None:
        out.polish_factor = (base[0], base[1], base[2].index_fill(0, at, False))
        return
    out.polish_factor = (base[0].index_copy(0, at, new[0].to(base[0].dtype)),
                         base[1].index_copy(0, at, new[1].to(base[1].dtype)),
                         base[2].index_copy(0, at, new[2]))


def _homogeneous(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    warm: tuple[Tensor, Tensor, Tensor] | None = None, **settings: Any,
) -> IPMResult:
    """:func:`interior_point`, each sample whose vectors ``q, h, b`` are all smaller than 1
    solved divided by the largest of their norms ``c`` (``z = c z'``, ``λ = c λ'``, ``ν = c ν'``
    solve the QP with ``q/c, h/c, b/c``): data uniformly far below 1 are then solved as data of
    order 1. Samples of order 1 and above are divided by 1 (the same iterates), and a batch
    without such a sample is passed on as it is. The first solve of every sample."""
    c = torch.maximum(inf_norm(q), torch.maximum(inf_norm(h), inf_norm(b)))
    small = (c < 1.0) & (c > 0.0)
    if not bool(small.any()):  # one host synchronisation, among the solve's many
        return interior_point(Q, q, G, h, A, b, warm=warm, **settings)
    # Not below the smallest normal number: a scale that underflows would overflow q/c. All-zero
    # vectors (the solution z = 0 where it is feasible) keep c = 1.
    c = torch.where(small, c.clamp(min=torch.finfo(q.dtype).tiny), 1.0).unsqueeze(-1)
    if warm is not None:
        warm = (warm[0] / c, warm[1] / c, warm[2] / c)
    out = interior_point(Q, q / c, G, h / c, A, b / c, warm=warm, **settings)
    out.z, out.lam, out.nu, out.s = out.z * c, out.lam * c, out.nu * c, out.s * c
    return out


def interior_point_scaled(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
    warm: tuple[Tensor, Tensor, Tensor] | None = None, **settings: Any,
) -> tuple[IPMResult, Scaling | None]:
    """:func:`interior_point` (the same arguments), with the samples whose data are not near
    order 1 checked in the original units and, where the check fails, solved again on their
    equilibrated data (see the module's docstring).

    Returns the result and the scaling of the samples that are not near order 1 (every other
    sample's factors are 1), in whose units the backward solves, or ``None`` for a batch near
    order 1 throughout.
    """
    out = _homogeneous(Q, q, G, h, A, b, warm=warm, **settings)
    scaling = equilibrate(Q, q, G, h, A, b)
    if scaling is None:
        # Data near order 1 throughout: the interior point's own tests, relative to 1 + ‖q‖ and
        # 1 + ‖h‖, are the ones that suit it (the check below would cost 2% of the solve).
        return out, None
    limit = _VERDICT * settings["tol"]
    err = kkt_verdict(Q, q, G, h, A, b, out.z, out.lam, out.nu, scaling)
    # An answer the check accepts at the solve's own tolerance stands; any other of a sample
    # that is not near order 1 is compared with that sample's scaled solve.
    retry = scaling.scaled & ~((out.status == SOLVED) & (err <= _ACCEPT * settings["tol"]))
    if not bool(retry.any()):
        return _for_scaled_backward(out, scaling, used=None), scaling
    # Those samples once more, on equilibrated data: the unscaled solve's answer is kept for
    # the others (the same iterates as without the check).
    at = retry.nonzero().squeeze(1)
    part = scaling.take(at)
    if warm is not None:
        warm = part.to_scaled(warm[0][at], warm[1][at], warm[2][at])
    Qa, qa, Ga, ha, Aa, ba = (x[at] for x in (Q, q, G, h, A, b))
    sub = interior_point(*part.apply(Qa, qa, Ga, ha, Aa, ba), warm=warm, **settings)
    part.unscale(sub)
    sub_err = kkt_verdict(Qa, qa, Ga, ha, Aa, ba, sub.z, sub.lam, sub.nu, part)
    # The answer the check accepts, the one with the smaller error where both are accepted.
    # Where neither is: the scaled solve's verdict if it found the problem infeasible (the
    # unscaled one may have called a point of tiny infeasible bounds solved) or if the unscaled
    # solve did not call its answer solved; otherwise the unscaled answer, reported as not
    # solved below (the check's error is no measure of which answer is nearer then: on weakly
    # active bounds of 1e-9 it put an answer right to 1e-10 behind one 0.5 of the bound off).
    sub_solved, solved = sub.status == SOLVED, out.status[at] == SOLVED
    inf = torch.full_like(sub_err, float("inf"))
    sub_score, score = torch.where(sub_solved, sub_err, inf), torch.where(solved, err[at], inf)
    sub_ok, ok = sub_score <= limit, score <= limit
    infeasible = (sub.status == PRIMAL_INFEASIBLE) | (sub.status == DUAL_INFEASIBLE)
    take = torch.where(sub_ok | ok, sub_ok & (~ok | (sub_score <= score)), infeasible | ~solved)
    # Whichever is kept, an answer the check rejects is not reported as solved.
    keep = at[~take]
    bad = keep[err[keep] > limit]
    if bad.numel():
        out.status = out.status.index_fill(0, bad, INACCURATE)
        out.residual = out.residual.index_copy(0, bad, err[bad])
    retried, retried_err = at, torch.where(take, sub_err, err[at])
    at, sub_idx = at[take], take.nonzero().squeeze(1)
    if at.numel():
        chosen = IPMResult(**{name: getattr(sub, name)[sub_idx] for name in (
            "z", "lam", "nu", "s", "status", "steps", "residual", "tolerance")},
            polish_factor=None if sub.polish_factor is None else tuple(  # type: ignore[arg-type]
                f[sub_idx] for f in sub.polish_factor))
        chosen_err = sub_err[sub_idx]
        chosen.steps = chosen.steps + out.steps[at]  # a sample solved twice took both solves' steps
        failed = (chosen.status == SOLVED) & (chosen_err > limit)
        chosen.status = torch.where(failed, INACCURATE, chosen.status)
        chosen.residual = torch.where(failed, chosen_err, chosen.residual)
        _take(out, chosen, at)
    polished = _polish_retried(Q, q, G, h, A, b, out, scaling, retried, retried_err,
                               settings["tol"])
    # A polished answer is not the point the scaled solve's factors were made at.
    used = at[~torch.isin(at, polished)] if at.numel() else None
    return _for_scaled_backward(out, scaling, used=used), scaling


def _polish_retried(
    Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, out: IPMResult,
    scaling: Scaling, at: Tensor, err: Tensor, accept: float,
) -> Tensor:
    """The answers of the samples ``at`` ``(k,)`` (those solved twice; their check errors
    ``err`` ``(k,)``) polished on a guessed active set (one equality-constrained solve, see
    ``_ipm._polish``), each kept where the check in the original units puts it within
    ``accept`` (the solve's tolerance: the polish solves the KKT system of its active set
    exactly, and the check's error is then the rounding of the terms, 1e-10 on bounds of
    4e-9) and below the answer's own error, in place;
    returns the indices of the samples polished.

    An interior point's error along a weakly active bound (a multiplier and a slack that both
    vanish at the solution) falls only as the square root of its duality measure: 0.8 of a
    bound of 6e-7 at the solve's tolerance, in either units; a polish on the right active set
    is exact. Up to two guesses: ``λᵢ > sᵢ`` in the scaled units, then the polish's own
    correction of it. Not for answers found infeasible (a KKT point is no certificate
    against the interior point's).
    """
    open_ = (out.status[at] == SOLVED) | (out.status[at] == INACCURATE)
    at, err = at[open_], err[open_]
    if at.numel() == 0:
        return at
    part = scaling.take(at)
    Qa, qa, Ga, ha, Aa, ba = (x[at] for x in (Q, q, G, h, A, b))
    z, lam, nu = out.z[at], out.lam[at], out.nu[at]
    # The guess compares each multiplier with its slack in the scaled units (λ' = λ/(tE),
    # s' = Es/σ), where both are of order 1; the polish itself runs in the original units, in
    # which the curvature that places a free coordinate is not scaled down next to the cost.
    guess = lam / (part.t * part.E) > part.E * (ha - bmv(Ga, z)) / part.sigma
    won = torch.zeros_like(open_[open_])
    for _attempt in range(2):
        pz, pl, pnu, ps, guess = polish(Qa, qa, Ga, ha, Aa, ba, z, lam, nu, guess)
        perr = kkt_verdict(Qa, qa, Ga, ha, Aa, ba, pz, pl, pnu, part)
        better = ~won & (perr <= accept) & (perr < err)
        if bool(better.any()):
            idx = at[better]
            for name, value in (("z", pz), ("lam", pl), ("nu", pnu), ("s", ps)):
                setattr(out, name, getattr(out, name).index_copy(0, idx, value[better]))
            out.status = out.status.index_fill(0, idx, SOLVED)
            out.residual = out.residual.index_copy(0, idx, perr[better])
            won = won | better
        if bool(won.all()):
            break
    return at[won]


def _for_scaled_backward(out: IPMResult, scaling: Scaling, used: Tensor | None) -> IPMResult:
    """``out`` with the polish factors of the scaled samples whose answer came from the unscaled
    solve (all but ``used``) flagged out: the backward of every scaled sample solves its KKT
    system in the scaled units (better conditioned: with rows of ``G`` of order 1e6 the unscaled
    one gave gradients of ``λ`` wrong by 1e-3 and more), where those factors, made in the
    original units, do not apply."""
    if out.polish_factor is None:
        return out
    stale = scaling.scaled if used is None else scaling.scaled.index_fill(0, used, False)
    L, active, has = out.polish_factor
    out.polish_factor = (L, active, has & ~stale)
    return out
