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

import torch
from torch import Tensor

from .._info import SolveInfo
from ._base import LinearSolver, initial_residual, should_stop
from ._operator import LinearOperator

# inner(x, r, beta, active, tol, check_every, total) -> (x, used, total)
#   x, r: current iterate and its true residual b - A x, shape (B, n)
#   beta: ‖r‖, shape (B,); active: samples to iterate, shape (B,)
#   total: steps used so far by the batch (the round may use max_steps - total more)
#   returns the new iterate, per-sample steps used in the round, and the new batch total.
Inner = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor, int]]


def run_in_rounds(
    solver: LinearSolver, op: LinearOperator, b: Tensor, x0: Tensor | None, inner: Inner
) -> tuple[Tensor, SolveInfo]:
    _, tol, check_every = solver._setup(op, b)
    batch = b.shape[0]
    x, r = initial_residual(op, b, x0)
    beta = torch.linalg.vector_norm(r, dim=-1)
    bad = torch.zeros(batch, dtype=torch.bool, device=b.device)
    done = beta <= tol
    steps = torch.zeros(batch, dtype=torch.int64, device=b.device)
    total = 0
    while not should_stop(done, beta, solver.name) and total < solver.max_steps:
        started = ~done
        x_new, used, total = inner(x, r, beta, started, tol, check_every, total)
        steps = steps + used
        r_new = b - op.mv(x_new)
        new_beta = torch.linalg.vector_norm(r_new, dim=-1)
        worked = used > 0
        bad = bad | (started & ~worked) | (worked & ~(new_beta < beta) & (new_beta > tol))
        keep = worked & ~(new_beta > beta)  # a round that made things worse is undone
        x = torch.where(keep.unsqueeze(-1), x_new, x)
        r = torch.where(keep.unsqueeze(-1), r_new, r)
        beta = torch.where(keep, new_beta, beta)
        done = (beta <= tol) | bad
    converged = (beta <= tol) & ~bad
    return x, solver._info(converged, steps, beta, tol)
