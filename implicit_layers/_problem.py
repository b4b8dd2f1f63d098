"""One problem type, one residual: the internal representation every solver works on.

Solvers see flat batched iterates of shape ``(B, n)``. A fixed point ``z = f(z)`` has residual
``z - f(z)``, a root ``F(z) = 0`` has residual ``F(z)``, a minimum of ``L`` has residual
``∇L(z)``. The state may be a tensor or a tuple/list/dict of tensors (a pytree); it is flattened
at this boundary, so the core and the solvers only ever see one ``(B, n)`` tensor.

The tensors the user's function depends on (``params``: explicit arguments and closed-over
tensors that carry derivatives) can be replaced by others (:meth:`Problem.bind`), which is how
the implicit layer runs under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map_only, tree_unflatten

from ._capture import Substitute, transforms_active

Kind = Literal["fixed_point", "root", "argmin"]

#: Dtypes the solvers do not iterate in: the state is kept in float32 and the map runs in the
#: dtype of the user's tensors (tiny Anderson/GMRES least-squares systems and the norms of a
#: convergence test lose all their digits in 8-bit mantissas, and some have no half kernels).
HALF_DTYPES = (torch.float16, torch.bfloat16)


class Problem:
    """A user function bound to its arguments, acting on flat ``(B, n)`` iterates.

    Args:
        kind: ``"fixed_point"``, ``"root"`` or ``"argmin"``.
        fn: the user's function, called as ``fn(z, *args, **kwargs)`` on states shaped like
            ``z0``.
        args: extra positional arguments of ``fn``.
        z0: initial guess: a floating-point tensor, or a tuple/list/dict of them (the solution
            has the same structure).
        batched: whether the leading dimension of every leaf of ``z0`` indexes independent
            problems.
        name: the argument name of ``fn`` for error messages.
        symmetric: whether ``∂F/∂z`` is symmetric (always true for argmin).
        kwargs: keyword arguments of ``fn``.
        params: the tensors ``fn`` depends on that carry derivatives (see :meth:`bind`).
    """

    def __init__(
        self,
        kind: Kind,
        fn: Callable[..., Any],
        args: tuple,
        z0: Any,
        *,
        batched: bool,
        name: str,
        symmetric: bool = False,
        kwargs: dict[str, Any] | None = None,
        params: Sequence[Tensor] = (),
        values: Sequence[Tensor] | None = None,
    ) -> None:
        leaves, spec = tree_flatten(z0)
        self.kind = kind
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}
        self.name = name
        self.batched = batched
        self.symmetric = symmetric or kind == "argmin"
        self.spec: TreeSpec = spec
        self.leaf_shapes = tuple(t.shape for t in leaves)
        self.leaf_dtypes = tuple(t.dtype for t in leaves)
        self.single = len(leaves) == 1 and isinstance(z0, Tensor)
        self.batch = leaves[0].shape[0] if batched else 1
        per_sample = [math.prod(s[1:]) if batched else math.prod(s) for s in self.leaf_shapes]
        self.leaf_sizes = tuple(per_sample)
        self.size = sum(per_sample)
        dtype = leaves[0].dtype
        for t in leaves[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        self.io_dtype = dtype
        self.dtype = torch.float32 if dtype in HALF_DTYPES else dtype
        self.device = leaves[0].device
        # The precision the map computes in: a half-precision state, or autocast's dtype.
        self.precision = dtype
        if dtype not in HALF_DTYPES and torch.is_autocast_enabled(self.device.type):
            self.precision = torch.get_autocast_dtype(self.device.type)
        self.params = tuple(params)
        self.values = self.params if values is None else tuple(values)
        self._substitute = any(a is not b for a, b in zip(self.params, self.values, strict=False))

    def bind(self, values: Sequence[Tensor], *, deferred: bool = False) -> Problem:
        """The same problem with ``values[i]`` in place of ``params[i]`` wherever ``fn`` uses it.

        ``deferred=True`` marks a call after the layer's forward (a backward, a transform),
        when ``fn`` may see other tensors than it did (see
        :class:`~implicit_layers._capture.Substitute`); it always goes through the substitution.
        """
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.values = tuple(values)
        new._substitute = deferred or any(a is not b for a, b in zip(self.params, new.values, strict=False))
        return new

    def with_params(self, params: Sequence[Tensor]) -> Problem:
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new.params = new.values = tuple(params)
        new._substitute = False
        return new

    # -- shape plumbing ----------------------------------------------------------------
    def flatten(self, z: Any) -> Tensor:
        """A state shaped like ``z0`` (a tensor or pytree) as one ``(B, n)`` tensor."""
        if self.single:
            return z.reshape(self.batch, self.size).to(self.dtype)
        leaves = tree_flatten(z)[0]
        return torch.cat([t.reshape(self.batch, -1).to(self.dtype) for t in leaves], dim=-1)

    def unflatten(self, z: Tensor, dtype: bool = True) -> Any:
        """The ``(B, n)`` state in the structure, shapes (and, if ``dtype``, dtypes) of ``z0``."""
        if self.single:
            # The layer's own output rather than a view of it when no reshape is needed (FSDP2
            # and in-place ops treat views of a custom function's output specially).
            out = z if z.shape == self.leaf_shapes[0] else z.reshape(self.leaf_shapes[0])
            return out.to(self.leaf_dtypes[0]) if dtype else out
        parts = torch.split(z, list(self.leaf_sizes), dim=-1)
        leaves = [
            p.reshape(s).to(d) if dtype else p.reshape(s)
            for p, s, d in zip(parts, self.leaf_shapes, self.leaf_dtypes, strict=False)
        ]
        return tree_unflatten(leaves, self.spec)

    # -- calling the user's function ---------------------------------------------------
    def _call(self, z: Tensor) -> Any:
        state = self.unflatten(z)
        if not self._substitute:
            return self.fn(state, *self.args, **self.kwargs)
        mode = Substitute(self.params, self.values, exclude=(z, *tree_flatten(state)[0]))
        args, kwargs = tree_map_only(Tensor, mode._resolve, (self.args, self.kwargs))
        with mode:
            return self.fn(state, *args, **kwargs)

    def check_output(self, out: object) -> None:
        """Raise a clear error if ``fn``'s output does not fit the problem."""
        if self.kind == "argmin":
            if not isinstance(out, Tensor):
                raise TypeError(f"{self.name} must return a torch.Tensor, got {type(out).__name__}.")
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
            return
        leaves, spec = tree_flatten(out)
        if self.single:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"{self.name} must return a torch.Tensor, got {type(out).__name__}."
                )
            if out.shape != self.leaf_shapes[0]:
                raise ValueError(
                    f"{self.name} must return a tensor shaped like z0 {tuple(self.leaf_shapes[0])}, "
                    f"got {tuple(out.shape)}."
                )
        else:
            shapes = tuple(t.shape if isinstance(t, Tensor) else None for t in leaves)
            if spec != self.spec or shapes != self.leaf_shapes:
                raise ValueError(
                    f"{self.name} must return a state with the structure and shapes of z0 "
                    f"({self.spec} with shapes {[tuple(s) for s in self.leaf_shapes]}), got "
                    f"{spec} with shapes {[None if s is None else tuple(s) for s in shapes]}."
                )
        for t in leaves:
            if (
                t.is_floating_point() and t.dtype != self.io_dtype and t.dtype not in HALF_DTYPES
                and self.io_dtype not in HALF_DTYPES
            ):
                raise TypeError(
                    f"{self.name} returned dtype {t.dtype} but z0 has dtype {self.io_dtype}; make "
                    "them agree (e.g. call .double() on the module and the inputs)."
                )

    # -- the residual --------------------------------------------------------------------
    def objective(self, z: Tensor) -> Tensor:
        """Objective values ``(B,)`` in the compute dtype (argmin only)."""
        return self._call(z).reshape(self.batch).to(self.dtype)

    def value_and_grad(self, z: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Objective values ``(B,)`` and gradient ``(B, n)`` (argmin only).

        Under ``torch.inference_mode`` autograd cannot record the objective, and under
        ``torch.func`` transforms it may not be used, so the gradient then comes from
        ``torch.func.grad`` (differentiable by the enclosing transforms).
        """
        if torch.is_inference_mode_enabled() or transforms_active():
            def total(zz: Tensor) -> tuple[Tensor, Tensor]:
                value = self.objective(zz)
                return value.sum(), value

            grad, value = torch.func.grad(total, has_aux=True)(z)
            return value, grad
        with torch.enable_grad():
            zz = z if (create_graph and z.requires_grad) else z.detach().requires_grad_(True)
            value = self.objective(zz)
            if not value.requires_grad:
                raise ValueError(
                    f"{self.name}(w, ...) does not depend on w (its value does not require "
                    "grad as a function of w), so it has no minimiser to find. Check that the "
                    "objective uses its first argument in differentiable operations."
                )
            (grad,) = torch.autograd.grad(value.sum(), zz, create_graph=create_graph)
        if not create_graph:
            value = value.detach()
        return value, grad

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

    def pure_residual(self, z: Tensor) -> Tensor:
        """``F(z)`` computed with ``torch.func`` only, so that it can be transformed (no
        ``requires_grad_`` or ``torch.autograd.grad`` inside)."""
        if self.kind == "argmin":
            return torch.func.grad(lambda zz: self.objective(zz).sum())(z)
        out = self.flatten(self._call(z))
        if self.kind == "fixed_point":
            return z - out
        return out
