"""Euclidean projections onto convex sets, differentiable in the point and in the set.

``P_C(x) = argmin_{y in C} ½‖y − x‖²``. Every function acts on the last dimension of ``x``;
leading dimensions are a batch. A scalar parameter of a set (a radius, a total, the offset ``b``
of a hyperplane) is a number or a tensor shaped like ``x.shape[:-1]``; per-coordinate parameters
(bounds, normals) broadcast against ``x``. Every parameter given as a tensor receives gradients.

The projections are written in plain differentiable torch operations, so derivatives of every
order, ``torch.func.grad`` / ``vmap`` / ``jacrev`` and ``torch.autocast`` work as for any other
torch code, and the derivatives cost what the forward costs: the simplex and l1-ball Jacobians
keep their sparse form ``diag(s) − s sᵀ / |S|`` (``s`` the support) implicitly, no ``n × n``
matrix is formed.

Where a projection is not differentiable (a point exactly on the boundary of the region where a
constraint becomes active) the derivative is the one-sided one of the *inactive* side: a
coordinate of ``box`` with ``x_i == upper_i`` passes its gradient through, a point of
``l2_ball`` with ``‖x‖ == radius`` is treated as inside, an entry of ``simplex`` exactly at the
threshold counts in the support. It is finite, never NaN, also for infinite parameters (a
radius of ``inf``). A set that is a single point (a radius of 0, ``lower == upper``) has no
inactive side: its projection is constant, with derivative 0 in ``x``.

A NaN in ``x`` is never hidden: it gives NaN in that coordinate (the elementwise projections)
or in the whole vector (those that couple the coordinates: ``simplex``, ``l1_ball``).

Bad sets raise ``ValueError`` naming the argument. The checks read the data, so they are skipped
under ``torch.func.vmap`` (the same call without vmap raises).

The projection onto a general polyhedron ``{Ay = b, Gy <= h}``, :func:`polyhedron`, is a
quadratic program solved by :func:`~implicit_layers.qp` and differentiated through its KKT
conditions; it is the one projection here that is not a closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._polyhedron import polyhedron
from ._set_params import as_vector, per_vector, require, require_tensor, safe_norm

__all__ = [
    "box",
    "nonnegative",
    "simplex",
    "l1_ball",
    "l2_ball",
    "linf_ball",
    "hyperplane",
    "halfspace",
    "affine_set",
    "box_section",
    "polyhedron",
]


def _clip(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    # torch.where rather than clamp: a tie x == bound takes the inactive (pass-through) side,
    # so the gradient goes to x and none to the bound, as documented. A coordinate whose
    # bounds meet has no inactive side: it is the bound, constant in x.
    clipped = torch.where(x > upper, upper, torch.where(x < lower, lower, x))
    return torch.where(lower == upper, upper, clipped).to(x.dtype)


def _ball(x: Tensor, radius: float | Tensor) -> tuple[Tensor, Tensor]:
    x = require_tensor(x, "x")
    r = per_vector(radius, x, "radius")
    require(r >= 0, "radius must be >= 0.", r)
    return x, r


def _box(x: Tensor, lower: float | Tensor, upper: float | Tensor) -> tuple[Tensor, Tensor]:
    lo, up = as_vector(lower, x, "lower"), as_vector(upper, x, "upper")
    require(lo <= up, "lower must be <= upper everywhere (the box is empty otherwise), and neither NaN.",
            torch.where(lo <= up, up, lo))
    return lo, up


def box(x: Tensor, lower: float | Tensor, upper: float | Tensor) -> Tensor:
    """Project onto the box ``{y: lower <= y <= upper}`` (elementwise clipping).

    Args:
        x: points, shape ``(*batch, n)``.
        lower: lower bounds, a number or a tensor broadcastable to ``x`` (``-inf`` allowed).
        upper: upper bounds, likewise (``+inf`` allowed).

    Returns:
        ``min(max(x, lower), upper)``, shape of ``x`` broadcast with the bounds.

    Raises:
        ValueError: if ``lower > upper`` anywhere.

    Example:
        >>> box(torch.tensor([-2.0, 0.5, 3.0]), 0.0, 1.0)
        tensor([0.0000, 0.5000, 1.0000])
    """
    x = require_tensor(x, "x")
    lo, up = _box(x, lower, upper)
    return _clip(x, lo, up)


def nonnegative(x: Tensor) -> Tensor:
    """Project onto the nonnegative orthant: ``max(x, 0)``.

    Args:
        x: points, shape ``(*batch, n)``.

    Returns:
        ``max(x, 0)``, shape of ``x``. At ``x_i == 0`` the derivative is 1 (the inactive side).
    """
    x = require_tensor(x, "x")
    return torch.where(x < 0, torch.zeros_like(x), x)


def simplex(x: Tensor, total: float | Tensor = 1.0) -> Tensor:
    """Project onto the simplex ``{y: y >= 0, Σ y = total}``.

    ``y = max(x − τ, 0)`` with the threshold ``τ = (Σ_{i in S} x_i − total) / |S|`` over the
    support ``S``, found by sorting (``O(n log n)``). The threshold is computed from the sorted
    values with differentiable operations, so autograd yields the exact Jacobian
    ``∂y/∂x = diag(s) − s sᵀ / |S|`` and ``∂y/∂total = s / |S|`` (``s`` the indicator of ``S``)
    without forming it. This is sparsemax when ``total = 1``.

    Args:
        x: points, shape ``(*batch, n)``.
        total: the sum of the simplex, positive; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x``.

    Raises:
        ValueError: if ``total <= 0``.

    Example:
        >>> simplex(torch.tensor([0.5, 1.5, -1.0]))
        tensor([0., 1., 0.])
    """
    x = require_tensor(x, "x")
    if x.shape[-1] == 0:
        raise ValueError(
            f"x must have a nonempty last dimension (no point of length 0 sums to total); got shape "
            f"{tuple(x.shape)}."
        )
    t = per_vector(total, x, "total")
    require(t > 0, "total must be > 0 (the simplex {y >= 0, sum(y) = total} is empty or a point "
            "otherwise).", t)
    return _simplex(x, t)


def _simplex(x: Tensor, t: Tensor) -> Tensor:
    # Also used by l1_ball with total > 0. The projection does not change when every entry
    # moves by the same amount: shifted so that the largest entry is 0 (a constant for the
    # derivatives), the partial sums do not lose the total to cancellation when it is far
    # below the entries (x ~ 1e7 in float32, or a total of 1e-300).
    x = x - x.detach().amax(-1, keepdim=True)
    u, _ = torch.sort(x, dim=-1, descending=True)
    n = x.shape[-1]
    ks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    css = torch.cumsum(u, dim=-1) - t
    # Ties (an entry exactly at the threshold) count in the support: the inactive side of the
    # constraint y_i >= 0, as documented; the threshold is the same either way.
    support = (u - css / ks >= 0).sum(-1, keepdim=True).clamp(min=1)
    tau = torch.gather(css, -1, support - 1) / support.to(x.dtype)
    z = x - tau
    y = torch.where(z >= 0, z, torch.zeros_like(z))
    # A NaN entry makes the whole projection undefined: NaN, not a point of the set.
    return torch.where(torch.isnan(x).any(-1, keepdim=True), torch.full_like(y, float("nan")), y)


def l1_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Project onto the l1 ball ``{y: ‖y‖₁ <= radius}``.

    Inside the ball ``y = x``; outside, ``y = sign(x) · simplex(|x|, radius)`` (soft-thresholding
    at the level that lands on the sphere), with the sparse Jacobian of the simplex.

    Args:
        x: points, shape ``(*batch, n)``.
        radius: nonnegative; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x``.

    Raises:
        ValueError: if ``radius < 0``.
    """
    x, r = _ball(x, radius)
    if x.shape[-1] == 0:
        return x.clone()
    inside = x.abs().sum(-1, keepdim=True) <= r
    # A radius of 0 makes the ball the point 0: the projection is constant, with no inactive
    # side at x = 0 (where `inside` would pass the gradient through).
    onto = torch.where(r > 0, r, torch.ones_like(r))
    y = torch.where(inside, x, torch.sign(x) * _simplex(x.abs(), onto))
    return torch.where(r > 0, y, torch.zeros_like(y))


def l2_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Project onto the Euclidean ball ``{y: ‖y‖₂ <= radius}``: ``x · min(1, radius / ‖x‖)``.

    Args:
        x: points, shape ``(*batch, n)``.
        radius: nonnegative; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x``.

    Raises:
        ValueError: if ``radius < 0``.
    """
    x, r = _ball(x, radius)
    norm, safe = safe_norm(x)
    # A radius of 0 (the point 0) has no inactive side at x = 0. The radius enters the
    # product only where it is used, so that an infinite one (never used) keeps the
    # gradient finite.
    outside = (norm > r) | (r == 0)
    return torch.where(outside, x * (torch.where(outside, r, torch.zeros_like(r)) / safe), x)


def linf_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Project onto the max-norm ball ``{y: ‖y‖_∞ <= radius}``: clip to ``[-radius, radius]``.

    Args:
        x: points, shape ``(*batch, n)``.
        radius: nonnegative; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x``.

    Raises:
        ValueError: if ``radius < 0``.
    """
    x, r = _ball(x, radius)
    return _clip(x, -r, r)


def _normal(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    a = as_vector(a, x, "a")
    if a.dim() == 0 or a.shape[-1] not in (1, x.shape[-1]):
        raise ValueError(
            f"a must be a vector of length n = {x.shape[-1]} (last dimension); got shape {tuple(a.shape)}."
        )
    # A normal of length 1 stands for n equal entries: its norm is that of the n entries.
    a = a.expand(*a.shape[:-1], x.shape[-1])
    sq = (a * a).sum(-1, keepdim=True)
    require(sq > 0, "a must be nonzero and finite (a zero normal does not define a hyperplane).", sq)
    return a, sq


def _plane(x: Tensor, a: Tensor, b: float | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The checked point and normal, ``‖a‖²`` and the signed gap ``aᵀx − b``."""
    x = require_tensor(x, "x")
    a, sq = _normal(x, a)
    return x, a, sq, (a * x).sum(-1, keepdim=True) - per_vector(b, x, "b")


def hyperplane(x: Tensor, a: Tensor, b: float | Tensor) -> Tensor:
    """Project onto the hyperplane ``{y: aᵀy = b}``: ``x − (aᵀx − b) / ‖a‖² · a``.

    Args:
        x: points, shape ``(*batch, n)``.
        a: the normal, shape ``(n,)`` or broadcastable to ``x``; nonzero.
        b: the offset; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x`` broadcast with ``a``.

    Raises:
        ValueError: if ``a`` is zero or not of length ``n``.
    """
    x, a, sq, gap = _plane(x, a, b)
    return x - gap / sq * a


def halfspace(x: Tensor, a: Tensor, b: float | Tensor) -> Tensor:
    """Project onto the halfspace ``{y: aᵀy <= b}``: ``x − max(aᵀx − b, 0) / ‖a‖² · a``.

    Args:
        x: points, shape ``(*batch, n)``.
        a: the outward normal, shape ``(n,)`` or broadcastable to ``x``; nonzero.
        b: the offset; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x`` broadcast with ``a``. On the boundary the derivative is
        the identity (the inactive side).

    Raises:
        ValueError: if ``a`` is zero or not of length ``n``.
    """
    x, a, sq, gap = _plane(x, a, b)
    gap = torch.where(gap > 0, gap, torch.zeros_like(gap))
    return x - gap / sq * a


def affine_set(x: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """Project onto the affine set ``{y: A y = b}``: ``x − Aᵀ (A Aᵀ)⁻¹ (A x − b)``.

    The ``m × m`` system is solved by Cholesky; ``A`` must have full row rank (``m <= n``), which
    also makes the set nonempty for every ``b``.

    Args:
        x: points, shape ``(*batch, n)``.
        A: the constraint matrix, shape ``(m, n)`` or ``(*batch, m, n)``.
        b: the right-hand side, shape ``(m,)`` or ``(*batch, m)``.

    Returns:
        The projection, shape ``(*batch, n)``.

    Raises:
        ValueError: if the shapes disagree or ``A`` is row-rank deficient (then ``A y = b`` is
            either inconsistent or has redundant rows; remove them).
    """
    x = require_tensor(x, "x")
    # Like the other set parameters, A and b take the dtype of x.
    A = require_tensor(A, "A").to(x.dtype)
    b = require_tensor(b, "b").to(x.dtype)
    if A.dim() < 2 or A.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"A must have shape (m, n) with n = {x.shape[-1]} = x.shape[-1]; got {tuple(A.shape)}."
        )
    if b.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"b must have shape (m,) with m = {A.shape[-2]} = A.shape[-2]; got {tuple(b.shape)}."
        )
    try:
        torch.broadcast_shapes(x.shape[:-1], A.shape[:-2], b.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of x {tuple(x.shape[:-1])}, A {tuple(A.shape[:-2])} and b "
            f"{tuple(b.shape[:-1])} must broadcast (one set per vector, or one for all)."
        ) from None
    if A.shape[-2] > A.shape[-1]:
        raise ValueError(
            f"A has more rows ({A.shape[-2]}) than columns ({A.shape[-1]}), so it cannot have full row rank; "
            "remove redundant rows."
        )
    gram = A @ A.mT
    _, info = torch.linalg.cholesky_ex(gram.detach())
    require(
        info == 0,
        "A must have full row rank (A Aᵀ is singular): A y = b is inconsistent or has redundant rows; "
        "remove them.",
    )
    residual = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    chol = torch.linalg.cholesky(gram)
    lam = torch.cholesky_solve(residual.unsqueeze(-1), chol)
    return x - (A.mT @ lam).squeeze(-1)


def box_section(
    x: Tensor, lower: float | Tensor, upper: float | Tensor, a: Tensor, c: float | Tensor
) -> Tensor:
    """Project onto ``{y: lower <= y <= upper, aᵀy = c}`` (a box cut by a hyperplane).

    The solution is ``y(ν) = clip(x − ν a, lower, upper)`` where the multiplier ``ν`` solves the
    monotone piecewise-linear equation ``aᵀ y(ν) = c``. A binary search over the sorted
    breakpoints of ``y(ν)`` finds the linear piece that holds the root (``O(n log n)``), and ``ν``
    is then the exact root of that piece,
    ``ν = (Σ_F a_i x_i + Σ_{i∉F} a_i y_i − c) / Σ_F a_i²`` over the free coordinates ``F``. This
    formula is computed with differentiable operations on the fixed active set, so autograd gives
    the derivative of the implicit function ``ν(x, lower, upper, a, c)`` exactly (to dtype
    precision, with no iteration tolerance).

    Args:
        x: points, shape ``(*batch, n)``.
        lower: lower bounds, a number or a tensor broadcastable to ``x`` (``-inf`` allowed).
        upper: upper bounds, likewise.
        a: the normal, shape ``(n,)`` or broadcastable to ``x``; nonzero.
        c: the level; a number or a tensor shaped ``x.shape[:-1]``.

    Returns:
        The projection, shape of ``x`` broadcast with the parameters.

    Raises:
        ValueError: if ``lower > upper``, ``a`` is zero, or no point of the box has ``aᵀy = c``.

    Example:
        >>> box_section(torch.tensor([0.9, 0.8, -0.5]), 0.0, 1.0, torch.ones(3), 1.0)
        tensor([0.5500, 0.4500, 0.0000])
    """
    x = require_tensor(x, "x")
    a, _ = _normal(x, a)
    lo, up = _box(x, lower, upper)
    level = per_vector(c, x, "c")
    shape = torch.broadcast_shapes(x.shape, a.shape, lo.shape, up.shape)
    x, a, lo, up = (t.expand(shape) for t in (x, a, lo, up))
    level = level.expand(shape[:-1] + (1,))
    zero = torch.zeros_like(a)
    # a_i * bound_i with 0 * inf read as 0: a coordinate with a_i = 0 does not enter aᵀy.
    a_lo = torch.where(a == 0, zero, a * lo)
    a_up = torch.where(a == 0, zero, a * up)
    reach_min = torch.minimum(a_lo, a_up).sum(-1, keepdim=True)
    reach_max = torch.maximum(a_lo, a_up).sum(-1, keepdim=True)
    # A level at an end of the range, computed in another order, may sit a rounding error
    # outside it: allow a few ulps of the terms' size.
    slack = 4 * torch.finfo(a.dtype).eps * (a_lo.abs() + a_up.abs()).sum(-1, keepdim=True)
    require(
        (reach_min - slack <= level) & (level <= reach_max + slack),
        "c must lie in [min, max] of aᵀy over the box (the set {lower <= y <= upper, aᵀy = c} is empty "
        "otherwise); choose c inside that range.",
    )
    with torch.no_grad():
        nu = _section_multiplier(x.detach(), lo.detach(), up.detach(), a.detach(), level.detach())
        z = x.detach() - nu * a.detach()
        at_upper = z >= up.detach()
        at_lower = (z <= lo.detach()) & ~at_upper
        free = ~(at_upper | at_lower)
    bound = torch.where(at_upper, up, lo)
    # The inner where keeps the (possibly infinite) bounds of free coordinates out of the product.
    a_bound = a * torch.where(free, zero, bound)
    free_sq = torch.where(free, a * a, zero).sum(-1, keepdim=True)
    numerator = torch.where(free, a * x, zero).sum(-1, keepdim=True) + a_bound.sum(-1, keepdim=True) - level
    solvable = free_sq > 0
    # With no free coordinate on the root's piece the multiplier is not unique (c is a vertex
    # value); the search's value is used and y is the clipped point, locally constant in x.
    nu = torch.where(solvable, numerator / torch.where(solvable, free_sq, torch.ones_like(free_sq)), nu)
    y_free = x - nu * a
    # At an end of aᵀy's range the free coordinates sit on their bounds, and rounding of ν can
    # put them a hair outside: keep y in the box (a where, so that a point exactly on a bound
    # keeps the free coordinate's derivative).
    y_free = torch.where(y_free < lo, lo, torch.where(y_free > up, up, y_free))
    return torch.where(free, y_free, bound)


def _section_multiplier(x: Tensor, lo: Tensor, up: Tensor, a: Tensor, level: Tensor) -> Tensor:
    """A multiplier on the linear piece of ``ν ↦ aᵀ clip(x − ν a)`` that holds the root ``c``."""

    def value(nu: Tensor) -> Tensor:
        return (a * _clip(x - nu * a, lo, up)).sum(-1, keepdim=True)

    nonzero = a != 0
    safe_a = torch.where(nonzero, a, torch.ones_like(a))
    kinks = torch.cat([(x - up) / safe_a, (x - lo) / safe_a], dim=-1)
    # A spurious breakpoint only splits a linear piece, so undefined ones (a_i = 0, infinite
    # bounds) are replaced by 0.
    defined = torch.isfinite(kinks) & torch.cat([nonzero, nonzero], -1)
    kinks = torch.where(defined, kinks, torch.zeros_like(kinks))
    kinks, _ = torch.sort(kinks, dim=-1)
    k = kinks.shape[-1]
    # Invariant: value(kinks[lo_i]) >= c > value(kinks[hi_i]), index -1 is -inf and k is +inf
    # (value is nonincreasing in ν).
    lo_i = torch.full_like(level, -1, dtype=torch.long)
    hi_i = torch.full_like(level, k, dtype=torch.long)
    for _ in range(math.ceil(math.log2(k + 1)) + 1):
        mid = torch.div(lo_i + hi_i, 2, rounding_mode="floor")
        probe = torch.gather(kinks, -1, mid.clamp(0, k - 1))
        above = value(probe) >= level
        open_ = hi_i - lo_i > 1
        lo_i = torch.where(open_ & above, mid, lo_i)
        hi_i = torch.where(open_ & ~above, mid, hi_i)
    left = torch.gather(kinks, -1, lo_i.clamp(0, k - 1))
    right = torch.gather(kinks, -1, hi_i.clamp(0, k - 1))
    left = torch.where(lo_i < 0, right - 1, left)
    right = torch.where(hi_i >= k, left + 1, right)
    return (left + right) / 2
