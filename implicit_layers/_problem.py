"""Problem kinds as classes: the internal representation every solver works on.

Solvers see flat batched iterates of shape ``(B, n)``. :class:`Problem` holds what every kind
shares (flattening of structured states, binding of captured tensors, params, precision); each
kind is a subclass that owns its residual, its output checks, its tolerance scale, the
structure of its adjoint system, its default adjoint and forward solvers and its failure
advice:

* :class:`FixedPointProblem`: ``z = f(z)``, residual ``z - f(z)``;
* :class:`RootProblem`: ``F(z) = 0``, residual ``F(z)``;
* :class:`MinimiseProblem`: a minimum of ``L``, residual ``∇L(z)``.

Code outside these classes asks a problem about its policy (:attr:`Problem.has_fixed_point_map`,
:meth:`Problem.adjoint_structure`, ...) and never compares the kind's name, which is only
user-facing text. A new kind is one subclass registered in :data:`KINDS` plus one entry point.
The state may be a tensor or a tuple/list/dict of tensors (a pytree); it is flattened
at this boundary, so the core and the solvers only ever see one ``(B, n)`` tensor.

The tensors the user's function depends on (``params``: explicit arguments and closed-over
tensors that carry derivatives) can be replaced by others (:meth:`Problem.bind`), which is how
the implicit layer runs under ``torch.func`` transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map_only, tree_unflatten

from ._capture import Substitute, reaches_no_derivatives, transforms_active
from .linear._base import LinearSolver
from .linear.cg import CG
from .linear.combinators import DenseThenGMRES
from .linear.dense import Dense
from .linear.gmres import GMRES
from .linear.timed import timed_default

if TYPE_CHECKING:
    from .solvers._base import ForwardSolver

Kind = Literal["fixed_point", "root", "argmin", "composite", "least_squares"]

#: Dtypes the solvers do not iterate in: the state is kept in float32 and the map runs in the
#: dtype of the user's tensors (tiny Anderson/GMRES least-squares systems and the norms of a
#: convergence test lose all their digits in 8-bit mantissas, and some have no half kernels).
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Largest system size ``n`` for which the default backward materialises the Jacobian without
#: measuring first (``Dense`` wins there on every problem of the benchmarks: ridge d = 100,
#: 0.6 ms vs 4.7 ms for CG; ``python -m benchmarks.dense_crossover``)...
DENSE_MAX_SIZE = 128
#: ... as long as ``B n³`` stays below this. Dense builds the matrix from ``n`` vectorised
#: operator products over the whole batch; with per-sample data (a per-sample Hessian) each
#: product touches ``B n²`` numbers, so the build holds and computes ``~ B n³``, against CG's
#: ``k B n²`` for ``k`` iterations. Measured (``python -m benchmarks.default_backward``, batched
#: quadratics, condition number 100): unbatched up to n = 128 Dense is 5-10x faster than CG at
#: the same memory; at B n³ = 2^21 (B = 64, n = 32; B = 8, n = 64) the two are even; beyond,
#: Dense loses (B = 32, n = 64: 4.7x CG's time; B = 256, n = 128: 13x its time and memory).
DENSE_MAX_ENTRIES = 2**21
#: Beyond those, up to this many entries ``B n²`` of the matrix (8 MiB in float64; the timed
#: probe of 24 columns then holds at most 24/n of Dense's memory), the choice is measured
#: (:mod:`~implicit_layers.linear.timed`): ridge regression is 4x faster with Dense at
#: n = 200 and 4.8x faster with CG at n = 1000, softmax regression 11x faster with CG at n = 256.
MEASURED_MAX_ENTRIES = 2**20


#: The structure of a state that is one tensor (what ``tree_flatten`` gives for any leaf).
LEAF_SPEC: TreeSpec = tree_flatten(0)[1]
#: Values ``tree_flatten`` keeps as leaves in every PyTorch version (``None`` is not among them:
#: some versions treat it as an empty node).
_PLAIN_LEAVES = (Tensor, bool, int, float, complex, str)


def is_flat(tree: Any) -> bool:
    """Whether ``tree`` is a plain tuple or list of tensors and numbers (its own leaves)."""
    return type(tree) in (tuple, list) and all(isinstance(x, _PLAIN_LEAVES) for x in tree)


def leaves(tree: Any) -> list[Any]:
    """``tree_flatten(tree)[0]``: without walking pytree machinery (several microseconds per
    call, on every layer call) for the common trees, a tensor or a tuple or list of tensors and
    numbers; anything else goes through ``tree_flatten``."""
    if isinstance(tree, Tensor):
        return [tree]
    if is_flat(tree):
        return list(tree)
    return tree_flatten(tree)[0]


def single_state(z: Tensor, shape: torch.Size, dtype: torch.dtype | None) -> Tensor:
    """The flat ``(B, n)`` state ``z`` as a one-tensor state of ``shape`` (and ``dtype``, unless
    ``None``): ``z`` itself rather than a view of it where no reshape is needed (FSDP2 and
    in-place ops treat views of a custom function's output specially)."""
    out = z if z.shape == shape else z.reshape(shape)
    return out.to(dtype) if dtype is not None and out.dtype != dtype else out


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """``tree_flatten(tree)``, without the pytree walk for a single tensor (the common state
    and output of a layer)."""
    return ([tree], LEAF_SPEC) if isinstance(tree, Tensor) else tree_flatten(tree)


class Problem:
    """A user function bound to its arguments, acting on flat ``(B, n)`` iterates.

    The base of the problem kinds; ``Problem(kind, ...)`` builds the subclass registered for
    ``kind`` in :data:`KINDS`.

    Args:
        kind: ``"fixed_point"``, ``"root"`` or ``"argmin"`` (the key of the kind in
            :data:`KINDS`).
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

    #: The kind's name in user-facing text (messages, cache labels); never branched on.
    kind: ClassVar[str]
    #: Whether the residual is ``z - f(z)`` for a map ``f`` (:meth:`fixed_point_map`), which
    #: solvers may iterate directly.
    has_fixed_point_map: ClassVar[bool] = False
    #: Whether convergence is measured relative to ``‖z‖`` (the residual is a step in z) rather
    #: than to the initial residual.
    relative_to_z: ClassVar[bool] = False
    #: Whether the residual is the gradient of an objective, so that a step ``-η F(z)`` is a
    #: gradient step whose size comes from the forward solver.
    is_gradient: ClassVar[bool] = False
    #: Whether the steps ``z ← z - η F(z)`` of the step backward modes (``Truncated``,
    #: ``JacobianFree``, ``Phantom``) need a step of the problem's scale (about ``1 / L``, from
    #: the mode or the forward solver) rather than 1: ``F`` grows with the curvature ``L`` (a
    #: gradient, or a proximal-gradient step of unit length), and unit steps diverge for
    #: ``L > 2``.
    steps_need_size: ClassVar[bool] = False
    #: Whether the default adjoint solver of a non-symmetric problem is chosen by size (Dense
    #: when small) rather than always GMRES.
    adjoint_by_size: ClassVar[bool] = False
    #: Whether the residual ``F(z)`` is the function's output itself (a tensor ``z`` in, a
    #: tensor ``F`` of its shape out): a ``custom_root`` layer with ``CompiledImplicit`` can then
    #: trace into a ``torch.compile`` graph (see ``_traced_root.py``).
    residual_is_output: ClassVar[bool] = False
    #: The built-in forward solvers to suggest for this kind in messages.
    solvers_hint: ClassVar[str] = ""
    #: Whether every tensor that :meth:`probe` uses reaches the output it returns (one user
    #: function, nothing else called): then a probe at a detached state, gradients on, whose
    #: output does not require grad shows that no tensor it used requires grad, and the layer
    #: skips the capture (see :meth:`probe_plain`).
    probe_output_covers_inputs: ClassVar[bool] = False

    def __new__(cls, kind: str, *args: Any, **kwargs: Any) -> Problem:
        if cls is Problem:
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}.")
            cls = KINDS[kind]
        return object.__new__(cls)

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
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or {}
        self.name = name
        self.batched = batched
        self.symmetric = symmetric
        self.single = isinstance(z0, Tensor)
        if self.single:  # the common state, without the generic walk below (on every call)
            shape, dtype = z0.shape, z0.dtype
            self.spec: TreeSpec = LEAF_SPEC
            self.leaf_shapes: tuple[torch.Size, ...] = (shape,)
            self.leaf_dtypes: tuple[torch.dtype, ...] = (dtype,)
            self.batch = shape[0] if batched else 1
            self.size = math.prod(shape[1:]) if batched else z0.numel()
            self.leaf_sizes: tuple[int, ...] = (self.size,)
            first = z0
        else:
            z0_leaves, self.spec = flatten(z0)
            self.leaf_shapes = tuple(t.shape for t in z0_leaves)
            self.leaf_dtypes = tuple(t.dtype for t in z0_leaves)
            self.batch = z0_leaves[0].shape[0] if batched else 1
            per_sample = [math.prod(s[1:]) if batched else math.prod(s) for s in self.leaf_shapes]
            self.leaf_sizes = tuple(per_sample)
            self.size = sum(per_sample)
            dtype = self.leaf_dtypes[0]
            for other in self.leaf_dtypes[1:]:
                dtype = torch.promote_types(dtype, other)
            first = z0_leaves[0]
        self.io_dtype = dtype
        self.dtype = torch.float32 if dtype in HALF_DTYPES else dtype
        self.device = first.device
        # The precision the map computes in: a half-precision state, or autocast's dtype.
        self.precision = dtype
        if dtype not in HALF_DTYPES and torch.is_autocast_enabled(self.device.type):
            self.precision = torch.get_autocast_dtype(self.device.type)
        self.params = tuple(params)
        self.values = self.params if values is None else tuple(values)
        self._substitute = values is not None and any(
            a is not b for a, b in zip(self.params, self.values, strict=False))

    @property
    def substitutes(self) -> bool:
        """Whether calls of the user's functions run under the substitution of ``values`` for
        ``params`` (see :meth:`bind`), as under ``torch.func`` transforms, whose custom-function
        forwards see unwrapped values."""
        return self._substitute

    def bind(self, values: Sequence[Tensor], *, deferred: bool = False) -> Problem:
        """The same problem with ``values[i]`` in place of ``params[i]`` wherever ``fn`` uses it.

        ``deferred=True`` marks a call after the layer's forward (a backward, a transform),
        when ``fn`` may see other tensors than it did (see
        :class:`~implicit_layers._capture.Substitute`); it always goes through the substitution.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.values = tuple(values)
        new._substitute = deferred or any(a is not b for a, b in zip(self.params, new.values, strict=False))
        return new

    def with_params(self, params: Sequence[Tensor]) -> Problem:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.params = new.values = tuple(params)
        new._substitute = False
        return new

    # -- shape plumbing ----------------------------------------------------------------
    def flatten(self, z: Any) -> Tensor:
        """A state shaped like ``z0`` (a tensor or pytree) as one ``(B, n)`` tensor."""
        if self.single:
            # A map's output is already (B, n) in the common case: no view op per evaluation.
            # (No `.to` call for the dtype it has: under the capture of the tensors a function
            # reads, each torch call is a Python call of the mode.)
            flat = z if z.shape == (self.batch, self.size) else z.reshape(self.batch, self.size)
            return flat if flat.dtype == self.dtype else flat.to(self.dtype)
        return torch.cat([t.reshape(self.batch, -1).to(self.dtype) for t in leaves(z)], dim=-1)

    def unflatten(self, z: Tensor, dtype: bool = True) -> Any:
        """The ``(B, n)`` state in the structure, shapes (and, if ``dtype``, dtypes) of ``z0``."""
        if self.single:
            return single_state(z, self.leaf_shapes[0], self.leaf_dtypes[0] if dtype else None)
        parts = torch.split(z, list(self.leaf_sizes), dim=-1)
        shaped = [
            p.reshape(s).to(d) if dtype else p.reshape(s)
            for p, s, d in zip(parts, self.leaf_shapes, self.leaf_dtypes, strict=False)
        ]
        return tree_unflatten(shaped, self.spec)

    # -- calling the user's function ---------------------------------------------------
    def _call(self, z: Tensor) -> Any:
        return self.call_user(self.fn, z, self.args, self.kwargs)

    def call_user(
        self, fn: Callable[..., Any], z: Tensor, args: tuple, kwargs: dict[str, Any],
        exclude: tuple[Tensor, ...] = (),
    ) -> Any:
        """``fn(state, *args, **kwargs)`` for a user function of this problem at the flat state
        ``z``, with ``values`` in place of ``params`` wherever it uses them (see :meth:`bind`);
        the state and the tensors in ``exclude`` are never substituted."""
        state = self.unflatten(z)
        if not self._substitute:
            return fn(state, *args, **kwargs)
        mode = Substitute(self.params, self.values, exclude=(z, *leaves(state), *exclude))
        if not kwargs and is_flat(args):  # no pytree walk
            args = tuple(mode._resolve(a) if isinstance(a, Tensor) else a for a in args)
        else:
            args, kwargs = tree_map_only(Tensor, mode._resolve, (args, kwargs))
        with mode:
            return fn(state, *args, **kwargs)

    def probe(self, z: Tensor) -> Any:
        """Call every user function the residual calls, once, at the flat state ``z``, and return
        ``fn``'s output (for :meth:`check_output`). The layer captures the tensors these calls
        use; a kind whose residual calls more than ``fn`` (a proximal operator) calls it here."""
        return self._call(z)

    def probe_plain(self, z: Tensor) -> tuple[Any, bool]:
        """:meth:`probe` without the capture, where that can settle the capture's question:
        ``(output, settled)``, ``settled`` true when no tensor the probe used carries
        derivatives (then it has none to capture). Called with gradients on, at a detached
        ``z``, outside forward mode and ``torch.func`` transforms: there a tensor that requires
        grad and enters a differentiable operation makes the output require grad, and one that
        enters only others (a comparison) must be among the objects ``fn`` names
        (:func:`~implicit_layers._capture.reaches_no_derivatives`). Otherwise (or for a kind
        whose probe calls more than it returns) ``(None, False)``."""
        if not (self.probe_output_covers_inputs and reaches_no_derivatives(self.fn)):
            return None, False
        out = self.probe(z)
        return out, isinstance(out, Tensor) and not out.requires_grad

    def check_output(self, out: object) -> None:
        """Raise a clear error if ``fn``'s output does not fit the problem (here: a state
        shaped like ``z0``)."""
        out_leaves, spec = flatten(out)
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
            shapes = tuple(t.shape if isinstance(t, Tensor) else None for t in out_leaves)
            if spec != self.spec or shapes != self.leaf_shapes:
                raise ValueError(
                    f"{self.name} must return a state with the structure and shapes of z0 "
                    f"({self.spec} with shapes {[tuple(s) for s in self.leaf_shapes]}), got "
                    f"{spec} with shapes {[None if s is None else tuple(s) for s in shapes]}."
                )
        for t in out_leaves:
            if (
                t.is_floating_point() and t.dtype != self.io_dtype and t.dtype not in HALF_DTYPES
                and self.io_dtype not in HALF_DTYPES
            ):
                raise TypeError(
                    f"{self.name} returned dtype {t.dtype} but z0 has dtype {self.io_dtype}; make "
                    "them agree (e.g. call .double() on the module and the inputs)."
                )

    # -- the residual (each kind's own) ---------------------------------------------------
    def fixed_point_map(self, z: Tensor) -> Tensor:
        """``f(z)`` of shape ``(B, n)`` (fixed points only: the residual is ``z - f(z)``)."""
        return self.flatten(self._call(z))

    def objective(self, z: Tensor) -> Tensor:
        """Objective values ``(B,)`` (kinds whose residual is a gradient, :attr:`is_gradient`)."""
        raise TypeError(f"{self.kind} problems have no objective; only argmin problems do.")

    def value_and_grad(self, z: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Objective values ``(B,)`` and gradient ``(B, n)``.

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
            # A value that requires grad through a parameter alone does not depend on w either.
            grad = (torch.autograd.grad(value.sum(), zz, create_graph=create_graph, allow_unused=True)[0]
                    if value.requires_grad else None)
            if grad is None:
                raise ValueError(
                    f"{self.name}(w, ...) does not depend on w (its value does not require "
                    "grad as a function of w), so it has no minimiser to find. Check that the "
                    "objective uses its first argument in differentiable operations."
                )
        if not create_graph:
            value = value.detach()
        return value, grad

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        """The residual ``F(z)`` of shape ``(B, n)``; differentiable if ``create_graph``."""
        raise NotImplementedError

    def pure_residual(self, z: Tensor) -> Tensor:
        """``F(z)`` computed with ``torch.func`` only, so that it can be transformed (no
        ``requires_grad_`` or ``torch.autograd.grad`` inside). The residual itself, for the
        kinds whose residual calls no autograd."""
        return self.residual(z)

    def residual_from_output(self, z: Tensor, out: Any) -> Tensor | None:
        """``F(z)`` ``(B, n)`` from ``fn``'s output ``out`` at ``z`` (checked by
        :meth:`check_output`), for the kinds whose residual is that output rearranged; ``None``
        for the others (the default)."""
        return None

    # -- policy ---------------------------------------------------------------------------
    def adjoint_structure(self) -> tuple[bool | None, bool | None]:
        """``(symmetric, positive_definite)`` of ``∂F/∂z`` as far as the kind knows (``None``:
        unknown), for the linear operator handed to the adjoint solver."""
        return (True if self.symmetric else None), None

    def failure_advice(self, base: str) -> str:
        """``base`` (what to change in the solver) completed with what to check in the problem."""
        return base + "; check that a root exists near z0."

    def default_adjoint_solver(self) -> LinearSolver:
        """The adjoint solver used when none is given (its ``rtol=None`` inherits the forward
        tolerance).

        Non-symmetric problems whose kind does not choose by size (:attr:`adjoint_by_size`;
        fixed points, whose default forward, Adaptive, usually picks the adjoint's solver
        itself): GMRES. Otherwise, while ``n <= 128`` and ``B n³ <= 2^21``: Dense for
        symmetric problems, :class:`~implicit_layers.linear.DenseThenGMRES` for the others
        (GMRES reports a singular Jacobian per sample and carries on, where Dense raises). Then,
        up to ``B n² <= 2^20``, the faster of Dense and the iterative solver (CG if symmetric,
        else GMRES) as measured on the problem's first backwards
        (:mod:`~implicit_layers.linear.timed`); beyond, the iterative solver.
        """
        if not self.symmetric and not self.adjoint_by_size:
            return GMRES()
        n, B = self.size, self.batch
        if n <= DENSE_MAX_SIZE and B * n**3 <= DENSE_MAX_ENTRIES:
            return Dense() if self.symmetric else DenseThenGMRES()
        if B * n**2 <= MEASURED_MAX_ENTRIES:
            return timed_default(self)
        return CG() if self.symmetric else GMRES()

    @classmethod
    def default_forward_solver(cls) -> ForwardSolver:
        """The forward solver of this kind when none is given (Broyden here, for roots)."""
        from .solvers import Broyden  # the solvers import the problem classes

        return Broyden()

    def diagnose(self, z: Tensor, failed: Tensor) -> str:
        """What the kind can tell, cheaply, about why the samples ``failed`` (bool ``(B,)``) of
        the returned ``(B, n)`` point ``z`` did not converge: a sentence for the failure
        message, or ``""``."""
        return ""


class FixedPointProblem(Problem):
    """A fixed point ``z = f(z)``: residual ``z - f(z)``, tolerance relative to ``‖z‖``; the
    Jacobian ``I - ∂f/∂z`` is not symmetric."""

    kind = "fixed_point"
    solvers_hint = "Anderson, Picard or Broyden"
    has_fixed_point_map = True
    relative_to_z = True

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        return self.residual_from_output(z, self._call(z))

    def residual_from_output(self, z: Tensor, out: Any) -> Tensor:
        return z - self.flatten(out)

    def adjoint_structure(self) -> tuple[bool | None, bool | None]:
        return (True if self.symmetric else False), None

    def failure_advice(self, base: str) -> str:
        return base + "; a map that is not contractive may need damping, Anderson or Broyden."

    @classmethod
    def default_forward_solver(cls) -> ForwardSolver:
        """:class:`~implicit_layers.solvers.Adaptive`: plain iteration, Anderson if slow."""
        from .solvers import Adaptive  # the solvers import the problem classes

        return Adaptive()


class RootProblem(Problem):
    """A root ``F(z) = 0``: residual ``F(z)``; its Jacobian is symmetric only if declared."""

    kind = "root"
    solvers_hint = "Broyden, Anderson or Picard"
    adjoint_by_size = True
    residual_is_output = True

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        return self.residual_from_output(z, self._call(z))

    def residual_from_output(self, z: Tensor, out: Any) -> Tensor:
        return self.flatten(out)


class ObjectiveProblem(Problem):
    """The base of the kinds whose ``fn`` returns objective values (one per problem)."""

    def check_output(self, out: object) -> None:
        """Raise a clear error unless ``fn`` returned one objective value per problem."""
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

    def objective(self, z: Tensor) -> Tensor:
        """Objective values ``(B,)`` in the compute dtype."""
        return self._call(z).reshape(self.batch).to(self.dtype)


class MinimiseProblem(ObjectiveProblem):
    """A minimum of ``L``: ``fn`` returns objective values, the residual is ``∇L(z)`` and the
    adjoint system (the Hessian) is symmetric positive definite at a strict minimum."""

    kind = "argmin"
    solvers_hint = "LBFGS, Newton or GradientDescent"
    is_gradient = True
    steps_need_size = True
    adjoint_by_size = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.symmetric = True

    def residual(self, z: Tensor, create_graph: bool = False) -> Tensor:
        return self.value_and_grad(z, create_graph)[1]

    def pure_residual(self, z: Tensor) -> Tensor:
        return torch.func.grad(lambda zz: self.objective(zz).sum())(z)

    def adjoint_structure(self) -> tuple[bool | None, bool | None]:
        return True, True

    def failure_advice(self, base: str) -> str:
        return base + "; check that the objective is bounded below and smooth."

    @classmethod
    def default_forward_solver(cls) -> ForwardSolver:
        """:class:`~implicit_layers.solvers.LBFGS`."""
        from .solvers import LBFGS  # the solvers import the problem classes

        return LBFGS()

    def diagnose(self, z: Tensor, failed: Tensor) -> str:
        """Test the objective's smoothness at the failed samples (two gradient evaluations)."""
        from ._smoothness import looks_non_smooth

        def grad(zz: Tensor) -> Tensor:
            return self.value_and_grad(zz)[1]

        try:
            kinked = looks_non_smooth(grad, z) & failed
        except RuntimeError:  # a gradient that cannot be evaluated there: nothing to add
            return ""
        if not bool(kinked.any()):
            return ""
        return (
            " The objective looks non-smooth at the returned point (its gradient jumps over a "
            "short distance), so gradient-based solvers stall and the implicit derivative there "
            "is meaningless. For an L1 penalty, a constraint or another non-smooth term g, pass "
            "the smooth part as fun and g as prox= (e.g. prox=il.prox.bind(il.prox.l1, lam)) "
            "or constraint=."
        )


#: The problem class of each kind name: ``Problem(name, ...)`` builds ``KINDS[name](...)``.
KINDS: dict[str, type[Problem]] = {
    "fixed_point": FixedPointProblem,
    "root": RootProblem,
    "argmin": MinimiseProblem,
}
