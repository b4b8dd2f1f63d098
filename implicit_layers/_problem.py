"""One problem type, one residual: the internal representation every solver works on.

Solvers see flat batched iterates of shape ``(B, n)``. A fixed point ``z = f(z)`` has
residual ``z - f(z)``, a root ``F(z) = 0`` has residual ``F(z)``, a minimum of ``L`` has
residual ``∇L(z)``. The implicit backward pass only needs the residual and whether its
Jacobian is symmetric (argmin) or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["fixed_point", "root", "argmin"]


class Problem:
    """A user function bound to its arguments, acting on flat ``(B, n)`` iterates.

    Args:
        kind: ``"fixed_point"``, ``"root"`` or ``"argmin"``.
        fn: the user's function, called as ``fn(z, *args)`` on tensors shaped like ``z0``.
        args: extra positional arguments of ``fn``.
        z0: initial guess (its shape is the shape of the solution).
        batched: whether the leading dimension of ``z0`` indexes independent problems.
        name: the argument name of ``fn`` for error messages.
    """

    def __init__(
        self,
        kind: Kind,
        fn: Callable[..., Tensor],
        args: tuple,
        z0: Tensor,
        batched: bool,
        name: str,
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.args = args
        self.shape = z0.shape
        self.batched = batched
        self.batch = z0.shape[0] if batched else 1
        self.size = z0[0].numel() if batched else z0.numel()
        self.name = name
        self.symmetric = kind == "argmin"
        self.dtype = z0.dtype
        self.device = z0.device
        self._checked = False

    # -- shape plumbing ----------------------------------------------------------------
    def flatten(self, z: Tensor) -> Tensor:
        return z.reshape(self.batch, self.size)

    def unflatten(self, z: Tensor) -> Tensor:
        return z.reshape(self.shape)

    def _call(self, z: Tensor) -> Tensor:
        out = self.fn(self.unflatten(z), *self.args)
        if not self._checked:
            self._check_output(out)
        return out

    def _check_output(self, out: object) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.name} must return a torch.Tensor, got {type(out).__name__}."
            )
        if self.kind == "argmin":
            expected = (self.batch,) if self.batched else ()
            if out.shape != expected and not (self.batched and out.shape == (self.batch, 1)):
                what = (
                    f"one value per problem, shape ({self.batch},)" if self.batched
                    else "a scalar (0-d tensor)"
                )
                raise ValueError(
                    f"{self.name} must return {what}, got shape {tuple(out.shape)}. "
                    + ("Reduce it with .sum() or .mean()." if not self.batched else
                       "Reduce over every dimension but the batch dimension.")
                )
        elif out.shape != self.shape:
            raise ValueError(
                f"{self.name} must return a tensor shaped like z0 {tuple(self.shape)}, got "
                f"{tuple(out.shape)}."
            )
        if out.is_floating_point() and out.dtype != self.dtype:
            raise TypeError(
                f"{self.name} returned dtype {out.dtype} but z0 has dtype {self.dtype}; make "
                "them agree (e.g. call .double() on the module and the inputs)."
            )
        self._checked = True

    # -- the residual --------------------------------------------------------------------
    def value_and_grad(self, z: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Objective values ``(B,)`` and gradient ``(B, n)`` (argmin only)."""
        with torch.enable_grad():
            zz = z if (create_graph and z.requires_grad) else z.detach().requires_grad_(True)
            value = self._call(zz).reshape(self.batch)
            (grad,) = torch.autograd.grad(value.sum(), zz, create_graph=create_graph)
        if not create_graph:
            value = value.detach()
        return value, grad

    def value(self, z: Tensor) -> Tensor:
        """Objective values ``(B,)`` (argmin only)."""
        return self._call(z).reshape(self.batch)

    def fixed_point_map(self, z: Tensor) -> Tensor:
        """``f(z)`` of shape ``(B, n)`` (fixed points only: the residual is ``z - f(z)``)."""
        return self.flatten(self._call(z))

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        """The residual ``F(z)`` of shape ``(B, n)``; differentiable if ``create_graph``."""
        if self.kind == "argmin":
            return self.value_and_grad(z, create_graph)[1]
        out = self.flatten(self._call(z))
        if self.kind == "fixed_point":
            return z - out
        return out
