"""Anderson acceleration (type II) with per-sample mixing weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from typing_extensions import Unpack

from .._config import GraphedSolverKeywords, check_nonnegative, check_positive_int
from .._cuda_graph import Chunk, ChunkGraphs, graph_runner
from .._info import SolveInfo
from .._problem import FixedPointProblem, Problem, RootProblem
from ._base import ForwardSolver
from ._window import ChunkAdvance, WindowMonitor

__all__ = ["Anderson", "anderson_step"]


@torch.compiler.disable  # a host-side question, never part of a graph
def _no_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries no forward-mode tangent (``torch.func`` or a dual tensor)."""
    return (
        not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and forward_ad.unpack_dual(t).tangent is None
    )


class Anderson(ForwardSolver):
    """Anderson acceleration of the map ``G(z) = z - F(z)`` (``= f(z)`` for fixed points).

    Each step mixes the last ``memory`` map values with weights that minimise the norm of the
    mixed residual, solved per batch element (every sample gets its own weights), then takes
    ``z ← β Σ α_i G(z_i) + (1 - β) Σ α_i z_i``. One evaluation of ``f`` per step, plus a tiny
    ``(memory × memory)`` solve per sample.

    Used as ``solver=`` of :func:`~implicit_layers.fixed_point`; it iterates on the flat ``(B, n)``
    state (``B = 1`` unbatched) and returns the solution shaped like ``z0``.

    Args:
        memory: number of past iterates mixed (``m``; default 5); the one positional argument.
        mixing: ``β`` in ``(0, 1]`` (default 1).
        regularization: Tikhonov term relative to the largest diagonal of the Gram matrix,
            keeping the mixing solve well posed; ``None`` (default) means ``100 · eps`` of the
            dtype.
        max_steps: iteration limit (default 500).
        rtol, atol, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`).
        cuda_graph: record each chunk of ``check_every`` steps as a CUDA graph once and
            replay it (default ``False``), once the history is full (the first ``memory``
            steps run eagerly); see :class:`Picard` and ``docs/guides/deq.md``.

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``memory`` is
            passed positionally.
        ValueError: if a setting is out of range (``memory < 1``, ``mixing`` outside
            ``(0, 1]``, ``regularization < 0``, ...).

    Examples:
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        >>> z, info = il.fixed_point(lambda z, x: 0.5 * torch.cos(z) + x,
        ...                          torch.zeros(3, dtype=torch.float64), x,
        ...                          solver=il.solvers.Anderson(3), return_info=True)
        >>> torch.allclose(z, 0.5 * torch.cos(z) + x), info.solver
        (True, 'Anderson')
    """

    name = "Anderson"
    supports_cuda_graph = True
    problems = (FixedPointProblem, RootProblem)

    def __init__(
        self,
        memory: int = 5,
        *,
        mixing: float = 1.0,
        regularization: float | None = None,
        **settings: Unpack[GraphedSolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.memory = check_positive_int(memory, "memory")
        self.mixing = check_nonnegative(mixing, "mixing", allow_none=False)
        if not 0 < self.mixing <= 1:
            raise ValueError(f"mixing must lie in (0, 1], got {mixing}.")
        self.regularization = check_nonnegative(regularization, "regularization")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        reg = self.regularization
        if reg is None:
            reg = 100 * torch.finfo(z0.dtype).eps
        beta = self.mixing
        finfo = torch.finfo(z0.dtype)
        # Residual norms in this range have Gram entries far from under- and overflow.
        safe = (finfo.tiny**0.25, finfo.max**0.25)
        z = z0
        r = problem.residual(z, create_graph=differentiable)
        # Bookkeeping at the checks only; converged samples keep mixing (every sample has its
        # own weights, so they do not disturb the others) and are never returned past the
        # iterate that met the tolerance.
        mon = WindowMonitor(self, problem, z, r, safe=safe)
        graphs = graph_runner(self.name, self.cuda_graph, z, recording=differentiable)
        # The history: residuals r_i and mixed map values g_i = z_i - β r_i (the next iterate
        # is Σ α_i g_i). Without autograd they live in two preallocated ring buffers written in
        # place; the differentiable (unrolled) path keeps lists, as in-place writes would break
        # autograd. One loop: the two histories differ only in how they take a step.
        history = (
            _ListHistory(self.memory, beta) if differentiable
            else _RingHistory(z, r, self.memory, beta)
        )
        ones = torch.ones(z.shape[0], 1, self.memory, dtype=z.dtype, device=z.device)
        # A fixed point's residual z - f(z) written straight into the ring slot that keeps it
        # (no copy there): the monitor holds it until the next check, within `memory` steps.
        into_ring = (
            isinstance(history, _RingHistory) and history.fused and problem.has_fixed_point_map
            and mon.check_every <= self.memory
        )

        def step(taken: int) -> int:
            nonlocal z, r
            # On the CPU (a check every step) the check also tells whether the residual norms
            # are in the safe range, which skips the rescaling pass.
            rescale = mon.check_every != 1 or not mon.res_in_safe_range
            z = history.step(z, r, ones, reg, rescale)
            if into_ring:
                assert isinstance(history, _RingHistory)
                r = history.residual_into_ring(problem.fixed_point_map, z)
            else:
                r = problem.residual(z, create_graph=differentiable)
            mon.record(z, r)
            return 1

        # One loop (mon.iterate); the variants differ in how they advance.
        advance: Callable[[int], int] = step
        if graphs is not None:  # (graphs only without autograd: the history is the ring)
            assert isinstance(history, _RingHistory)
            advance = self._graphed(problem, z, r, history, ones, mon, graphs, reg)
        mon.iterate(self.max_steps, advance)
        return mon.finish()

    def _graphed(
        self, problem: Problem, z: Tensor, r: Tensor, ring: _RingHistory, ones: Tensor,
        mon: WindowMonitor, graphs: ChunkGraphs, reg: float,
    ) -> Callable[[int], int]:
        """The advance of the loop in chunks of ``check_every`` steps (``cuda_graph=True``),
        with the same iterates as the step-by-step loop: the history in the same ring-buffer
        slots, the slot of the next write kept on the device once the history is full."""
        m, beta = self.memory, self.mixing
        G_buf, R_buf = ring.G, ring.R
        slot = torch.zeros(1, dtype=torch.int64, device=z.device)

        def filling(w: int, taken: int) -> Chunk:
            """Steps ``taken`` to ``taken + w`` while the history fills (run eagerly, once)."""
            def chunk(z: Tensor, r: Tensor, Z: Tensor, R: Tensor) -> tuple[Tensor, ...]:
                for j in range(w):
                    z = ring.step(z, r, ones, reg, True)
                    r = problem.residual(z)
                    Z[:, j].copy_(z)
                    R[:, j].copy_(r)
                slot.fill_((taken + w) % m)
                return z, r, Z, R

            return chunk

        def full(w: int) -> Chunk:
            def chunk(z: Tensor, r: Tensor, Z: Tensor, R: Tensor) -> tuple[Tensor, ...]:
                for j in range(w):
                    G_buf.index_copy_(1, slot, torch.sub(z, r, alpha=beta).unsqueeze(1))
                    R_buf.index_copy_(1, slot, r.unsqueeze(1))
                    slot.add_(1).remainder_(m)
                    z = anderson_step(G_buf, R_buf, ones, reg)
                    r = problem.residual(z)
                    Z[:, j].copy_(z)
                    R[:, j].copy_(r)
                return z, r, Z, R

            return chunk

        def chunk_of(w: int, taken: int) -> tuple[object, Chunk, bool]:
            if taken < m:
                return None, filling(w, taken), False
            return w, full(w), w == mon.check_every

        Z = z.new_empty(z.shape[0], mon.check_every, z.shape[1])
        return ChunkAdvance(mon, graphs, self.max_steps, chunk_of, (z, r, Z, torch.empty_like(Z)))


class _ListHistory:
    """The last ``memory`` residuals ``r_i`` and mixed map values ``g_i = z_i - β r_i`` as
    lists of tensors, and the Anderson step on them: new tensors at every step, so that
    autograd may record them (the unrolled backward; :class:`~implicit_layers.solvers.Adaptive`
    after a switch).

    Args:
        memory: the number of entries kept.
        beta: the mixing ``β``.
    """

    def __init__(self, memory: int, beta: float) -> None:
        self.memory = memory
        self.beta = beta
        self.gs: list[Tensor] = []
        self.rs: list[Tensor] = []

    def step(self, z: Tensor, r: Tensor, ones: Tensor, reg: float, rescale: bool) -> Tensor:
        """Add the iterate ``z`` (residual ``r``, both ``(B, n)``) to the history and return
        the next iterate; ``ones``, ``reg`` and ``rescale`` as for :func:`anderson_step`."""
        g = z - r if self.beta == 1.0 else torch.sub(z, r, alpha=self.beta)
        self.gs.append(g)
        self.rs.append(r)
        if len(self.gs) > self.memory:
            self.gs.pop(0)
            self.rs.pop(0)
        k = len(self.gs)
        if k == 1:
            return g
        G, R = torch.stack(self.gs, dim=1), torch.stack(self.rs, dim=1)
        return anderson_step(G, R, ones[..., :k], reg, rescale)

    def clear(self) -> None:
        """Forget every entry."""
        self.gs.clear()
        self.rs.clear()


class _RingHistory:
    """The same history and step as :class:`_ListHistory` in two ring buffers ``G``, ``R``
    of shape ``(B, memory, n)`` allocated once and written in place (no autograd): slot ``i``
    holds step ``i`` modulo ``memory`` (the order of the history does not matter).

    Args:
        z, r: the initial iterate and its residual ``(B, n)`` (shape, dtype, device; and
            whether they carry forward-mode tangents).
        memory: the number of entries kept.
        beta: the mixing ``β``.
    """

    def __init__(self, z: Tensor, r: Tensor, memory: int, beta: float) -> None:
        self.memory = memory
        self.beta = beta
        self.G = z.new_empty(z.shape[0], memory, z.shape[1])
        self.R = torch.empty_like(self.G)
        # the views of every slot, made once (a view is an op too)
        self.G_slots, self.R_slots = self.G.unbind(1), self.R.unbind(1)
        self.RT = self.R.mT  # the Gram product's transpose, once the ring is full
        # out= writes have no forward-mode derivative: not with tangents (jvp, dual)
        # (nor when compiled: the compiler writes the history as it sees fit)
        self.fused = not torch.compiler.is_compiling() and _no_tangent(z) and _no_tangent(r)
        self.count = 0
        self._kept: Tensor | None = None  # the slot that already holds the next residual

    def residual_into_ring(self, fmap: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
        """The fixed-point residual ``z - f(z)`` ``(B, n)``, written into the slot where the
        next :meth:`step` keeps it (a view of the ring, valid for ``memory`` steps)."""
        slot = self.R_slots[self.count % self.memory]
        torch.sub(z, fmap(z), out=slot)
        self._kept = slot
        return slot

    def step(self, z: Tensor, r: Tensor, ones: Tensor, reg: float, rescale: bool) -> Tensor:
        """As :meth:`_ListHistory.step`."""
        m = self.memory
        slot = self.count % m
        g = self.G_slots[slot]
        if self.fused:
            torch.sub(z, r, alpha=self.beta, out=g)
        else:
            g.copy_(torch.sub(z, r, alpha=self.beta))
        if r is not self._kept:
            self.R_slots[slot].copy_(r)
        self._kept = None
        self.count += 1
        k = min(self.count, m)
        if k == 1:
            # a copy: the ring slot is overwritten later, the monitor keeps the iterate
            return g.clone()
        if k == m:
            return anderson_step(self.G, self.R, ones, reg, rescale, self.RT)
        return anderson_step(self.G[:, :k], self.R[:, :k], ones[..., :k], reg, rescale)


def anderson_step(
    G: Tensor, R: Tensor, ones: Tensor, reg: float, rescale: bool = True, RT: Tensor | None = None
) -> Tensor:
    """The next Anderson iterate from a history of ``m`` steps, per sample.

    The mixing weights minimise ``‖Σ α_i r_i‖`` subject to ``Σ α_i = 1`` (the order of the
    history is irrelevant); the next iterate is ``Σ α_i g_i``. Free of host synchronisation
    and of Python branches on data (it compiles with ``torch.compile(fullgraph=True)``).

    Args:
        G: mixed map values ``g_i = z_i - β r_i``, shape ``(B, m, n)``.
        R: residuals ``r_i``, shape ``(B, m, n)``.
        ones: ``(B, 1, m)`` ones (the right-hand side of the mixing system, as a row).
        reg: Tikhonov term relative to the largest diagonal entry of the Gram matrix.
        rescale: divide the residuals by their largest entry first. The weights do not depend
            on the scale of the residuals; this keeps the Gram matrix away from underflow
            (residuals of 1e-160 have a Gram matrix of 0 in float64) and from overflow.
        RT: ``R.mT`` made beforehand (a view is an op too), used when not rescaling.

    Returns:
        The next iterate, ``(B, n)``.
    """
    tiny = torch.finfo(R.dtype).tiny
    if rescale:
        # max |R| per sample in one op (the infinity norm over both dimensions)
        top = torch.linalg.vector_norm(R, ord=float("inf"), dim=(-2, -1), keepdim=True)
        R, RT = R / top.clamp_min(tiny), None
    H = torch.bmm(R, R.mT if RT is None else RT)
    if H.dtype != ones.dtype:  # autocast ran the product in lower precision: solve in z's
        H = H.to(ones.dtype)
    diag = H.diagonal(dim1=-2, dim2=-1)
    peak = diag.amax(-1, keepdim=True).clamp_min(tiny)
    if H.requires_grad:
        H = H + torch.diag_embed((reg * peak).expand_as(diag))
    else:
        # H + reg · max_i H_ii · I, added to the diagonal in place
        diag.add_(peak, alpha=reg)
    # The weights as a row: w H = 1 (H is symmetric). solve_ex without error checks: no
    # device synchronisation per step; the regularisation keeps H invertible and NaN is
    # caught by the monitor.
    w = torch.linalg.solve_ex(H, ones, left=False, check_errors=False)[0]
    # row-vector batched product: one pass over the history, no (B, m, n) temporary
    z = torch.bmm(w / w.sum(-1, keepdim=True), G).squeeze(1)
    # under autocast the product comes back in lower precision; the iterate keeps its dtype
    return z if z.dtype == G.dtype else z.to(G.dtype)
