"""Picard (fixed-point) iteration with optional damping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._config import check_tolerance
from .._info import OnFailure, SolveInfo
from .._problem import Problem
from ._base import ForwardSolver
from ._window import WindowMonitor

__all__ = ["Picard", "picard_step", "damped_step"]


class Picard(ForwardSolver):
    """Damped fixed-point iteration ``z ← z - damping · F(z)``.

    For a fixed point (``F(z) = z - f(z)``) this is ``z ← (1 - damping) z + damping f(z)``,
    which converges linearly when ``f`` is contractive; for a root it is a Richardson step.
    One evaluation of ``f`` per step. Also accepts argmin problems, where it is gradient
    descent with step ``damping`` (prefer :class:`GradientDescent` there).

    Used as ``solver=`` of :func:`~implicit_layers.fixed_point`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        damping: step weight ``> 0`` (default ``1``: plain iteration); values in ``(0, 1]``
            keep a contractive fixed-point map contractive. The one positional argument.
        rtol: relative tolerance; ``None`` (default) means ``1e-10`` in float64, ``1e-5`` in
            float32, ``1e-3`` in float16 and ``1e-2`` in bfloat16.
        atol: absolute tolerance (default ``0.0``).
        max_steps: iteration limit (default 500).
        check_every: steps between convergence checks (each a device synchronisation); ``None``
            (default) means every step on the CPU, every 8 on accelerators.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what happens when a
            sample does not converge (see :class:`ForwardSolver`).

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``damping`` is
            passed positionally.
        ValueError: if a setting is out of range (``damping <= 0``, ``rtol < 0``, ...).

    Examples:
        >>> z = il.fixed_point(torch.cos, torch.zeros(3, dtype=torch.float64),
        ...                    solver=il.solvers.Picard(max_steps=200))
        >>> torch.allclose(z, torch.cos(z))
        True
        >>> il.solvers.Picard(0.5, rtol=1e-6)
        Picard(damping=0.5, rtol=1e-06)
    """

    name = "Picard"

    def __init__(
        self,
        damping: float = 1.0,
        *,
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
        self.damping = check_tolerance(damping, "damping", allow_none=False)
        if self.damping == 0:
            raise ValueError("damping must be > 0, got 0.")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        # Plain fixed-point iteration keeps f(z): the next iterate is f(z) itself rather than
        # z - (z - f(z)), one subtraction less per step (and no rounding from it).
        plain = problem.kind == "fixed_point" and self.damping == 1.0
        z = z0
        if plain:
            fmap = problem.fixed_point_map
            fz = fmap(z)
            r = z - fz
        else:
            def residual(v: Tensor) -> Tensor:
                return problem.residual(v, create_graph=differentiable)

            r = residual(z)
        # The bookkeeping runs at the checks only: a step is the map and one subtraction.
        mon = WindowMonitor(self, problem, z, r)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            if plain:
                z, fz, r = picard_step(fmap, fz)
            else:
                z, r = damped_step(residual, z, r, self.damping)
            mon.record(z, r)
        return mon.finish()


def picard_step(f: Callable[[Tensor], Tensor], fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One plain step from ``z`` given ``f(z)``: the new iterate ``z' = f(z)``, ``f(z')`` and
    the residual ``z' - f(z')``, all ``(B, n)``. Free of host synchronisation and Python
    branches on data (it compiles with ``torch.compile(fullgraph=True)``)."""
    z = fz
    fz = f(z)
    return z, fz, z - fz


def damped_step(
    residual: Callable[[Tensor], Tensor], z: Tensor, r: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """One damped step ``z' = z - damping · r`` and its residual, both ``(B, n)``."""
    z = z - r if damping == 1.0 else torch.add(z, r, alpha=-damping)
    return z, residual(z)
