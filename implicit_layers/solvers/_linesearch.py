"""Per-sample backtracking (Armijo) line search shared by the argmin solvers."""

from __future__ import annotations

import torch
from torch import Tensor

from .._problem import Problem


def backtracking(
    problem: Problem,
    z: Tensor,
    value: Tensor,
    grad: Tensor,
    direction: Tensor,
    active: Tensor,
    differentiable: bool,
    *,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_trials: int = 30,
) -> tuple[Tensor, Tensor, Tensor]:
    """Find per-sample steps ``t`` with ``L(z + t d) <= L(z) + c1 t ∇L·d``, starting at ``t = 1``.

    Samples that are not ``active`` do not move. Returns the new iterate, its values and its
    gradient. A sample that finds no acceptable step in ``max_trials`` halvings keeps the
    smallest trial step (its residual then reports the lack of progress).

    Deciding whether another trial is needed synchronises with the device once per trial (on
    well-scaled problems the first trial is accepted, so about once per solver step): the price
    of an exact per-sample line search. :class:`GradientDescent` has none.
    """
    slope = (grad * direction).sum(-1)
    # Near the minimum the decrease c1 t ∇L·d falls below the rounding error of L itself and
    # the value test rejects every step, stalling the solver above its tolerance. There the
    # "approximate Armijo" test of Hager & Zhang (2005) decides from the new slope, which stays
    # accurate: L may not rise by more than eps_f and ∇L(z + t d)·d <= (2 c1 - 1) ∇L(z)·d.
    eps_f = 1e-6 * value.abs()
    t = active.to(z.dtype)
    for _ in range(max_trials):
        z_new = z + t.unsqueeze(-1) * direction
        v_new, g_new = problem.value_and_grad(z_new, create_graph=differentiable)
        armijo = v_new <= value + c1 * t * slope
        slope_new = (g_new * direction).sum(-1)
        approx = (v_new <= value + eps_f) & (slope_new <= (2 * c1 - 1) * slope)
        ok = (armijo | approx) & torch.isfinite(v_new)
        ok = ok | ~active
        if bool(ok.all()):
            break
        t = torch.where(ok, t, t * shrink)
    return z_new, v_new, g_new


def descent_step(
    problem: Problem, z: Tensor, value: Tensor, grad: Tensor, direction: Tensor, active: Tensor,
    differentiable: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`backtracking` along ``direction`` ``(B, n)``, or along ``-grad`` for the samples
    where ``direction`` is no descent direction (a quasi-Newton or inexact Newton direction
    can fail to be one)."""
    descent = (grad * direction).sum(-1) < 0
    direction = torch.where(descent.unsqueeze(-1), direction, -grad)
    return backtracking(problem, z, value, grad, direction, active, differentiable)


def where_active(
    active: Tensor, new: tuple[Tensor, Tensor, Tensor], old: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``new`` iterate ``(B, n)``, value ``(B,)`` and gradient ``(B, n)`` for the samples
    that are ``active`` ``(B,)``, the ``old`` ones for the others."""
    mask = active.unsqueeze(-1)
    return (
        torch.where(mask, new[0], old[0]),
        torch.where(active, new[1], old[1]),
        torch.where(mask, new[2], old[2]),
    )
