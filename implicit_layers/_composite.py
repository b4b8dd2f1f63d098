"""The composite argmin kind: a minimum of ``L(w) + g(w)`` with ``g`` given by its proximal operator.

The solution is a fixed point of the proximal-gradient map, so the residual is
``F(z) = z - prox_{ηg}(z - η ∇L(z))``. It vanishes exactly at the minimisers of ``L + g`` for
every ``η > 0``, and where the proximal operator is differentiable its Jacobian at the solution,
``A = I - D (I - η H)`` (``D`` the Jacobian of the prox, ``H`` the Hessian of ``L``), gives the
same implicit derivative for every ``η``: on the free coordinates (where ``D`` acts as the
identity) ``A`` is ``η H``, elsewhere the identity, and ``η`` cancels between ``A`` and
``∂F/∂θ``. The backward solves with ``A`` in full (a general, non-symmetric system: Dense for
small problems, GMRES beyond), at ``η = 1``; the forward solver's own step sizes do not enter it.

A constraint set given by its Euclidean projection ``c(w)`` is the case ``g`` = the set's
indicator, whose proximal operator is ``c`` for every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ._problem import KINDS, ObjectiveProblem

if TYPE_CHECKING:
    from .solvers._base import ForwardSolver

__all__ = ["CompositeProblem"]

#: The step ``η`` of the residual the backward differentiates (the derivative does not depend on it).
RESIDUAL_STEP = 1.0


class CompositeProblem(ObjectiveProblem):
    """A minimum of ``L(w) + g(w)``: ``fn`` returns the smooth part ``L``, ``prox(w, step)`` is
    the proximal operator of ``step·g``; residual ``z - prox(z - ∇L(z), 1)``.

    Args:
        kind: ``"composite"``.
        fn, args, z0: as for :class:`~implicit_layers.solvers.base.Problem`.
        prox: the proximal operator, called as ``prox(w, step)`` on a state shaped like ``z0``;
            ``step`` is a float or a tensor that broadcasts against each leaf of the state (one
            value per sample, shaped ``(B, 1, ...)``, when batched). The tensors it closes over
            carry derivatives like those of ``fn``.
        prox_name: its argument name in messages (``"prox"`` or ``"constraint"``).
        **kwargs: the keyword arguments of :class:`~implicit_layers.solvers.base.Problem`.
    """

    @classmethod
    def default_forward_solver(cls) -> ForwardSolver:
        """:class:`~implicit_layers.solvers.ProximalGradient`."""
        from .solvers import ProximalGradient  # the solvers import the problem classes

        return ProximalGradient()

    kind = "composite"
    solvers_hint = "ProximalGradient"
    # The residual is a proximal-gradient step in z (of unit length).
    relative_to_z = True
    steps_need_size = True
    adjoint_by_size = True

    def __init__(
        self, kind: Any, fn: Callable[..., Any], args: tuple, z0: Any, *,
        prox: Callable[..., Any], prox_name: str = "prox", **kwargs: Any,
    ) -> None:
        super().__init__(kind, fn, args, z0, **kwargs)
        self.prox = prox
        self.prox_name = prox_name

    def step_shaped(self, step: float | Tensor) -> float | Tensor:
        """``step`` (a float, or one value per sample ``(B, 1)``) shaped to broadcast against
        the leaves of the user's state: ``(B, 1, ..., 1)`` batched, a 0-d tensor unbatched."""
        if not isinstance(step, Tensor):
            return step
        if not self.batched:
            return step.reshape(())
        return step.reshape((self.batch,) + (1,) * (len(self.leaf_shapes[0]) - 1))

    def call_prox(self, v: Tensor, step: float | Tensor) -> Tensor:
        """``prox(v, step)`` on the flat ``(B, n)`` point ``v``, returned flat."""
        shaped = self.step_shaped(step)
        exclude = (shaped,) if isinstance(shaped, Tensor) else ()
        return self.flatten(self.call_user(self.prox, v, (shaped,), {}, exclude))

    def probe(self, z: Tensor) -> Any:
        out = self._call(z)
        state = self.unflatten(z)
        result = self.prox(state, RESIDUAL_STEP)
        leaves, spec = tree_flatten(result)
        shapes = tuple(t.shape if isinstance(t, Tensor) else None for t in leaves)
        if spec != self.spec or shapes != self.leaf_shapes:
            raise ValueError(
                f"{self.prox_name} must return a point shaped like w0 "
                f"{[tuple(s) for s in self.leaf_shapes]}, got "
                f"{[None if s is None else tuple(s) for s in shapes] if leaves else type(result).__name__}."
                + (" A prox is called as prox(w, step); see il.prox.bind and il.prox.indicator."
                   if self.prox_name == "prox" else " A constraint is called as constraint(w).")
            )
        return out

    def gradient_step(self, z: Tensor, grad: Tensor, step: float | Tensor) -> Tensor:
        """The proximal-gradient step ``prox(z - step·grad, step)`` on flat ``(B, n)`` tensors."""
        return self.call_prox(z - step * grad, step)

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        _, grad = self.value_and_grad(z, create_graph)
        return z - self.gradient_step(z, grad, RESIDUAL_STEP)

    def pure_residual(self, z: Tensor) -> Tensor:
        grad = torch.func.grad(lambda zz: self.objective(zz).sum())(z)
        return z - self.gradient_step(z, grad, RESIDUAL_STEP)

    def adjoint_structure(self) -> tuple[bool | None, bool | None]:
        # I - D (I - H) is not symmetric even when D and H are.
        return False, None

    def failure_advice(self, base: str) -> str:
        return base + (
            f"; check that fun is smooth and bounded below on the set, and that {self.prox_name} "
            "is a proximal operator called as prox(w, step) (il.prox.bind, il.prox.indicator)"
        )


def constraint_as_prox(constraint: Callable[..., Any]) -> Callable[..., Any]:
    """The proximal operator of a set's indicator, ``(w, step) ↦ constraint(w)``."""

    def prox(w: Any, step: float | Tensor) -> Any:
        return constraint(w)

    return prox


KINDS["composite"] = CompositeProblem
