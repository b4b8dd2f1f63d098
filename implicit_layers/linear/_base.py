"""The base class of linear solvers and the helpers they share."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from .._config import SolverSettings
from .._info import SolveInfo, StructureWarning, report_failure
from ._operator import LinearOperator

__all__ = ["LinearSolver", "initial_residual", "batched_dot", "symmetry_gap"]


class LinearSolver(SolverSettings):
    """Base class: solves ``A x = b`` for a batch of systems, each to its own tolerance.

    A sample has converged when ``‖b - A x‖ <= max(atol, rtol * ‖b‖)`` (the criterion of
    ``scipy.sparse.linalg``). Converged samples stop changing; the loop ends when every sample
    has converged or after ``max_steps`` iterations.

    Settings are keyword-only and immutable; ``replace(**changes)`` returns a validated copy
    (see :class:`~implicit_layers.linear.base.SolverSettings` for the few positional
    algorithm parameters).

    Args:
        rtol: relative tolerance. ``None`` means: inherit the forward solver's tolerance when
            used as a backward solver, else ``1e-10`` in float64 and ``1e-5`` in float32.
        atol: absolute tolerance.
        max_steps: iteration limit; ``None`` picks a solver-specific default.
        check_every: test for convergence (a device synchronisation) every this many steps;
            ``None`` means every step on the CPU and every 8 steps on accelerators.
        on_failure: ``"warn"`` (default) emits a :class:`ConvergenceWarning` when a sample
            does not converge, ``"raise"`` raises :class:`ConvergenceError`, ``"ignore"`` does
            neither (the result is still reported in the returned :class:`SolveInfo`).

    Class attributes:
        needs_symmetric: choosing this solver declares the operator symmetric: an untagged
            operator (``symmetric=None``) is taken as symmetric (after a cheap probe that warns
            when it clearly is not), one tagged ``symmetric=False`` is an error.
        needs_positive_definite: likewise for positive definiteness (checked as the
            iteration goes; ``positive_definite=False`` is an error).
    """

    name: ClassVar[str] = "LinearSolver"
    default_max_steps: ClassVar[int] = 1000
    needs_symmetric: ClassVar[bool] = False
    needs_positive_definite: ClassVar[bool] = False

    # -- to be implemented -------------------------------------------------------------
    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        """Solve ``op x = b`` for ``b`` of shape ``(B, n)``: return ``x`` and the info."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------
    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None, *, what: str = "linear solve"
    ) -> tuple[Tensor, SolveInfo]:
        """Solve ``op x = b``.

        Args:
            op: the operator, acting on ``(B, n)``.
            b: right-hand side, shape ``(B, n)``.
            x0: optional initial guess, shape ``(B, n)``.
            what: names the solve in warnings.

        Returns:
            ``(x, info)`` with ``x`` of shape ``(B, n)`` and per-sample :class:`SolveInfo`.
        """
        self._check_structure(op, b)
        x, info = self._solve(op, b, x0)
        report_failure(info, self.on_failure, what, self._advice())
        return x, info

    def _advice(self) -> str:
        return (
            f"Raise max_steps (now {self.max_steps}), loosen rtol/atol, or choose another linear "
            "solver (Dense is exact for small problems)."
        )

    def _check_structure(self, op: LinearOperator, b: Tensor) -> None:
        if self.needs_symmetric:
            if op.symmetric is False:
                raise ValueError(
                    f"{self.name} needs a symmetric operator, but the operator is tagged "
                    "symmetric=False. Use GMRES, BiCGStab or Dense for a non-symmetric system, "
                    "or tag the operator symmetric=True if it is symmetric after all."
                )
            if op.symmetric is None:
                # Choosing the solver declares the operator symmetric (as scipy and jaxopt
                # do); two products catch an operator that clearly is not.
                gap = float(symmetry_gap(op, b).max())
                if gap > 10 * torch.finfo(b.dtype).eps ** 0.5:
                    warnings.warn(
                        f"{self.name} assumes a symmetric operator, but the operator given is "
                        f"not symmetric: <u, A v> and <A u, v> differ by {gap:.1e} (relative) "
                        "for random u, v. Use GMRES, BiCGStab or Dense for a non-symmetric "
                        "system; tag the operator symmetric=True to skip this check.",
                        StructureWarning,
                        stacklevel=3,
                    )
        if self.needs_positive_definite and op.positive_definite is False:
            raise ValueError(
                f"{self.name} needs a positive-definite operator, but the operator is tagged "
                "positive_definite=False. Use MINRES for symmetric indefinite systems, or GMRES."
            )


def symmetry_gap(op: LinearOperator, like: Tensor, *, seed: int = 0) -> Tensor:
    """Relative asymmetry ``|<u, A v> - <A u, v>| / (‖u‖ ‖A v‖ + ‖A u‖ ‖v‖)`` per sample.

    Two operator products with random ``u``, ``v`` from a local generator (the global random
    state is left alone). Rounding makes it about ``eps`` for a symmetric operator; a clearly
    non-symmetric one gives a value near ``‖A - Aᵀ‖ / (‖A‖ √n)``.

    Args:
        op: the operator, acting on ``(B, n)``.
        like: a ``(B, n)`` tensor giving the shape, dtype and device.
        seed: seed of the local generator.

    Returns:
        The gaps, shape ``(B,)``.
    """
    gen = torch.Generator(device=like.device).manual_seed(seed)
    u = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
    v = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
    with torch.no_grad():
        Au, Av = op.mv(u), op.mv(v)
        norm = torch.linalg.vector_norm
        scale = norm(u, dim=-1) * norm(Av, dim=-1) + norm(Au, dim=-1) * norm(v, dim=-1)
        gap = (batched_dot(u, Av) - batched_dot(Au, v)).abs()
        return gap / scale.clamp_min(torch.finfo(like.dtype).tiny)


def initial_residual(op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor]:
    """The starting iterate and its residual ``b - A x0`` (``x0 = 0`` when not given), as new
    tensors the solver may update in place."""
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    x = x0.clone()
    return x, b - op.mv(x)


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot product of two ``(B, n)`` tensors (one fused kernel, not mul + sum)."""
    return torch.linalg.vecdot(a, b)
