"""Neumann series (Richardson iteration)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._config import StoppingKeywords, check_nonnegative, check_positive_int
from .._cuda_graph import ChunkGraphs, graph_runner
from .._info import SolveInfo
from ._base import LinearSolver, initial_residual
from ._loop import LinearLoop
from ._operator import LinearOperator
from ._power import power_iteration

__all__ = ["Neumann", "neumann_step"]


class _NeumannKeywords(StoppingKeywords, total=False):
    cuda_graph: bool


class Neumann(LinearSolver):
    """Truncated Neumann series ``x = α Σ_{j<k} (I - α A)^j b``.

    Computed as Richardson iteration ``x ← x + α (b - A x)``, so the residual is known at every
    term and the series stops early once it meets the tolerance. ``k = max_steps`` terms with
    ``rtol=0`` reproduce backpropagation through ``k`` steps of gradient descent (step ``α``)
    from the solution (Lorraine et al., 2020).

    The series converges only if every eigenvalue of ``α A`` lies in ``(0, 2)``; a diverging
    series is reported (warning or :class:`NonFiniteError`), never returned silently.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        max_steps: number of terms ``k`` (default 100); the one positional argument.
        alpha: step size ``α > 0``. ``None`` (default) picks ``1 / (1.1 λ_max)`` for operators
            tagged symmetric, with ``λ_max`` estimated by ``power_steps`` power iterations, and
            ``1`` for the others (the natural choice for fixed points, where ``A = I - J``; it
            diverges when an eigenvalue of ``A`` lies outside ``(0, 2)``).
        power_steps: power iterations used to estimate ``λ_max`` when ``alpha`` is ``None``
            (default 20).
        rtol, atol, check_every, on_failure: as for every linear solver
            (:class:`~implicit_layers.linear.LinearSolver`).
        cuda_graph: record each chunk of ``check_every`` steps as a CUDA graph once and
            replay it (default ``False``): CUDA tensors, a product free of host
            synchronisation, the solve under ``torch.no_grad()`` (as in an implicit
            backward). A product through autograd (the implicit backward) is captured only
            on a non-default CUDA stream; on the default stream the loop runs eagerly, with
            a warning. See ``docs/guides/deq.md``, "CUDA graphs".

    Raises:
        TypeError: if a setting has the wrong type or a setting other than ``max_steps`` is
            passed positionally.
        ValueError: if a setting is out of range (``alpha <= 0``, ``max_steps < 1``, ...).

    Examples:
        >>> A = torch.tensor([[1.0, 0.2], [0.1, 0.8]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> x, info = il.linear.solve(A, b, il.linear.Neumann(200, alpha=1.0))
        >>> torch.allclose(x, torch.linalg.solve(A, b)), bool(info.converged)
        (True, True)

        A fixed number of terms, as in truncated backpropagation (``rtol=0``: no early stop):

        >>> x, info = il.linear.solve(A, b, il.linear.Neumann(3, alpha=1.0, rtol=0.0,
        ...                                                   on_failure="ignore"))
        >>> int(info.steps)
        3
    """

    name = "Neumann"
    supports_cuda_graph = True
    default_max_steps = 100

    def __init__(
        self,
        max_steps: int | None = None,
        *,
        alpha: float | None = None,
        power_steps: int = 20,
        **settings: Unpack[_NeumannKeywords],
    ) -> None:
        super().__init__(max_steps=max_steps, **settings)
        self.alpha = check_nonnegative(alpha, "alpha")
        if self.alpha == 0:
            raise ValueError("alpha must be > 0, got 0.")
        self.power_steps = check_positive_int(power_steps, "power_steps")

    def _step_size(self, op: LinearOperator, b: Tensor) -> Tensor:
        if self.alpha is not None:
            return torch.full((b.shape[0], 1), self.alpha, dtype=b.dtype, device=b.device)
        lam = power_iteration(op.mv, b, self.power_steps)
        # 10% margin: the power estimate approaches λ_max from below.
        return (1.0 / (1.1 * lam.clamp_min(torch.finfo(b.dtype).tiny))).unsqueeze(-1)

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        unit = self.alpha == 1.0 or (self.alpha is None and not op.symmetric)
        # a unit step multiplies by nothing (no step-size tensor, no power iteration)
        step_size = None if unit else self._step_size(op, b)
        x, r = initial_residual(op, b, x0)
        res = torch.linalg.vector_norm(r, dim=-1)
        loop = LinearLoop(self, b, res)
        graphs = graph_runner(
            self.name, self.cuda_graph, b, recording=torch.is_grad_enabled(),
            autograd_products=True,
        )
        tol = loop.tol.unsqueeze(-1)
        # One loop; the variants differ in their step. The state is (x, r, mask, steps, res),
        # per-sample entries as (B, 1) columns; ``mask`` is nonzero for the samples stepping.
        step: Callable[..., tuple[Tensor, ...]]
        if torch.is_grad_enabled():
            # Autograd may record the products: bool masks applied by ``where`` (no NaN of a
            # done sample reaches a gradient), in-place updates only when nothing records.
            mask: Tensor = (~loop.done).unsqueeze(-1)
            steps = loop.steps.unsqueeze(-1)
            step = self._recorded_step(op, b, step_size, tol, loop)
        else:
            # Nothing records: in-place updates under a float mask (1: stepping, 0: done),
            # six ops per step besides the product and no synchronisation between checks;
            # with ``graphs``, the steps between two checks run as one chunk.
            mask = (~loop.done).unsqueeze(-1).to(x.dtype)
            steps = torch.zeros_like(mask)
            step = (
                partial(_graphed_steps, graphs, op.mv, tol, step_size, loop) if graphs is not None
                else _InPlaceSteps(op.mv, tol, step_size, loop)
            )
        state: tuple[Tensor, ...] = (x, r, mask, steps, res.unsqueeze(-1))
        if isinstance(step, _InPlaceSteps):
            # the mask is the comparison res > tol: the checks count it on the host
            while loop.proceed_above(state[4], tol):
                state = step(*state)
            step.write_mask(state[4], state[2])
        else:
            while loop.proceed(state[4], active=state[2]):
                state = step(*state)
        x, _, mask, steps, res = state
        if isinstance(step, _InPlaceSteps) and step.uniform:
            steps = steps + step.uniform
        loop.done = (mask == 0).squeeze(-1)
        loop.steps = steps.squeeze(-1).to(torch.int64)
        return x, loop.info(res.squeeze(-1))

    @staticmethod
    def _recorded_step(
        op: LinearOperator, b: Tensor, alpha: Tensor | None, tol: Tensor, loop: LinearLoop
    ) -> Callable[..., tuple[Tensor, ...]]:
        """The step of a solve that autograd may record, on bool masks and int64 counts."""

        def step(
            x: Tensor, r: Tensor, active: Tensor, steps: Tensor, res: Tensor
        ) -> tuple[Tensor, ...]:
            dx = r if alpha is None else alpha * r
            Ms = op.mv(dx)
            if loop.all_active:
                # No sample is done (known from this step's check): no masks.
                if loop.inplace(b, Ms, x):
                    x.add_(dx)
                    r.sub_(Ms)
                else:
                    x = x + dx
                    r = r - Ms
                steps += 1
            else:
                loop.inplace(b, Ms, x)
                x = torch.where(active, x + dx, x)
                r = torch.where(active, r - Ms, r)
                steps = steps + active.long()
            res = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
            return x, r, active & ~(res <= tol), steps, res

        return step

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps} terms) or use CG (symmetric) / GMRES: the "
            "Neumann series converges slowly when the operator is ill-conditioned, and not at "
            "all when alpha times an eigenvalue leaves (0, 2)."
        )


def _in_place_step(
    mv: Callable[[Tensor], Tensor], tol: Tensor, alpha: Tensor | None, x: Tensor, r: Tensor,
    mask: Tensor, steps: Tensor, res: Tensor,
) -> tuple[Tensor, ...]:
    """:func:`neumann_step` on the loop state ``(x, r, mask, steps, res)`` (``steps`` is
    updated in place)."""
    x, r, res, _, _ = neumann_step(mv, x, r, mask, steps, tol, alpha)
    return x, r, mask, steps, res


class _InPlaceSteps:
    """:func:`neumann_step` on the loop state, step by step; a step that follows a check which
    found every sample stepping is counted on the host (:attr:`uniform`, added to the counts
    once at the end) instead of by an op on the device, and updates every sample without the
    mask, whose comparison is then made only when a step needs it (:meth:`write_mask`)."""

    def __init__(
        self, mv: Callable[[Tensor], Tensor], tol: Tensor, alpha: Tensor | None, loop: LinearLoop
    ) -> None:
        self.mv, self.tol, self.alpha, self.loop = mv, tol, alpha, loop
        self.uniform = 0
        self.stale = False  # the mask is not the comparison of the latest norms

    def __call__(
        self, x: Tensor, r: Tensor, mask: Tensor, steps: Tensor, res: Tensor
    ) -> tuple[Tensor, ...]:
        if not self.loop.all_active:
            self.write_mask(res, mask)
            return _in_place_step(self.mv, self.tol, self.alpha, x, r, mask, steps, res)
        self.uniform += 1
        self.stale = True
        x, r, res, _, _ = neumann_step(self.mv, x, r, None, None, self.tol, self.alpha)
        return x, r, mask, steps, res

    def write_mask(self, res: Tensor, mask: Tensor) -> None:
        """The mask of the norms ``res``, ``res > tol``, if the steps since the last one made
        none (each sample stepped)."""
        if self.stale:
            torch.gt(res, self.tol, out=mask)
            self.stale = False


def _graphed_steps(
    graphs: ChunkGraphs, mv: Callable[[Tensor], Tensor], tol: Tensor, alpha: Tensor | None,
    loop: LinearLoop, *state: Tensor,
) -> tuple[Tensor, ...]:
    """The steps up to the next check as one chunk (a replayed CUDA graph) on the loop state:
    :meth:`LinearLoop.proceed` checks when ``k`` is a multiple of ``check_every``, and counts
    the chunk's first step; the others are counted here."""
    w = min(loop.check_every, loop.max_steps - loop.k + 1)

    def chunk(*state: Tensor) -> tuple[Tensor, ...]:
        for _ in range(w):
            state = _in_place_step(mv, tol, alpha, *state)
        return state

    state = graphs.run(w, chunk, state, graph=w == loop.check_every)
    loop.k += w - 1
    return state


def neumann_step(
    mv: Callable[[Tensor], Tensor], x: Tensor, r: Tensor, mask: Tensor | None, steps: Tensor | None,
    tol: Tensor, alpha: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One Richardson step ``x ← x + α r``, ``r ← r - A α r`` for the samples with ``mask`` 1.

    Updates ``x``, ``r``, ``mask`` and ``steps`` in place (no autograd) and returns them with
    the new residual norms. Free of host synchronisation and of Python branches on data (it
    compiles with ``torch.compile(fullgraph=True)``).

    Args:
        mv: the operator product on ``(B, n)``.
        x, r: iterate and residual ``b - A x``, ``(B, n)``.
        mask: ``(B, 1)`` float, 1 for the samples that step, 0 for the done ones; ``None``:
            every sample steps (the mask is then neither read nor written).
        steps: ``(B, 1)`` float step counts; ``None`` only with ``mask`` ``None`` (a step of
            every sample, counted by the caller).
        tol: ``(B, 1)`` tolerances.
        alpha: ``(B, 1)`` step sizes, or ``None`` for 1.

    Returns:
        ``(x, r, res, mask, steps)`` with ``res`` the ``(B, 1)`` residual norms.
    """
    step = r if alpha is None else alpha * r
    Ms = mv(step)
    if mask is None:  # every sample steps
        x.add_(step)
        r.sub_(Ms)
        return x, r, torch.linalg.vector_norm(r, dim=-1, keepdim=True), mask, steps
    assert steps is not None  # a masked step counts its samples
    # times 1 or 0: exact, so a stepping sample gets x + step and a done one keeps x
    x.addcmul_(step, mask)
    r.addcmul_(Ms, mask, value=-1.0)
    steps.add_(mask)
    res = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
    # A done sample's residual no longer moves, so it stays within its tolerance: the new mask
    # is the comparison itself, written straight into the mask.
    torch.gt(res, tol, out=mask)
    return x, r, res, mask, steps
