"""Picard (fixed-point) iteration with optional damping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import GraphedSolverKeywords, check_nonnegative
from .._cuda_graph import Chunk, graph_runner
from .._info import SolveInfo
from .._problem import Problem
from ._base import ForwardSolver
from ._window import ChunkAdvance, WindowMonitor

__all__ = ["Picard", "picard_step", "damped_step", "picard_chunk", "picard_chunks", "map_and_residual"]


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
        max_steps: iteration limit (default 500).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).
        cuda_graph: record each chunk of ``check_every`` steps as a CUDA graph once and
            replay it (default ``False``); CUDA tensors of fixed shapes, a map free of host
            synchronisation, and no autograd recording of the loop (not with
            ``backward=Unrolled()``). See ``docs/guides/deq.md``, "CUDA graphs".

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
    supports_cuda_graph = True

    def __init__(self, damping: float = 1.0, **settings: Unpack[GraphedSolverKeywords]) -> None:
        super().__init__(**settings)
        self.damping = check_nonnegative(damping, "damping", allow_none=False)
        if self.damping == 0:
            raise ValueError("damping must be > 0, got 0.")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        # Plain fixed-point iteration keeps f(z): the next iterate is f(z) itself rather than
        # z - (z - f(z)), one subtraction less per step (and no rounding from it).
        plain = problem.has_fixed_point_map and self.damping == 1.0
        z = z0
        if plain:
            fmap = problem.fixed_point_map
            fz, r = map_and_residual(fmap, z)
        else:
            def residual(v: Tensor) -> Tensor:
                return problem.residual(v, create_graph=differentiable)

            r = residual(z)
        # The bookkeeping runs at the checks only: a step is the map and one subtraction.
        mon = WindowMonitor(self, problem, z, r)
        graphs = graph_runner(self.name, self.cuda_graph, z, recording=differentiable)
        # One loop (mon.iterate); the variants differ in how they advance.
        advance: Callable[[int], int]
        if graphs is not None:
            step = fmap if plain else residual
            Z = z.new_empty(z.shape[0], mon.check_every, z.shape[1])
            state = (fz, Z, torch.empty_like(Z)) if plain else (z, r, Z, torch.empty_like(Z))
            chunk_of = picard_chunks(step, plain, self.damping, mon.check_every)
            advance = ChunkAdvance(mon, graphs, self.max_steps, chunk_of, state)
        else:
            def advance(taken: int) -> int:
                nonlocal z, fz, r
                if plain:
                    z, fz, r = picard_step(fmap, fz)
                else:
                    z, r = damped_step(residual, z, r, self.damping)
                mon.record(z, r)
                return 1

        mon.iterate(self.max_steps, advance)
        return mon.finish()


def picard_step(f: Callable[[Tensor], Tensor], fz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One plain step from ``z`` given ``f(z)``: the new iterate ``z' = f(z)``, ``f(z')`` and
    the residual ``z' - f(z')``, all ``(B, n)``. Free of host synchronisation and Python
    branches on data (it compiles with ``torch.compile(fullgraph=True)``)."""
    return (fz, *map_and_residual(f, fz))


def map_and_residual(f: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``f(z)`` and the fixed-point residual ``z - f(z)``, both ``(B, n)``."""
    fz = f(z)
    return fz, z - fz


def damped_step(
    residual: Callable[[Tensor], Tensor], z: Tensor, r: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """One damped step ``z' = z - damping · r`` and its residual, both ``(B, n)``."""
    z = z - r if damping == 1.0 else torch.add(z, r, alpha=-damping)
    return z, residual(z)


def picard_chunks(
    step: Callable[[Tensor], Tensor], plain: bool, damping: float, check_every: int
) -> Callable[[int, int], tuple[int, Chunk, bool]]:
    """The ``chunk_of`` of :class:`~implicit_layers.solvers._window.ChunkAdvance` for Picard
    steps (see :func:`picard_chunk`): chunks keyed by their length, recorded as graphs when
    they are ``check_every`` steps long."""

    def chunk_of(w: int, taken: int) -> tuple[int, Chunk, bool]:
        return w, picard_chunk(step, plain, damping, w), w == check_every

    return chunk_of


def picard_chunk(
    step: Callable[[Tensor], Tensor], plain: bool, damping: float, w: int
) -> Chunk:
    """``w`` steps as one chunk for :class:`~implicit_layers._cuda_graph.ChunkGraphs`.

    Plain (``step`` the map ``f``): state ``(f(z), Z, R)``. Damped (``step`` the residual):
    state ``(z, r, Z, R)``. Iterate and residual of step ``j`` go to ``Z[:, j]`` and
    ``R[:, j]`` (window buffers ``(B, W, n)``, ``W >= w``).
    """
    if plain:
        def plain_chunk(fz: Tensor, Z: Tensor, R: Tensor) -> tuple[Tensor, ...]:
            for j in range(w):
                z, fz, r = picard_step(step, fz)
                Z[:, j].copy_(z)
                R[:, j].copy_(r)
            return fz, Z, R

        return plain_chunk

    def damped_chunk(z: Tensor, r: Tensor, Z: Tensor, R: Tensor) -> tuple[Tensor, ...]:
        for j in range(w):
            z, r = damped_step(step, z, r, damping)
            Z[:, j].copy_(z)
            R[:, j].copy_(r)
        return z, r, Z, R

    return damped_chunk
