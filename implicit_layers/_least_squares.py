"""The least-squares kind: a minimum of ``½‖r(w)‖²`` for a residual function ``r``.

It is a minimisation problem (a subclass of the argmin kind), so the argmin solvers solve it
too and its implicit backward is the argmin one: the residual of the implicit system is the
gradient ``J(w)ᵀ r(w)`` and its Jacobian the full Hessian ``JᵀJ + Σ rᵢ ∇²rᵢ`` by
Hessian-vector products, exact at every residual. What the kind adds is access to the residual
vector itself (:meth:`LeastSquaresProblem.residuals`), from which the Gauss-Newton and
Levenberg-Marquardt solvers take Jacobian products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

from ._problem import KINDS, MinimiseProblem, single_state

if TYPE_CHECKING:
    from .solvers._base import ForwardSolver

__all__ = ["LeastSquaresProblem"]


class LeastSquaresProblem(MinimiseProblem):
    """A minimum of ``½‖r(w)‖²``: ``fn`` returns the residuals ``r`` (a tensor, or with
    ``batched=True`` a tensor whose leading dimension is the batch); objective ``½‖r‖²`` per
    problem, implicit residual ``Jᵀr``."""

    @classmethod
    def default_forward_solver(cls) -> ForwardSolver:
        """:class:`~implicit_layers.solvers.LevenbergMarquardt`."""
        from .solvers import LevenbergMarquardt  # the solvers import the problem classes

        return LevenbergMarquardt()

    kind = "least_squares"
    solvers_hint = "LevenbergMarquardt, GaussNewton or LBFGS"
    # The probe is the residual function alone: for a plain function that names no tensor
    # that requires grad, a residual that does not require grad shows that nothing it used
    # does, and the layer skips the capture, about a sixth of a small compiled fit (see
    # Problem.probe_plain).
    probe_output_covers_inputs = True

    def check_output(self, out: object) -> None:
        """Raise a clear error unless ``fn`` returned a floating tensor of residuals (one row
        per problem when batched)."""
        if not isinstance(out, Tensor) or not out.is_floating_point():
            leaves = tree_flatten(out)[0]  # only for the message: a walk on every call otherwise
            raise TypeError(
                f"{self.name} must return a floating-point torch.Tensor of residuals, got "
                f"{type(out).__name__ if not isinstance(out, Tensor) else out.dtype}"
                + (" (a tuple of tensors: concatenate them with torch.cat)." if len(leaves) > 1 else ".")
            )
        if self.batched and (out.dim() < 1 or out.shape[0] != self.batch):
            raise ValueError(
                f"with batched=True {self.name} must return residuals shaped (B, ...) with "
                f"B = {self.batch}, got shape {tuple(out.shape)}."
            )
        if out.numel() == 0:
            raise ValueError(f"{self.name} returned no residuals (shape {tuple(out.shape)}).")

    def residuals(self, z: Tensor) -> Tensor:
        """The residual vectors ``r(z)``, shape ``(B, m)``, in the compute dtype."""
        return self._call(z).reshape(self.batch, -1).to(self.dtype)

    def traced_calls(self) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Any]]:
        """``(residuals, probe)`` as a compiled loop traces them (:meth:`residuals` and
        :meth:`probe`). For a plain problem of this class (a one-tensor state, no keyword
        arguments, no substitution), two closures over the function, its arguments and the
        state's shape, dtype and batch: dynamo then guards those values rather than every
        attribute of the problem and every method lookup through its classes (about a third
        of the guards of a small fit, checked on every call). Otherwise (or for a subclass that
        redefines how the function is called) the bound methods."""
        if not self.single or self.kwargs or self._substitute or _calls_redefined(type(self)):
            return self.residuals, self.probe
        fn, args, batch, dtype = self.fn, self.args, self.batch, self.dtype
        shape, leaf_dtype = self.leaf_shapes[0], self.leaf_dtypes[0]

        def probe(z: Tensor) -> Any:
            return fn(single_state(z, shape, leaf_dtype), *args)

        def residuals(z: Tensor) -> Tensor:
            return probe(z).reshape(batch, -1).to(dtype)

        return residuals, probe

    def objective(self, z: Tensor) -> Tensor:
        """``½‖r(z)‖²`` per problem, shape ``(B,)``."""
        return 0.5 * self.residuals(z).square().sum(-1)


#: What :meth:`LeastSquaresProblem.traced_calls` writes out as closures.
_TRACED = ("residuals", "probe", "_call", "call_user", "unflatten")


_REDEFINED: dict[type, bool] = {}


def _calls_redefined(cls: type) -> bool:
    """Whether ``cls`` redefines one of the methods that ``traced_calls`` writes out (answered
    once per class)."""
    known = _REDEFINED.get(cls)
    if known is None:
        known = _REDEFINED[cls] = any(
            getattr(cls, name) is not getattr(LeastSquaresProblem, name) for name in _TRACED)
    return known


KINDS["least_squares"] = LeastSquaresProblem
