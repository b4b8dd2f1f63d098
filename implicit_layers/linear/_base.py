"""The base class of linear solvers and the helpers they share."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from .._config import SolverSettings
from .._info import SolveInfo, StructureWarning, report_failure, user_stacklevel
from ._operator import LinearOperator

__all__ = ["LinearSolver", "initial_residual", "batched_dot", "symmetry_gap"]


class LinearSolver(SolverSettings):
    """Base class: solves ``A x = b`` for a batch of systems, each to its own tolerance.

    A sample has converged when ``‖b - A x‖ <= max(atol, rtol * ‖b‖)`` (the criterion of
    ``scipy.sparse.linalg``). Converged samples stop changing; the loop ends when every sample
    has converged or after ``max_steps`` iterations. Right-hand sides and solutions have shape
    ``(B, n)``: ``B`` independent systems of ``n`` unknowns (see :meth:`solve`, or
    :func:`~implicit_layers.linear.solve` for matrices, callables and unbatched vectors).

    Settings are keyword-only and immutable; ``replace(**changes)`` returns a validated copy,
    and the ``repr`` evaluates back to an equal object. A subclass may take one algorithm
    parameter positionally (``GMRES(restart)``, ``Broyden(memory)``, ``Neumann(max_steps)``).

    Args:
        rtol: relative tolerance. ``None`` (default) means: inherit the forward solver's
            tolerance when used as a backward solver, else ``1e-10`` in float64, ``1e-5`` in
            float32, ``1e-3`` in float16 and ``1e-2`` in bfloat16.
        atol: absolute tolerance (default ``0.0``).
        max_steps: iteration limit; ``None`` (default) picks the solver's ``default_max_steps``
            (1000 unless the solver says otherwise).
        check_every: test for convergence (a device synchronisation) every this many steps;
            ``None`` (default) means every step on the CPU and every 8 steps on accelerators.
        on_failure: ``"warn"`` (default) emits a :class:`~implicit_layers.ConvergenceWarning`
            when a sample does not converge, ``"raise"`` raises
            :class:`~implicit_layers.ConvergenceError`, ``"ignore"`` does neither (the result
            is still reported in the returned :class:`~implicit_layers.SolveInfo`).

    Raises:
        TypeError: if a setting has the wrong type (``max_steps=2.5``), is passed
            positionally where it is keyword-only, or (in :meth:`replace`) is unknown.
        ValueError: if a setting is out of range (``rtol < 0``, ``max_steps < 1``,
            ``check_every < 1``, an ``on_failure`` other than the three above).

    Class attributes:
        needs_symmetric: choosing this solver declares the operator symmetric: an untagged
            operator (``symmetric=None``) is taken as symmetric (after a cheap probe that warns
            with :class:`~implicit_layers.StructureWarning` when it clearly is not), one tagged
            ``symmetric=False`` is an error.
        needs_positive_definite: likewise for positive definiteness (checked as the
            iteration goes; ``positive_definite=False`` is an error).

    Examples:
        >>> cg = il.linear.CG(rtol=1e-8)
        >>> cg.replace(max_steps=50)
        CG(rtol=1e-08, max_steps=50)
        >>> cg.max_steps
        1000
    """

    name: ClassVar[str] = "LinearSolver"
    default_max_steps: ClassVar[int] = 1000
    needs_symmetric: ClassVar[bool] = False
    needs_positive_definite: ClassVar[bool] = False
    #: Whether the solver starts from ``x0`` (the implicit layer asks the forward solver for a
    #: start point only then; a direct method ignores it).
    uses_initial_guess: ClassVar[bool] = True

    # -- to be implemented -------------------------------------------------------------
    def _solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        """Solve ``op x = b`` for ``b`` of shape ``(B, n)``: return ``x`` and the info."""
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------
    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None, *, what: str = "linear solve"
    ) -> tuple[Tensor, SolveInfo]:
        """Solve ``op x = b`` for a batch of right-hand sides.

        Args:
            op: the operator, a :class:`LinearOperator` acting on ``(B, n)``.
            b: right-hand sides, shape ``(B, n)``, with the operator's dtype and device.
            x0: optional initial guess, shape ``(B, n)``; default zeros.
            what: names the solve in warnings and errors (default ``"linear solve"``).

        Returns:
            ``(x, info)``: ``x`` of shape ``(B, n)``, and a :class:`~implicit_layers.SolveInfo`
                whose fields have shape ``(B,)``.

        Raises:
            ValueError: if the solver needs a structure (symmetric, positive definite) that
                the operator is tagged as lacking.
            implicit_layers.ConvergenceError: if a sample does not converge and
                ``on_failure="raise"``.
            implicit_layers.NonFiniteError: if the residual becomes NaN or Inf.

        Warns:
            implicit_layers.ConvergenceWarning: if a sample does not converge and
                ``on_failure="warn"``.
            implicit_layers.StructureWarning: if the solver needs symmetry, the operator is
                untagged and a probe finds it clearly non-symmetric.

        Examples:
            >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
            >>> op = il.linear.MatrixOperator(A, batch=2)
            >>> b = torch.tensor([[1.0, 2.0], [5.0, 4.0]], dtype=torch.float64)
            >>> x, info = il.linear.CG().solve(op, b)
            >>> x
            tensor([[0.0909, 0.6364],
                    [1.0000, 1.0000]], dtype=torch.float64)
            >>> info.converged
            tensor([True, True])
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
                        "system (backward=il.linear.GMRES() for a layer); if it is symmetric, "
                        "say so to skip this check (symmetric=True on the operator, or "
                        "custom_root(..., symmetric=True)).",
                        StructureWarning,
                        stacklevel=user_stacklevel(),
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
    non-symmetric one gives a value near ``‖A - Aᵀ‖ / (‖A‖ √n)``. Solvers with
    ``needs_symmetric`` warn when it exceeds ``10 sqrt(eps)`` on an untagged operator.

    Args:
        op: the operator, acting on ``(B, n)``.
        like: a ``(B, n)`` tensor giving the shape, dtype and device.
        seed: seed of the local generator (default 0).

    Returns:
        The gaps, shape ``(B,)``.

    Examples:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> op = il.linear.MatrixOperator(A, symmetric=None)
        >>> like = torch.zeros(1, 2, dtype=torch.float64)
        >>> bool(il.linear.base.symmetry_gap(op, like) > 1e-3)
        True
        >>> sym = il.linear.MatrixOperator(A + A.T)
        >>> bool(il.linear.base.symmetry_gap(sym, like) < 1e-12)
        True
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
    """The starting iterate and its residual ``b - A x0``, as new tensors the solver may update
    in place.

    Args:
        op: the operator, acting on ``(B, n)``.
        b: right-hand sides, shape ``(B, n)``.
        x0: initial guess, shape ``(B, n)``, or ``None`` for zeros (then no product is spent).

    Returns:
        ``(x, r)``, both of shape ``(B, n)``: a copy of ``x0`` (or zeros) and ``b - A x``.

    Examples:
        >>> op = il.linear.MatrixOperator(2 * torch.eye(2, dtype=torch.float64))
        >>> b = torch.ones(1, 2, dtype=torch.float64)
        >>> il.linear.base.initial_residual(op, b, b)[1]
        tensor([[-1., -1.]], dtype=torch.float64)
    """
    if x0 is None:
        return torch.zeros_like(b), b.clone()
    x = x0.clone()
    return x, b - op.mv(x)


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot product of two ``(B, n)`` tensors (one fused kernel, not mul + sum).

    Args:
        a: shape ``(B, n)``.
        b: shape ``(B, n)``.

    Returns:
        ``Σ_j a[i, j] b[i, j]`` for each ``i``, shape ``(B,)``.

    Examples:
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> il.linear.base.batched_dot(a, a)
        tensor([ 5., 25.])
    """
    return torch.linalg.vecdot(a, b)
