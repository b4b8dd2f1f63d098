"""Products with the Jacobians of a problem's residual at a point.

For the residual ``F(z, θ)`` at ``(z, θ)``, with ``A = ∂F/∂z`` (``(B, n)`` per sample):

* ``rmv(v) = Aᵀ v`` (a VJP), ``mv(v) = A v`` (a JVP; ``Aᵀ v`` again when ``A`` is symmetric);
* ``param_vjp(u) = (∂F/∂θ)ᵀ u`` and ``param_jvp(θ̇) = (∂F/∂θ) θ̇``;
* ``dense(transpose)``: the ``(B, n, n)`` matrix ``Aᵀ`` (or ``A``).

:class:`Linearization` computes them with ``torch.func`` only, so they can run under any
``torch.func`` transform and be differentiated again by autograd (the higher-order paths).
:class:`RecordedLinearization` records ``F`` once with autograd and reuses the graph for every
product (the fast path of an ordinary first-order backward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._problem import Problem


def func_vjp(f: Callable[..., Any], *primals: Tensor) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.vjp`` without ``has_aux``: ``(output, vjp_fn)``."""
    result = torch.func.vjp(f, *primals)
    return result[0], result[1]


def transpose_of_vjp(vjp: Callable[[Tensor], Any], like: Tensor, tangent: Any) -> Tensor:
    """``J t`` from the linear map ``w ↦ Jᵀ w`` (a VJP) by differentiating it in ``w``.

    Reverse over reverse rather than ``torch.func.jvp``: forward-mode AD does not nest, and
    the tangent solves run inside ``torch.autograd.forward_ad``'s own level.
    """
    _, transpose = func_vjp(vjp, torch.zeros_like(like))
    return transpose(tangent)[0]


def _basis(z: Tensor) -> Tensor:
    B, n = z.shape
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    return eye.unsqueeze(1).expand(n, B, n)


class Linearization:
    """Jacobian products of ``problem``'s residual at ``(z, values)`` by ``torch.func``.

    Args:
        problem: the problem; its ``params`` are replaced by ``values``.
        z: the point, ``(B, n)``.
        values: the tensors standing for ``problem.params``.
    """

    def __init__(self, problem: Problem, z: Tensor, values: Sequence[Tensor]) -> None:
        self.problem = problem
        self.z = z
        self.values = tuple(values)
        self.residual, self._vjp = func_vjp(self.F, z, *self.values)

    def F(self, z: Tensor, *values: Tensor) -> Tensor:
        """The residual as a pure function of the point and the parameters."""
        return self.problem.bind(values, deferred=True).pure_residual(z)

    def rmv(self, v: Tensor) -> Tensor:
        return self._vjp(v)[0]

    def mv(self, v: Tensor) -> Tensor:
        if self.problem.symmetric:
            return self.rmv(v)
        return transpose_of_vjp(lambda w: self._vjp(w)[0], self.residual, v)

    def param_vjp(self, u: Tensor) -> tuple[Tensor, ...]:
        return tuple(self._vjp(u)[1:])

    def param_jvp(self, tangents: Sequence[Tensor]) -> Tensor:
        return transpose_of_vjp(lambda w: tuple(self._vjp(w)[1:]), self.residual, tuple(tangents))

    def dense(self, transpose: bool = True) -> Tensor:
        rows = torch.func.vmap(self.rmv)(_basis(self.z))  # rows[i] = Aᵀ e_i, shape (n, B, n)
        At = rows.permute(1, 2, 0)  # column i of Aᵀ is Aᵀ e_i
        return At if transpose else At.mT


class RecordedLinearization:
    """Jacobian products of ``problem``'s residual at a detached ``z`` through one recorded graph.

    The residual is evaluated once with autograd; each product is one backward pass through it.
    For a fixed point only ``f(z)`` is recorded (``F = z - f``), which saves two subtractions
    and a branch sum in every product.
    """

    def __init__(self, problem: Problem, z: Tensor) -> None:
        # Each parameter enters the recorded graph as a leaf of its own: ∂F/∂θᵢ must be the
        # partial derivative. Through the tensors themselves, a parameter computed from another
        # (``b = A @ z0`` beside ``A``) would carry its path to that one into ``∂F/∂A``, and the
        # caller's autograd would then count that path a second time.
        # Leaves (module parameters, inputs) have no path to one another: no copies then.
        self.leaves: tuple[Tensor, ...] = problem.params
        if any(v.grad_fn is not None for v in problem.values):
            self.leaves = tuple(
                v.detach().requires_grad_(True) if v.requires_grad else v for v in problem.values
            )
            problem = problem.bind(self.leaves)
        self.problem = problem
        with torch.enable_grad():
            self.zr = z.detach().requires_grad_(True)
            if problem.has_fixed_point_map:
                self.out = problem.fixed_point_map(self.zr)
                self.sign = -1.0
            else:
                self.out = problem.residual(self.zr, create_graph=True)
                self.sign = 1.0

    def _vjp(self, v: Tensor) -> Tensor:
        if not self.out.requires_grad:
            return torch.zeros_like(v)
        (g,) = torch.autograd.grad(self.out, self.zr, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if g is None else g

    def rmv(self, v: Tensor) -> Tensor:
        if self.sign < 0:
            return v - self._vjp(v)
        return self._vjp(v)

    def mv(self, v: Tensor) -> Tensor:
        if self.problem.symmetric:
            return self.rmv(v)
        # One recorded graph gives transposed products only.
        raise RuntimeError("a non-transposed product needs a torch.func Linearization")

    def param_vjp(self, u: Tensor) -> tuple[Tensor | None, ...]:
        params = self.leaves
        if not self.out.requires_grad:
            return tuple(None for _ in params)
        grads = torch.autograd.grad(
            self.out, params, u if self.sign > 0 else -u, retain_graph=True, allow_unused=True
        )
        return tuple(grads)

    def dense(self, transpose: bool = True) -> Tensor:
        basis = _basis(self.zr)
        n = basis.shape[0]
        try:
            # torch.func.vmap batches the backward formulas with its own batching rules
            # (autograd.grad's is_grads_batched expands a residual ``G @ w`` into an (n, n, n)
            # bmm, 12x slower at n = 200). Operations without a batching rule fall back to one
            # VJP per column.
            rows = torch.func.vmap(self._vjp)(basis)
        except RuntimeError:
            rows = torch.stack([self._vjp(basis[i]) for i in range(n)])
        rows = rows if self.sign > 0 else basis - rows  # rows[i] = Aᵀ e_i
        At = rows.permute(1, 2, 0)
        return At if transpose else At.mT
