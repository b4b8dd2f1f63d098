"""``il.qp``: a batched, differentiable quadratic program."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .._eager import run_eagerly
from .._info import ConvergenceError, ConvergenceWarning, user_stacklevel
from ..functional import custom_root
from ._closest import closest_feasible_shift
from ._inputs import QPData, check_inputs, expand
from ._ipm import PRIMAL_INFEASIBLE, SOLVED, STATUS_NAMES, inaccurate_hint
from ._kkt import KKTSolve, kkt_residual
from ._scaling import interior_point_scaled
from ._settings import InteriorPoint, QPInfo

__all__ = ["qp"]


# Under torch.compile the whole call (checks, interior point, reports) runs eagerly, as one
# graph break: traced, each host read would be a break of its own, and each batch size new graphs.
@run_eagerly
def qp(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    solver: InteriorPoint | None = None,
    backward: Any = None,
    warm_start: tuple[Tensor, Tensor, Tensor] | None = None,
    return_duals: bool = False,
    return_info: bool = False,
) -> Any:
    """Solve ``min ½ zᵀQz + qᵀz  s.t.  Gz <= h, Az = b`` and differentiate through the solution.

    The argument order is qpth's ``QPFunction``. Every input may carry one leading batch
    dimension ``B`` or none (then it is shared across the batch, and its gradient is the sum
    over the batch). ``Q`` must be positive semidefinite: ``Q = 0`` (an LP) and singular ``Q``
    are fine as long as the problem is bounded.

    The forward pass is :class:`~implicit_layers.InteriorPoint`; the backward pass applies the
    implicit function theorem to the KKT conditions (OptNet's differential), solving the
    adjoint KKT system directly. Gradients reach every input and compose to any order
    (``create_graph=True``, ``torch.func.grad``). At a degenerate solution (a weakly active
    constraint, duplicated active rows) the KKT matrix is singular; the adjoint is then the
    minimum-norm least-squares solution, a finite gradient, and when that system is
    inconsistent the backward warns.

    Samples whose data are not near order 1 (bounds of order 1e-8 with ``q`` of order 1, rows
    of ``G`` or a cost of order 1e-10) have their answers checked in the original units and,
    where the check fails, are solved again on equilibrated data, scaled back exactly; an
    answer that fails the check is reported as not solved (a warning), never as solved.
    Variables of very different orders within one sample are still hard; the troubleshooting
    guide says what is covered.

    Args:
        Q: ``(n, n)`` or ``(B, n, n)``, positive semidefinite; only its symmetric part
            ``(Q + Qᵀ)/2`` enters the objective, and is what the solve uses.
        q: ``(n,)`` or ``(B, n)``.
        G: ``(m, n)`` or ``(B, m, n)``, or ``None`` (no inequalities); with ``h``.
        h: ``(m,)`` or ``(B, m)``, or ``None``.
        A: ``(p, n)`` or ``(B, p, n)``, or ``None`` (no equalities); with ``b``.
        b: ``(p,)`` or ``(B, p)``, or ``None``.
        solver: the forward solver settings (default ``InteriorPoint()``).
        backward: the backward mode or linear solver of the adjoint (default a direct solve of
            the KKT system built at the solution).
        warm_start: an initial ``(z, λ, ν)`` (shapes as the returned solution and duals), e.g.
            the previous batch's answer in a training loop.
        return_duals: also return the multipliers ``(λ, ν)`` (differentiable).
        return_info: also return a :class:`~implicit_layers.QPInfo` (per-sample status).

    Returns:
        ``z`` of shape ``(n,)`` or ``(B, n)``; with ``return_duals`` then ``λ`` ``(…, m)`` and
        ``ν`` ``(…, p)``; with ``return_info`` then the info, in that order.

    Raises:
        TypeError: a non-tensor or non-float input, a ``solver`` that is not an
            ``InteriorPoint``. Mixed float dtypes are promoted to the widest.
        ValueError: shapes that do not fit together, a NaN or infinite entry in any input
            (an infinite bound in ``h`` is no constraint: drop its row), or a ``Q`` with a
            negative diagonal entry or an indefinite 2 x 2 principal minor (a nonconvex QP;
            these entry-wise tests are all that is checked, so an indefinite ``Q`` that
            passes them is not caught: it must be positive semidefinite).
        implicit_layers.ConvergenceError: a sample not solved, with
            ``solver=InteriorPoint(on_failure="raise")``.

    Warns:
        implicit_layers.ConvergenceWarning: once, naming every sample that is infeasible,
            unbounded or stopped at ``max_steps`` (``on_failure="warn"``, the default).

    Examples:
        >>> Q = torch.eye(2, dtype=torch.float64)
        >>> q = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> h = torch.tensor([1.0], dtype=torch.float64)
        >>> il.qp(Q, q, G, h)                     # the projection of (1, 1) onto z1 + z2 <= 1
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    data, batch = check_inputs(Q, q, G, h, A, b)
    # The KKT residual is evaluated in the inputs' dtype, not autocast's lower precision.
    with torch.autocast(data[1].device.type, enabled=False):
        return _qp(data, batch, solver, backward, warm_start, return_duals, return_info)


def _qp(
    data: QPData,
    batch: int | None,
    solver: InteriorPoint | None,
    backward: Any,
    warm_start: tuple[Tensor, Tensor, Tensor] | None,
    return_duals: bool,
    return_info: bool,
) -> Any:
    solver = InteriorPoint() if solver is None else solver
    if not isinstance(solver, InteriorPoint):
        raise TypeError(f"solver must be an il.InteriorPoint, got {type(solver).__name__}.")
    B = 1 if batch is None else batch
    n, m = data[1].shape[-1], data[3].shape[-1]
    dtype = data[1].dtype
    tol = solver.resolved_tol(dtype)
    if B == 0:
        return _empty(data, return_duals, return_info)

    with torch.no_grad():
        # The interior point runs in float64 whatever the inputs' dtype: its last iterations
        # divide by slacks near zero, which float32 cannot resolve (it stalls near vertices).
        flat = expand(_detached(data, torch.float64), B)
        warm = None
        if warm_start is not None:
            warm = _warm(warm_start, B, n, m, data[5].shape[-1])
        result, scaling = interior_point_scaled(*flat, tol=tol, max_steps=solver.max_steps,
                                                check_every=solver.check_every, warm=warm)
        x_star = torch.cat([result.z, result.lam, result.nu], dim=-1).to(dtype)
        factor, scale = result.polish_factor, None
        if backward is None and scaling is not None:
            scale = scaling.kkt_factors()
            if bool(torch.isfinite(torch.cat(scale, -1)).all() and (scale[0] > 0).all()):
                # The backward solves the KKT system of the scaled problem (float64), where the
                # forward's polish factors were made; its solutions are unscaled exactly.
                Qs, _, Gs, hs, As, _ = scaling.apply(*flat)
                xs = torch.cat(scaling.to_scaled(result.z, result.lam, result.nu), dim=-1)
                point = (Qs, Gs, hs, As, xs)
            else:
                # Factors beyond float64's range (data of order 1e-160 and below): the
                # backward solves in the original units, without the scaled polish factors.
                scale = None
                if factor is not None:
                    factor = (factor[0], factor[1], factor[2] & ~scaling.scaled)
        if scale is None:
            flat = expand(_detached(data, dtype), B)
            point = (flat[0], flat[2], flat[3], flat[4], x_star.detach())
    _report(result.status, batch, solver)

    if backward is None:
        backward = KKTSolve(point=point, factor=factor, scale=scale)

    @custom_root(kkt_residual, backward, batched=True)
    def _solution(x0: Tensor, *_: Tensor) -> Tensor:
        return x0

    x = _solution(x_star, *data)
    if solver.infeasible == "closest" and bool((result.status == PRIMAL_INFEASIBLE).any()):
        x = _replace_by_closest(x, data, B, result.status == PRIMAL_INFEASIBLE, solver, return_duals)
    if batch is None:
        x = x.squeeze(0)
    z, lam, nu = x[..., :n], x[..., n:n + m], x[..., n + m:]
    out: list[Any] = [z]
    if return_duals:
        out += [lam, nu]
    if return_info:
        info = QPInfo(converged=result.status == SOLVED, steps=result.steps,
                      residual=result.residual.to(dtype), solver="InteriorPoint",
                      tolerance=result.tolerance.to(dtype), status=result.status,
                      duals=(lam.detach(), nu.detach()))
        if batch is None:
            squeezed = info.squeeze_batch()
            info = QPInfo(converged=squeezed.converged, steps=squeezed.steps, residual=squeezed.residual,
                          solver=squeezed.solver, tolerance=squeezed.tolerance,
                          status=result.status.squeeze(0), duals=info.duals)
        out.append(info)
    return out[0] if len(out) == 1 else tuple(out)


def _replace_by_closest(
    x: Tensor, data: QPData, B: int, infeasible: Tensor, solver: InteriorPoint, with_duals: bool
) -> Tensor:
    """``x`` with the infeasible samples' rows replaced by the closest feasible problem's solution."""
    idx = infeasible.nonzero().squeeze(1)
    Q, q, G, h, A, b = (t[idx] for t in expand(data, B))
    inner = solver.replace(infeasible="flag")
    t_h, t_b = closest_feasible_shift((Q, q, G, h, A, b), lambda *d: qp(*d, solver=inner))
    z, lam, nu = qp(Q, q, G, h + t_h, A, b + t_b, solver=inner, return_duals=True)
    return x.index_copy(0, idx.to(x.device), torch.cat([z, lam, nu], dim=-1))


def _detached(data: QPData, dtype: torch.dtype) -> QPData:
    Q, q, G, h, A, b = (t.detach().to(dtype) for t in data)
    return Q, q, G, h, A, b


def _empty(data: QPData, return_duals: bool, return_info: bool) -> Any:
    """The outputs of an empty batch (``B = 0``), shaped ``(0, n)``, ``(0, m)``, ``(0, p)``, as
    torch's operations return for an empty batch (connected to the inputs, with no entries)."""
    _, q, _, h, _, b = expand(data, 0)
    z, lam, nu = q * 0, h * 0, b * 0
    out: list[Any] = [z]
    if return_duals:
        out += [lam, nu]
    if return_info:
        none = q.new_zeros(0)
        out.append(QPInfo(converged=none.bool(), steps=none.long(), residual=none, solver="InteriorPoint",
                          tolerance=none, status=none.long(), duals=(lam.detach(), nu.detach())))
    return out[0] if len(out) == 1 else tuple(out)


def _warm(warm_start: Any, B: int, n: int, m: int, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """The warm start ``(z, λ, ν)`` as float64 ``(B, n)``, ``(B, m)``, ``(B, p)``, or a clear
    error naming the part that does not fit."""
    if not (isinstance(warm_start, (tuple, list)) and len(warm_start) == 3
            and all(isinstance(t, Tensor) for t in warm_start)):
        raise TypeError("warm_start must be a tuple (z, λ, ν) of three tensors, e.g. the solution "
                        "and duals of an earlier call with return_duals=True.")
    out = []
    for t, k, name in zip(warm_start, (n, m, p), ("z", "λ", "ν"), strict=True):
        if t.numel() != B * k:
            raise ValueError(f"warm_start's {name} must have {B * k} entries (batch {B} × {k}), "
                             f"got shape {tuple(t.shape)}.")
        out.append(t.detach().to(torch.float64).reshape(B, k))
    return out[0], out[1], out[2]


def _report(status: Tensor, batch: int | None, solver: InteriorPoint) -> None:
    """One warning (or error) naming every sample that was not solved."""
    if solver.on_failure == "ignore":
        return
    failed = (status != SOLVED).nonzero().flatten().tolist()
    if not failed:
        return
    codes = status.tolist()
    where = "the problem" if batch is None else "batch sample(s) " + ", ".join(
        f"{i} ({STATUS_NAMES[codes[i]]})" for i in failed[:20]) + (" ..." if len(failed) > 20 else "")
    what = f"({STATUS_NAMES[codes[failed[0]]]})" if batch is None else ""
    closest = (" Primal infeasible samples return the solution of the closest feasible problem "
               "(infeasible='closest').") if solver.infeasible == "closest" else ""
    message = (
        f"qp: {where}{' ' + what if what else ''} not solved: {len(failed)} of {len(codes)} "
        f"problem(s).{closest} Their outputs are not solutions (the others are exact): check that the "
        "constraints are feasible and the objective bounded below, or raise max_steps (now "
        f"{solver.max_steps}) for a sample stopped at max steps.{inaccurate_hint(codes)} "
        "info.status (return_info=True) gives every sample's status."
    )
    if solver.on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())
