"""The functional API: ``fixed_point``, ``root``, ``argmin``, ``least_squares``, ``custom_root``,
``custom_fixed_point``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._pytree import tree_flatten, tree_map_only

from ._capture import capture, carries_derivatives, reaches_no_derivatives, transforms_active
from ._composite import CompositeProblem, constraint_as_prox
from ._config import check_float_tensor, default_rtol
from ._eager import run_eagerly
from ._info import SolveInfo
from ._least_squares import LeastSquaresProblem
from ._problem import KINDS, FixedPointProblem, Kind, MinimiseProblem, Problem, RootProblem, is_flat
from ._problem import flatten as flatten_tree
from ._problem import leaves as tree_leaves
from ._traced_root import register_layer, traced_custom_root
from .backward import BackwardMode, CompiledImplicit, Implicit, resolve_backward
from .linear._base import LinearSolver
from .solvers import ForwardSolver

__all__ = ["fixed_point", "root", "argmin", "least_squares", "custom_root", "custom_fixed_point"]

Backward = BackwardMode | LinearSolver | None


def _check_common(fn: object, name: str, z0: object, z0_name: str, batched: object) -> Any:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True or False, got {batched!r}.")
    leaves = tree_leaves(z0)
    if isinstance(z0, Tensor) or not leaves:
        check_float_tensor(z0, z0_name)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{z0_name} must be a torch.Tensor, got {type(z0).__name__} (a tuple, list or dict "
                f"of tensors is also accepted, but its leaf {i} is a {type(leaf).__name__})."
            )
        check_float_tensor(leaf, z0_name if isinstance(z0, Tensor) else f"{z0_name} leaf {i}")
        if batched and leaf.dim() < 1:
            raise ValueError(
                f"batched=True needs {z0_name} with a leading batch dimension, got a 0-d tensor."
            )
        if batched and leaf.shape[0] != leaves[0].shape[0]:
            raise ValueError(
                f"batched=True needs every leaf of {z0_name} to have the same leading (batch) "
                f"dimension, got {leaves[0].shape[0]} and {leaf.shape[0]}."
            )
        if leaf.numel() == 0:
            raise ValueError(f"{z0_name} is empty (shape {tuple(leaf.shape)}).")
    return z0


def _derivatives_requested() -> bool:
    return (
        torch.is_grad_enabled() or forward_ad._current_level >= 0 or transforms_active()
    )


def _reverse_mode_only() -> bool:
    """Gradients on, outside forward mode and ``torch.func`` transforms: the only derivatives
    a tensor can carry are reverse mode's, which ``requires_grad`` shows."""
    return torch.is_grad_enabled() and forward_ad._current_level < 0 and not transforms_active()


def _explicit(problem: Problem) -> list[Tensor]:
    """The explicit arguments that carry derivatives (none where no derivatives are requested).
    Each makes the solution carry them too, even where the function ignores it (its derivative
    is then zero), as for torch ops."""
    if not _derivatives_requested():
        return []
    given = tree_leaves(problem.args) + (tree_leaves(problem.kwargs) if problem.kwargs else [])
    return [t for t in given if isinstance(t, Tensor) and carries_derivatives(t)]


def _bind(problem: Problem, z: Tensor, explicit: list[Tensor]) -> Problem:
    """Evaluate the user's function once at the flat state ``z``: check its output, and find
    the tensors it depends on that carry derivatives (the ``explicit`` arguments that do, from
    :func:`_explicit`, and closed-over tensors, module parameters included)."""
    if _derivatives_requested():
        if not explicit and _reverse_mode_only():
            out, settled = problem.probe_plain(z)
            if settled:  # nothing the function used carries derivatives
                problem.check_output(out)
                return problem.with_params(())
        # No graph: the capture only looks at which tensors enter the operations.
        with torch.no_grad():
            out, params = capture(lambda: problem.probe(z), exclude=(z,))
        params = explicit + [t for t in params if all(t is not e for e in explicit)]
    else:
        out, params = problem.probe(z), []
    problem.check_output(out)
    return problem.with_params(params)


def _solve_unbound(
    problem: Problem, z0: Tensor, solver: ForwardSolver, mode: BackwardMode, explicit: list[Tensor]
) -> tuple[Tensor, SolveInfo] | None:
    """The solve before :func:`_bind`, where the solver shows that the function reads no
    tensor carrying derivatives (:meth:`ForwardSolver.solve_unbound`): then the problem has
    no parameters, and the implicit backward modes solve it as it is, without a graph. Tried
    only where that is likely: reverse mode only, no ``explicit`` argument carrying
    derivatives, and a plain function that names none
    (:func:`~implicit_layers._capture.reaches_no_derivatives`); a function that reads one all
    the same is solved again after the binding. ``None`` where not tried or not shown."""
    if explicit or not (isinstance(mode, Implicit) and _reverse_mode_only()
                        and reaches_no_derivatives(problem.fn)):
        return None
    with torch.no_grad():
        return solver.solve_unbound(problem.with_params(()), z0.detach())


@run_eagerly
def _run(
    kind: Kind,
    fn: Callable[..., Any],
    name: str,
    z0: Any,
    z0_name: str,
    args: tuple,
    solver: ForwardSolver | None,
    default_solver: Callable[[], ForwardSolver],
    backward: Backward,
    batched: bool,
    return_info: bool,
    problem_options: dict[str, Any] | None = None,
) -> Any:
    z0 = _check_common(fn, name, z0, z0_name, batched)
    if solver is None:
        solver = default_solver()
    if not isinstance(solver, ForwardSolver):
        raise TypeError(
            "solver must be a forward solver from il.solvers (e.g. il.solvers.Anderson()), got "
            f"{type(solver).__name__}."
            + (" Linear solvers go in backward=." if isinstance(solver, LinearSolver) else "")
        )
    solver.check_kind(kind)
    mode = resolve_backward(backward)
    problem = Problem(kind, fn, args, z0, batched=batched, name=name, **(problem_options or {}))
    # z0 stays attached: Unrolled() differentiates through the initial guess too (MAML).
    z0f = problem.flatten(z0)
    if solver.rtol is None and problem.precision != problem.dtype:
        # The state is iterated in float32 but the map computes in half precision: hold the
        # solve (and the backward, which inherits it) to what that precision can reach.
        solver = solver.replace(rtol=default_rtol(problem.precision))
    explicit = _explicit(problem)
    solved = _solve_unbound(problem, z0f, solver, mode, explicit)
    if solved is None:
        problem = _bind(problem, z0f.detach(), explicit)
        z, info = mode.solve(problem, z0f, solver)
    else:
        z, info = solved
    if not problem.batched and info.converged.numel() == 1:  # (V,) fields under vmap
        info.squeeze_batch()
    z = problem.unflatten(z)
    if not return_info:
        return z
    return z, info


@overload
def fixed_point(
    f: Callable[..., Any], z0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[False] = ...,
) -> Any: ...
@overload
def fixed_point(
    f: Callable[..., Any], z0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[True],
) -> tuple[Any, SolveInfo]: ...
def fixed_point(
    f: Callable[..., Any],
    z0: Any,
    *args: Any,
    solver: ForwardSolver | None = None,
    backward: Backward = None,
    batched: bool = False,
    return_info: bool = False,
) -> Any:
    """Solve ``z = f(z, *args)`` and differentiate the solution.

    Derivatives reach every tensor in ``args`` and every tensor or module parameter the
    function closes over, without listing them. With the implicit backward they are exact to
    every order: ``create_graph=True`` and ``torch.autograd.functional.hessian``, forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``, ``functional_call``).

    Args:
        f: the map, ``f(z, *args)``, returning a state shaped like ``z``.
        z0: initial guess: a tensor, or a tuple/list/dict of tensors (a structured state such
            as a multi-resolution DEQ's); the solution has its structure and shapes.
        *args: extra arguments of ``f``.
        solver: forward solver (default :class:`~implicit_layers.solvers.Adaptive`: plain
            iteration, switching to Anderson acceleration when the observed contraction factor
            exceeds 0.95 or a residual grows).
        backward: backward mode or linear solver (default implicit at the forward tolerance,
            with the linear solver the default forward solver picks from what it observed: a
            Neumann series, finished by GMRES if needed, after plain iteration; GMRES after a
            switch to Anderson, and with any other forward solver). Passing a linear solver
            means :class:`~implicit_layers.backward.Implicit` with it.
        batched: if ``True`` the leading dimension of ``z0`` (of each of its tensors)
            indexes independent problems, each with its own convergence test and statistics.
        return_info: also return a :class:`~implicit_layers.SolveInfo`.

    Returns:
        ``z*`` shaped like ``z0`` (and the info if requested; per sample when ``batched``).

    Raises:
        TypeError, ValueError: a bad argument, or ``f`` returning the wrong shape or dtype.
        ConvergenceError: the solve did not converge and the solver has ``on_failure="raise"``.
        NonFiniteError: an iterate became NaN or Inf.

    Example:
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> x = torch.ones(3, dtype=torch.float64, requires_grad=True)
        >>> z = fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(3, dtype=torch.float64), x)
        >>> z.sum().backward()
    """
    return _run("fixed_point", f, "f", z0, "z0", args, solver,
                FixedPointProblem.default_forward_solver, backward, batched,
                return_info)


@overload
def root(
    F: Callable[..., Any], z0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[False] = ...,
) -> Any: ...
@overload
def root(
    F: Callable[..., Any], z0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[True],
) -> tuple[Any, SolveInfo]: ...
def root(
    F: Callable[..., Any],
    z0: Any,
    *args: Any,
    solver: ForwardSolver | None = None,
    backward: Backward = None,
    batched: bool = False,
    return_info: bool = False,
) -> Any:
    """Solve ``F(z, *args) = 0`` and differentiate the solution.

    Derivatives reach every tensor in ``args`` and every tensor or module parameter the
    function closes over, without listing them. With the implicit backward they are exact to
    every order: ``create_graph=True`` and ``torch.autograd.functional.hessian``, forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``, ``functional_call``).

    Args:
        F: the residual, ``F(z, *args)``, returning a state shaped like ``z``.
        z0: initial guess: a tensor or a tuple/list/dict of tensors.
        *args: extra arguments of ``F``.
        solver: forward solver (default :class:`~implicit_layers.solvers.Broyden`).
        backward: backward mode or linear solver (default implicit at the forward
            tolerance: :class:`~implicit_layers.linear.Dense` up to 128 unknowns, with
            :class:`~implicit_layers.linear.GMRES` where the Jacobian is singular; above, up to
            ``B n² <= 2^20``, the faster of Dense and GMRES as measured on the first
            backwards; GMRES beyond; see [How to choose][how-to-choose]). Passing a linear solver means
            :class:`~implicit_layers.backward.Implicit` with it.
        batched: if ``True`` the leading dimension of ``z0`` (of each of its tensors)
            indexes independent problems, each with its own convergence test and statistics.
        return_info: also return a :class:`~implicit_layers.SolveInfo`.

    Returns:
        ``z*`` shaped like ``z0`` (and the info if requested).

    Raises:
        TypeError, ValueError: a bad argument, or ``F`` returning the wrong shape or dtype.
        ConvergenceError: the solve did not converge and the solver has ``on_failure="raise"``.
        NonFiniteError: an iterate became NaN or Inf.

    Example:
        >>> a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> z = root(lambda z, a: z**3 - a, torch.ones(2, dtype=torch.float64), a)  # cube roots
        >>> z.sum().backward()  # a.grad = 1 / (3 z²)
    """
    return _run("root", F, "F", z0, "z0", args, solver, RootProblem.default_forward_solver,
                backward, batched, return_info)


@overload
def argmin(
    fun: Callable[..., Tensor], w0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[False] = ...,
    prox: Callable[..., Any] | None = ..., constraint: Callable[..., Any] | None = ...,
) -> Any: ...
@overload
def argmin(
    fun: Callable[..., Tensor], w0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[True],
    prox: Callable[..., Any] | None = ..., constraint: Callable[..., Any] | None = ...,
) -> tuple[Any, SolveInfo]: ...
def argmin(
    fun: Callable[..., Tensor],
    w0: Any,
    *args: Any,
    solver: ForwardSolver | None = None,
    backward: Backward = None,
    batched: bool = False,
    return_info: bool = False,
    prox: Callable[..., Any] | None = None,
    constraint: Callable[..., Any] | None = None,
) -> Any:
    """Minimise ``fun(w, *args)`` over ``w`` and differentiate the minimiser.

    The implicit gradient solves ``H u = g`` with ``H`` the Hessian at the minimum (by
    Hessian-vector products; the Hessian is only formed by ``il.linear.Dense``, the default
    for small problems).

    Derivatives reach every tensor in ``args`` and every tensor or module parameter the
    function closes over, without listing them. With the implicit backward they are exact to
    every order: ``create_graph=True`` and ``torch.autograd.functional.hessian``, forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``, ``functional_call``).

    Args:
        fun: the objective: a scalar, or with ``batched=True`` one value per problem, shape
            ``(B,)``.
        w0: initial guess: a tensor or a tuple/list/dict of tensors.
        *args: extra arguments of ``fun``.
        solver: forward solver (default :class:`~implicit_layers.solvers.LBFGS`).
        backward: backward mode or linear solver (default implicit with
            :class:`~implicit_layers.linear.Dense` for at most 128 unknowns, then the faster
            of Dense and :class:`~implicit_layers.linear.CG` as measured on the first
            backwards (see [How to choose][how-to-choose]), CG for large problems; at the forward
            tolerance). Passing a linear solver means
            :class:`~implicit_layers.backward.Implicit` with it.
        batched: if ``True`` the leading dimension of ``w0`` (of each of its tensors)
            indexes independent problems, each with its own convergence test and statistics.
        return_info: also return a :class:`~implicit_layers.SolveInfo`.
        prox: minimise ``fun + g`` instead, with ``prox(w, step)`` the proximal operator of
            ``step·g`` (e.g. ``il.prox.bind(il.prox.l1, lam)``). The default solver is then
            :class:`~implicit_layers.solvers.ProximalGradient`, and the implicit backward
            differentiates the proximal-gradient fixed point
            ``w = prox(w - ∇fun(w), 1)`` exactly wherever ``prox`` is differentiable (default
            linear solver Dense for small problems, GMRES for large ones; the system is not
            symmetric). Tensors ``prox`` closes over (a learnable strength) receive
            gradients. ``step`` is a float or a tensor that broadcasts against ``w``.
        constraint: minimise ``fun`` over a set given by its Euclidean projection
            ``constraint(w)`` (e.g. ``lambda w: il.projection.simplex(w, total)``); the same
            as ``prox=`` the set's indicator. Not together with ``prox``.

    Returns:
        ``w*`` shaped like ``w0`` (and the info if requested).

    Raises:
        TypeError, ValueError: a bad argument, an objective of the wrong shape, or one that
            does not depend on ``w``.
        ConvergenceError: the solve did not converge and the solver has ``on_failure="raise"``.
        NonFiniteError: an iterate became NaN or Inf.

    Example:
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> w = argmin(lambda w, lam: (X @ w - y).square().sum() + lam * w.square().sum(),
        ...            torch.zeros(3, dtype=torch.float64), lam)
        >>> w.sum().backward()  # d sum(w*) / d lam in lam.grad
    """
    if prox is None and constraint is None:
        return _run("argmin", fun, "fun", w0, "w0", args, solver,
                    MinimiseProblem.default_forward_solver, backward, batched, return_info)
    if prox is not None and constraint is not None:
        raise ValueError(
            "pass prox or constraint, not both; for a set and a penalty together, pass one prox "
            "that applies both (e.g. il.prox.nonnegative_l1 for an l1 penalty on w >= 0)."
        )
    given, given_name = (prox, "prox") if prox is not None else (constraint, "constraint")
    if not callable(given):
        raise TypeError(f"{given_name} must be callable, got {type(given).__name__}.")
    options = {"prox": prox if prox is not None else constraint_as_prox(given),
               "prox_name": given_name}
    return _run("composite", fun, "fun", w0, "w0", args, solver,
                CompositeProblem.default_forward_solver, backward, batched, return_info, options)


@overload
def least_squares(
    residual: Callable[..., Tensor], w0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[False] = ...,
) -> Any: ...
@overload
def least_squares(
    residual: Callable[..., Tensor], w0: Any, *args: Any, solver: ForwardSolver | None = ...,
    backward: Backward = ..., batched: bool = ..., return_info: Literal[True],
) -> tuple[Any, SolveInfo]: ...
def least_squares(
    residual: Callable[..., Tensor],
    w0: Any,
    *args: Any,
    solver: ForwardSolver | None = None,
    backward: Backward = None,
    batched: bool = False,
    return_info: bool = False,
) -> Any:
    """Minimise ``½‖residual(w, *args)‖²`` over ``w`` and differentiate the minimiser.

    The implicit gradient is exact at every residual: it solves with the full Hessian of
    ``½‖r‖²``, ``JᵀJ + Σ rᵢ ∇²rᵢ`` (by Hessian-vector products; formed only by
    ``il.linear.Dense``, the default for small problems), not with the Gauss-Newton matrix
    ``JᵀJ``, which is exact only where the residual vanishes at the solution.

    Derivatives reach every tensor in ``args`` and every tensor or module parameter the
    function closes over, to every order and under ``torch.func`` transforms, as for
    :func:`argmin`.

    Args:
        residual: the residuals ``r(w, *args)``: a tensor of any shape (with ``batched=True``,
            of shape ``(B, ...)``, one row per problem).
        w0: initial guess: a tensor or a tuple/list/dict of tensors.
        *args: extra arguments of ``residual``.
        solver: forward solver (default
            :class:`~implicit_layers.solvers.LevenbergMarquardt`;
            :class:`~implicit_layers.solvers.GaussNewton` and the argmin solvers also apply).
        backward: backward mode or linear solver (default implicit, as for :func:`argmin`).
        batched: if ``True`` the leading dimension of ``w0`` and of the residuals indexes
            independent problems (a batch of curve fits), each with its own damping and
            convergence test.
        return_info: also return a :class:`~implicit_layers.SolveInfo`.

    Returns:
        ``w*`` shaped like ``w0`` (and the info if requested).

    Raises:
        TypeError, ValueError: a bad argument, or residuals that are not a floating tensor
            (with one row per problem when batched).
        ConvergenceError: the solve did not converge and the solver has ``on_failure="raise"``.

    Example:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-3.0 * t) + 0.01 * torch.sin(40 * t)
        >>> w = least_squares(lambda w, y: w[0] * torch.exp(-w[1] * t) - y,
        ...                   torch.ones(2, dtype=torch.float64), y.requires_grad_())
        >>> w.sum().backward()  # d(w0 + w1)/dy in y.grad
    """
    return _run("least_squares", residual, "residual", w0, "w0", args, solver,
                LeastSquaresProblem.default_forward_solver, backward, batched, return_info)


def _custom(
    kind: Kind,
    fn: Callable[..., Any],
    name: str,
    backward: Backward,
    batched: bool,
    symmetric: bool,
    rtol: float | None,
    has_aux: bool,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
    mode = resolve_backward(backward)

    def decorator(solver_fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(solver_fn):
            raise TypeError(f"the decorated solver must be callable, got {type(solver_fn).__name__}.")

        @functools.wraps(solver_fn)
        @run_eagerly
        def wrapped(z0: Any, *args: Any, **kwargs: Any) -> Any:
            z0 = _check_common(fn, name, z0, "z0", batched)
            result = _run_black_box(solver_fn, z0, _detached(args), _detached(kwargs))
            aux = None
            if has_aux:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise ValueError(
                        f"with has_aux=True the decorated solver {solver_fn.__name__} must return "
                        f"a pair (z, aux), got {type(result).__name__}."
                    )
                result, aux = result
            problem = Problem(kind, fn, args, z0, batched=batched, name=name,
                              symmetric=symmetric, kwargs=kwargs)
            try:
                z = problem.flatten(result).detach()
            except (AttributeError, RuntimeError, TypeError, ValueError):
                z = None
            spec = flatten_tree(result)[1]
            if z is None or spec != problem.spec or z.shape != (
                problem.batch, problem.size
            ):
                raise ValueError(
                    f"the decorated solver {solver_fn.__name__} must return a solution shaped like "
                    f"z0 ({_describe(z0)}), got {_describe(result)}."
                )
            tol = default_rtol(problem.dtype) if rtol is None else rtol
            explicit = _explicit(problem)
            # A mode that records the function at the solution for its backward may do it in
            # the call that finds the tensors to differentiate.
            recorded = mode._bind_recorded(problem, z, explicit) if _reverse_mode_only() else None
            if recorded is not None:
                problem, recording = recorded
                z = mode._attach_recorded(problem, z, tol, recording)
            else:
                problem = _bind(problem, z, explicit)
                if _derivatives_requested():
                    z = mode.attach(problem, z, tol)
            out = problem.unflatten(z)
            return (out, aux) if has_aux else out

        if not (KINDS[kind].residual_is_output and symmetric and isinstance(mode, CompiledImplicit)):
            return wrapped
        cg = mode.cg
        key = register_layer(fn, batched, cg, rtol, name)

        @functools.wraps(solver_fn)
        def traced_or_eager(z0: Any, *args: Any, **kwargs: Any) -> Any:
            # Under torch.compile the whole layer traces into the caller's graph (no break);
            # what the traced form does not cover runs eagerly, as one break.
            if torch.compiler.is_compiling() and isinstance(z0, Tensor) and not kwargs:
                out = traced_custom_root(key, fn, solver_fn, z0, args, batched, has_aux)
                if out is not None:
                    return out
            return wrapped(z0, *args, **kwargs)

        return traced_or_eager

    return decorator


_NO_GRAD_MESSAGE = "does not require grad and does not have a grad_fn"


def _run_black_box(
    solver_fn: Callable[..., Any], z0: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``solver_fn(z0, *args, **kwargs)`` on detached inputs.

    An inner loop that calls ``torch.autograd.grad`` on its own variables (torchopt / jaxopt
    style) fails on a detached ``z0``; it runs again with ``z0``'s floating-point tensors as
    leaves that require grad. A detached ``z0`` comes first, so that solvers which clone it
    into their own leaves (``torch.optim``) keep working.
    """
    try:
        return solver_fn(_detached(z0), *args, **kwargs)
    except RuntimeError as err:
        if _NO_GRAD_MESSAGE not in str(err) or not torch.is_grad_enabled():
            raise
    try:
        return solver_fn(_differentiable_leaves(z0), *args, **kwargs)
    except RuntimeError as err:
        if _NO_GRAD_MESSAGE not in str(err):
            raise
        name = getattr(solver_fn, "__name__", type(solver_fn).__name__)
        raise RuntimeError(
            f"the solver decorated by custom_root/custom_fixed_point ({name}) differentiates "
            "a tensor that does not require grad, even with z0's tensors passed as leaves that "
            "require grad. Its other inputs (args, kwargs) arrive detached: inside the solver, "
            "differentiate with respect to its own copies, e.g. t = t.detach().requires_grad_()."
        ) from err


def _detached(tree: Any) -> Any:
    """``tree`` with every tensor detached (a tensor, a flat tuple or list or an empty dict
    without a pytree walk: this runs on every call of a ``custom_root`` layer)."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if is_flat(tree):
        return type(tree)(x.detach() if isinstance(x, Tensor) else x for x in tree)
    if type(tree) is dict and not tree:
        return {}
    return tree_map_only(Tensor, lambda t: t.detach(), tree)


def _differentiable_leaves(state: Any) -> Any:
    """``state`` detached, each floating-point tensor a new leaf that requires grad (when
    autograd can record)."""
    record = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def leaf(t: Tensor) -> Tensor:
        t = t.detach()
        return t.requires_grad_(True) if record and (t.is_floating_point() or t.is_complex()) else t

    return tree_map_only(Tensor, leaf, state)


def _describe(state: object) -> str:
    if isinstance(state, Tensor):
        return f"shape {tuple(state.shape)}"
    leaves, spec = tree_flatten(state)
    if leaves and all(isinstance(t, Tensor) for t in leaves):
        return f"{spec} with shapes {[tuple(t.shape) for t in leaves]}"
    return type(state).__name__


def custom_root(
    optimality_fn: Callable[..., Tensor],
    backward: Backward = None,
    *,
    batched: bool = False,
    symmetric: bool = False,
    rtol: float | None = None,
    has_aux: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorate any solver ``solver(z0, *args) -> z*`` so that ``z*`` is differentiated implicitly.

    ``optimality_fn(z, *args)`` must vanish at the solution (for a minimiser: the gradient of
    the objective). The wrapped solver runs as a black box on detached inputs (autograd stays
    enabled, so it may use ``torch.optim``). An inner loop that calls ``torch.autograd.grad``
    with respect to its own variables (torchopt / jaxopt style) and fails on the detached
    ``z0`` is run again with ``z0``'s floating-point tensors as leaves that require grad. The
    gradient is then attached by the implicit function theorem, reaching ``args`` and whatever
    ``optimality_fn`` closes over.

    Args:
        optimality_fn: the residual ``F(z, *args)``, shaped like ``z``.
        backward: backward mode or linear solver (default implicit with GMRES, or CG when
            ``symmetric``; Dense instead for small systems (GMRES where a small
            non-symmetric one is singular) and where the first backwards of a mid-sized one
            measure it faster, see [How to choose][how-to-choose]).
            ``Unrolled()`` is not possible for a black box.
        batched: leading dimension indexes independent problems.
        symmetric: declare ``∂F/∂z`` symmetric (true when ``F`` is a gradient), which lets the
            default backward use CG.
        rtol: tolerance of the backward solve when its linear solver has ``rtol=None``
            (default: ``1e-10`` in float64, ``1e-5`` in float32).
        has_aux: the solver returns ``(z*, aux)``; the decorated function then returns
            ``(z*, aux)`` too, ``aux`` passed through without an implicit gradient.

    The decorated function is called as ``solver(z0, *args, **kwargs)``; ``optimality_fn``
    receives the same ``*args`` and ``**kwargs``. ``z0`` may be a tuple/list/dict of tensors.

    Under ``torch.compile`` the layer runs eagerly, as one graph break, except with
    ``backward=il.backward.CompiledImplicit(...)`` and ``symmetric=True`` (a tensor ``z0``,
    tensor arguments, no keyword arguments): the solver and one call of ``optimality_fn`` then
    trace into the caller's graph, whose backward calls the compiled adjoint CG as one
    operator; such a graph may be compiled with ``fullgraph=True``.

    Returns:
        The decorator. The decorated solver returns ``z*`` (and ``aux``), differentiable to
        every order in ``args``, ``kwargs`` and what ``optimality_fn`` closes over.

    Raises:
        ValueError: the solver returns a solution not shaped like ``z0``.

    Example:
        >>> @custom_root(lambda w, lam: X.T @ (X @ w - y) + lam * w, symmetric=True)
        ... def ridge(w0, lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ y)
    """
    return _custom("root", optimality_fn, "optimality_fn", backward, batched, symmetric, rtol,
                   has_aux)


def custom_fixed_point(
    T: Callable[..., Tensor],
    backward: Backward = None,
    *,
    batched: bool = False,
    rtol: float | None = None,
    has_aux: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Like :func:`custom_root` for a solver of ``z = T(z, *args)``.

    Args:
        T: the fixed-point map, ``T(z, *args) -> tensor shaped like z``.
        backward: backward mode or linear solver (default implicit with GMRES).
        batched: leading dimension indexes independent problems.
        rtol: tolerance of the backward solve when its linear solver has ``rtol=None``.
        has_aux: the solver returns ``(z*, aux)`` (see :func:`custom_root`).

    Returns:
        The decorator (see :func:`custom_root`).

    Example:
        >>> @custom_fixed_point(lambda z, a: 0.5 * torch.cos(z) + a)
        ... def solve(z0, a):
        ...     z = z0
        ...     for _ in range(100):
        ...         z = 0.5 * torch.cos(z) + a
        ...     return z
    """
    return _custom("fixed_point", T, "T", backward, batched, False, rtol, has_aux)
