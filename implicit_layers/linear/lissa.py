"""LiSSA: the stochastic Neumann recursion of Agarwal et al. (2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._config import check_nonnegative, check_positive_int
from .._info import OnFailure, SolveInfo
from ._base import LinearSolver
from ._loop import LinearLoop, check_done
from ._operator import LinearOperator
from ._power import power_iteration

__all__ = ["LiSSA"]

_DEFAULT_RTOL = 1e-2


class LiSSA(LinearSolver):
    """LiSSA: a stochastic estimate of ``(A + damping·scale·I)⁻¹ b`` by a Neumann recursion.

    The "Linear time Stochastic Second-order Algorithm" of Agarwal, Bullins & Hazan (2017), in
    the form Koh & Liang (2017) use for influence functions: inverse-Hessian-vector products
    where ``A`` is a Hessian over a large data set and each product ``A v`` may be a
    Hessian-vector product on a fresh random minibatch. Each repeat runs the recursion

        x_0 = 0,   x_j = b + (1 - damping) x_{j-1} - A_j x_{j-1} / scale

    where ``A_j`` is the operator as applied at step ``j`` (``op.mv`` may sample anew at every
    call), and the estimate is ``y = x_depth / scale``, averaged over ``repeats`` independent
    recursions.

    Which system it solves: the recursion's fixed point satisfies
    ``x = b + (1 - damping) x - A x / scale``, i.e. ``(A / scale + damping I) x = b``, so
    ``y = x / scale`` solves **(A + damping · scale · I) y = b** (with ``A`` the expectation of
    the sampled operators). ``damping = 0`` solves ``A y = b`` itself. The recursion converges
    (for a deterministic operator) when every eigenvalue of ``A / scale + damping I`` lies in
    ``(0, 2)``; choose ``scale`` above the largest eigenvalue of ``A``. Its error contracts by
    ``max |1 - damping - λ / scale|`` per step, so it needs about ``scale / λ_min`` steps: LiSSA
    is meant for huge, stochastic problems, not for accurate solves (use :class:`CG` there).

    Stopping and reporting: ``x_j - x_{j-1}`` equals the residual ``b - (A_j + damping·scale·I)
    y_{j-1}`` of the (sampled) system, so a recursion stops early, per sample, once it meets the
    tolerance, at no extra cost. With a stochastic operator this is a noisy estimate, and
    ``converged`` in the result is decided by one extra product at the end:
    ``‖b - (A + damping·scale·I) y‖ <= max(atol, rtol ‖b‖)``, itself sampled when the operator
    is. Treat the result as an estimate: its error is random, with a variance that falls as
    ``1 / repeats``.

    Cost: ``depth · repeats`` operator products at most, plus one (``scale=None`` adds
    ``power_steps``); memory for three vectors.

    Solves ``(B, n)`` right-hand sides (:meth:`LinearSolver.solve`) and returns ``(x, info)``
    with ``x`` of shape ``(B, n)`` and per-sample :class:`~implicit_layers.SolveInfo`.

    Args:
        rtol: relative tolerance; ``None`` (default) means ``1e-2`` (not the float64 default,
            and not inherited from a forward solver: LiSSA is an estimator and rarely meets
            tight tolerances).
        atol: absolute tolerance (default ``0.0``).
        max_steps: the recursion depth (the base-class name for ``depth``); give one of the
            two, default 1000.
        check_every: steps between convergence checks (each a device synchronisation);
            ``None`` (default) means every step on the CPU, every 8 on accelerators.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what happens when the
            final residual misses the tolerance (see
            :class:`~implicit_layers.linear.LinearSolver`).
        scale: ``scale`` above; must exceed the largest eigenvalue of ``A`` (an upper bound on
            the Hessian's spectral norm). ``None`` (default) estimates it as ``1.1 λ_max``
            with ``power_steps`` power iterations (on a stochastic operator the estimate is
            noisy: pass a safe value instead).
        damping: ``damping`` above, in ``[0, 1)``; adds ``damping · scale`` to the diagonal of
            the system (a ridge that regularises a non-convex Hessian). Default ``0.0``.
        depth: number of recursion steps per repeat; alias of ``max_steps`` (default
            ``None``: use ``max_steps``).
        repeats: number of independent recursions averaged (default 1).
        power_steps: power iterations used when ``scale`` is ``None`` (default 20).

    Raises:
        TypeError: if a setting has the wrong type, or any setting is passed positionally.
        ValueError: if a setting is out of range (``scale <= 0``, ``damping`` outside
            ``[0, 1)``, ``repeats < 1``, ...), or ``depth`` and ``max_steps`` disagree.

    Examples:
        A deterministic operator, so that the estimate is exact to the tolerance:

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> b = torch.ones(3, dtype=torch.float64)
        >>> lissa = il.linear.LiSSA(scale=5.0, depth=200, rtol=1e-6)
        >>> x, info = il.linear.solve(A, b, lissa)
        >>> torch.allclose(x, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), atol=1e-5)
        True
        >>> lissa.depth == lissa.max_steps == 200
        True
    """

    name = "LiSSA"

    _aliases = ("depth",)

    def __init__(
        self,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
        scale: float | None = None,
        damping: float = 0.0,
        depth: int | None = None,
        repeats: int = 1,
        power_steps: int = 20,
    ) -> None:
        if depth is not None:
            check_positive_int(depth, "depth")
            if max_steps is not None and max_steps != depth:
                raise ValueError(
                    f"LiSSA: depth ({depth}) and max_steps ({max_steps}) name the same recursion "
                    "depth; give only one of them."
                )
            max_steps = depth
        super().__init__(
            rtol=_DEFAULT_RTOL if rtol is None else rtol, atol=atol, max_steps=max_steps,
            check_every=check_every, on_failure=on_failure,
        )
        self.scale = check_nonnegative(scale, "scale")
        if self.scale == 0:
            raise ValueError("scale must be > 0 (above the largest eigenvalue of A), got 0.")
        damping_value = check_nonnegative(damping, "damping", allow_none=False)
        if damping_value >= 1:
            raise ValueError(
                f"damping must be in [0, 1), got {damping}; for a larger ridge raise scale "
                "(the ridge added to A is damping * scale)."
            )
        self.damping = damping_value
        self.repeats = check_positive_int(repeats, "repeats")
        self.power_steps = check_positive_int(power_steps, "power_steps")

    @property
    def depth(self) -> int:
        """Recursion depth per repeat (the same as ``max_steps``)."""
        return self.max_steps

    def _scale(self, op: LinearOperator, b: Tensor) -> Tensor:
        if self.scale is not None:
            return torch.full((b.shape[0],), self.scale, dtype=b.dtype, device=b.device)
        lam = power_iteration(op.mv, b, self.power_steps)
        return 1.1 * lam.clamp_min(torch.finfo(b.dtype).tiny)

    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        scale = self._scale(op, b)
        s = scale.unsqueeze(-1)
        keep = 1.0 - self.damping
        steps = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
        total = torch.zeros_like(b)
        for _ in range(self.repeats):
            # One loop per repeat: each recursion restarts with every sample active.
            loop = LinearLoop(self, b)
            x = torch.zeros_like(b) if x0 is None else x0 * s
            res = torch.linalg.vector_norm(b, dim=-1)
            while loop.proceed(res):
                x_new = b + keep * x - op.mv(x) / s
                res = torch.where(loop.done, res, torch.linalg.vector_norm(x_new - x, dim=-1))
                active = ~loop.done
                x = torch.where(active.unsqueeze(-1), x_new, x)
                loop.steps = loop.steps + active.long()
                loop.done = loop.done | (res <= loop.tol)
            loop.info(res)  # the finiteness test, unless the last check made it
            steps = steps + loop.steps
            total = total + x
        y = total / (self.repeats * s)
        residual = torch.linalg.vector_norm(b - op.mv(y) - (self.damping * s) * y, dim=-1)
        tol = loop.tol
        check_done(residual <= tol, residual, self.name)
        return y, SolveInfo(
            converged=residual <= tol, steps=steps, residual=residual, solver=self.name,
            tolerance=tol,
        )

    def _advice(self) -> str:
        return (
            f"LiSSA is a stochastic estimator: raise the depth (max_steps, now {self.max_steps}) "
            f"or repeats (now {self.repeats}), check that scale (now {self.scale}) exceeds the "
            "largest eigenvalue of the operator, or loosen rtol; for an accurate solve of a "
            "deterministic system use CG or GMRES."
        )
