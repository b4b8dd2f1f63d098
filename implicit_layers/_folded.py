"""``V`` copies of a problem solved as one batch: how the implicit layer runs under ``vmap``.

A solver loop stops on data (``residual < tol``), which ``torch.func.vmap`` cannot batch. The
layer's ``vmap`` rules instead move the vmapped dimension into the solver's batch: ``V`` vmapped
copies of a problem with ``B`` samples become one problem with ``V · B`` samples, each with its
own convergence test, whose residual is the user's function under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._problem import Problem


class FoldedProblem:
    """``V`` copies of ``base`` (one per vmapped index) as one problem of ``V · B`` samples.

    A wrapper: it answers the batch, the params and the calls of the user's function itself,
    and delegates every other attribute (the kind's name and policy: tolerance scale, adjoint
    structure, default solvers, failure advice, ...) to ``base``, so a policy added to the
    problem classes needs no change here.

    Args:
        base: the problem being vmapped.
        V: the vmapped size.
        dims: for each of ``values``, ``0`` if it is batched along its leading dimension,
            ``None`` if shared by every copy.
        values: the tensors standing for ``base.params``, batched per ``dims``; they are the
            folded problem's own ``params``.
    """

    def __init__(
        self, base: Problem, V: int, dims: Sequence[int | None], values: Sequence[Tensor]
    ) -> None:
        self.base = base
        self.V = V
        self.dims = tuple(dims)
        self.batch = V * base.batch
        self.batched = True
        self.params = tuple(values)
        self.values = tuple(values)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not set above: the base problem's.
        if name == "base":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def bind(self, values: Sequence[Tensor], *, deferred: bool = False) -> FoldedProblem:
        new = FoldedProblem(self.base, self.V, self.dims, values)
        new.params = self.params
        return new

    def _map(self, fn: Callable[[Problem, Tensor], Tensor], z: Tensor) -> Tensor:
        V, B = self.V, self.base.batch

        def one(zi: Tensor, *vals: Tensor) -> Tensor:
            return fn(self.base.bind(vals, deferred=True), zi)

        out = torch.func.vmap(one, in_dims=(0, *self.dims))(z.reshape(V, B, -1), *self.values)
        return out.reshape(V * B, *out.shape[2:])

    def pure_residual(self, z: Tensor) -> Tensor:
        return self._map(lambda p, zi: p.pure_residual(zi), z)

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            return self.pure_residual(z)

    def fixed_point_map(self, z: Tensor) -> Tensor:
        return self._map(lambda p, zi: p.fixed_point_map(zi), z)

    def objective(self, z: Tensor) -> Tensor:
        return self._map(lambda p, zi: p.objective(zi), z)

    def value_and_grad(self, z: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(create_graph):
            value = self.objective(z)
            if self.is_gradient:
                grad = self.pure_residual(z)
            else:  # a kind whose residual is not the gradient (composite)
                grad = self._map(
                    lambda p, zi: torch.func.grad(lambda zz: p.objective(zz).sum())(zi), z
                )
        return value, grad

    def residuals(self, z: Tensor) -> Tensor:
        """The base problem's residual vectors (least-squares kinds), per vmapped copy."""
        return self._map(lambda p, zi: p.residuals(zi), z)  # type: ignore[attr-defined]

    def gradient_step(self, z: Tensor, grad: Tensor, step: float | Tensor) -> Tensor:
        """The base problem's proximal-gradient step (composite kinds), per vmapped copy."""
        V, B = self.V, self.base.batch
        steps = torch.as_tensor(step, dtype=z.dtype, device=z.device).expand(V * B, 1)

        def one(zi: Tensor, gi: Tensor, si: Tensor, *vals: Tensor) -> Tensor:
            return self.base.bind(vals, deferred=True).gradient_step(zi, gi, si)  # type: ignore[attr-defined]

        out = torch.func.vmap(one, in_dims=(0, 0, 0, *self.dims))(
            z.reshape(V, B, -1), grad.reshape(V, B, -1), steps.reshape(V, B, 1), *self.values
        )
        return out.reshape(V * B, -1)
