"""Outer loop shared by iterative solvers that track their residual by a recurrence.

MINRES, BiCGStab and Broyden update a residual estimate cheaply at every step; in finite
precision it drifts away from the true residual ``b - A x``. They therefore run in *rounds*:
a round iterates until every sample's estimate meets its tolerance (or breaks down, or uses its
step budget); then the true residual is recomputed with one operator product, samples that
truly converged are frozen, and the others start a new round from their current iterate. A
sample whose true residual did not decrease over a whole round is stagnating and is stopped
(reported as not converged), keeping its previous iterate if the round made it worse.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, initial_residual
from ._loop import LinearLoop, from_host, to_host
from ._operator import LinearOperator

# inner(x, r, beta, active, loop) -> (x, used)
#   x, r: current iterate and its true residual b - A x, shape (B, n)
#   beta: ‖r‖, shape (B,); active: samples to iterate, shape (B,)
#   loop: the solve's LinearLoop; the round steps while loop.proceed(...) allows (which counts
#   the batch's steps against max_steps), and tests loop.tol.
#   returns the new iterate and the per-sample steps used in the round.
Inner = Callable[[Tensor, Tensor, Tensor, Tensor, LinearLoop], tuple[Tensor, Tensor]]


def one_and_zero(b: Tensor) -> tuple[Tensor, Tensor]:
    """``1`` and ``0`` as 0-dim tensors of ``b``'s dtype and device: the stand-ins of a
    round's ``torch.where`` guards against division by zero."""
    return (
        torch.ones((), dtype=b.dtype, device=b.device),
        torch.zeros((), dtype=b.dtype, device=b.device),
    )


def run_in_rounds(
    solver: LinearSolver, op: LinearOperator, b: Tensor, x0: Tensor | None, inner: Inner
) -> tuple[Tensor, SolveInfo]:
    """Run ``inner`` in rounds until every sample converged, stagnated or the budget is spent.

    Args:
        solver: the solver (its settings and name).
        op: the operator, acting on ``(B, n)``.
        b: right-hand side ``(B, n)``.
        x0: initial guess ``(B, n)`` or ``None`` (zeros).
        inner: one round, ``inner(x, r, beta, active, loop) -> (x, used)``: ``x`` and its
            true residual ``r`` ``(B, n)``, ``beta = ‖r‖`` ``(B,)``, the samples to iterate
            ``active`` ``(B,)``, and the solve's :class:`LinearLoop`; it steps while
            ``loop.proceed(...)`` allows and returns the new iterate and the steps each sample
            used ``(B,)``.

    Returns:
        ``(x, info)``: ``x`` of shape ``(B, n)``, with the true residual of ``x`` in the info.

    Raises:
        implicit_layers.NonFiniteError: if a residual becomes NaN or Inf.

    Examples:
        Rounds of at most three Richardson steps ``x ← x + r / 4`` on ``2 x = b``:

        >>> from implicit_layers.linear.base import run_in_rounds
        >>> def inner(x, r, beta, active, loop):
        ...     used = torch.zeros_like(beta, dtype=torch.int64)
        ...     for k in range(3):
        ...         if not loop.proceed(beta, done=~active, check=k > 0):
        ...             break
        ...         x = torch.where(active.unsqueeze(-1), x + r / 4, x)
        ...         r = b - 2 * x
        ...         used = used + active.long()
        ...     return x, used
        >>> b = torch.ones(2, 3, dtype=torch.float64)
        >>> op = il.linear.MatrixOperator(2 * torch.eye(3, dtype=torch.float64), batch=2)
        >>> x, info = run_in_rounds(il.linear.Neumann(rtol=1e-8), op, b, None, inner)
        >>> torch.allclose(x, b / 2), info.converged
        (True, tensor([True, True]))
    """
    x, r = initial_residual(op, b, x0)
    beta = torch.linalg.vector_norm(r, dim=-1)
    loop = LinearLoop(solver, b, beta)
    another = loop.next_round(beta)
    while another:
        x_new, used = inner(x, r, beta, ~loop.done, loop)
        loop.steps = loop.steps + used
        r_new = b - op.mv(x_new)
        new_beta = torch.linalg.vector_norm(r_new, dim=-1)
        # The round's verdicts on the host, from one read (the next round's check): the
        # device's iterate, norms and flags change only where they are mixed.
        keep, bad, done, beta_h = _judge_round(used, new_beta, beta, loop)
        if keep.all():
            x, r, beta = x_new, r_new, new_beta
        elif keep.any():
            keep_t = from_host(keep[:, None], x)
            x, r = torch.where(keep_t, x_new, x), torch.where(keep_t, r_new, r)
            beta = torch.where(keep_t.squeeze(-1), new_beta, beta)
        if bad is not None:
            loop.bad = from_host(bad, x)
        loop.done = from_host(done, x)
        another = loop.next_round_judged(bool(done.all()), beta_h)
    return x, loop.info(beta)


def _judge_round(
    used: Tensor, new_beta: Tensor, beta: Tensor, loop: LinearLoop
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """A round's verdicts per sample, formed on the host from one read of the steps it
    used, the true residual norms after and before it, the tolerances and the flags: which
    samples keep the round's iterate, which are stopped (``None``: no sample newly), which
    are done, and the residual norms kept (the same comparisons as on the device).

    A sample that went through a round without reducing its true residual stagnates: it is
    stopped, and keeps its previous iterate if the round made it worse. NaN is kept, for the
    check to see."""
    columns = [used, new_beta, beta, loop.tol, loop.done]
    bad_before = loop.bad_if_any
    host = to_host(torch.stack(columns if bad_before is None else columns + [bad_before]))
    used_h, new_h, beta_h, tol_h = host[0], host[1], host[2], host[3]
    started = host[4] == 0
    bad_h = host[5] != 0 if bad_before is not None else np.zeros_like(started)
    worked = used_h > 0
    stalled = worked & ~(new_h < beta_h) & (new_h > tol_h)
    stopped = (started & ~worked) | stalled
    bad = bad_h | stopped
    keep = worked & ~(new_h > beta_h)
    kept = np.where(keep, new_h, beta_h)
    return keep, bad if stopped.any() else None, (kept <= tol_h) | bad, kept
