"""Implicit differentiation whose adjoint solve is one compiled conjugate-gradient loop.

On small problems the cost of an eager backward is the Python and dispatch overhead of each CG
iteration (a VJP through a recorded graph plus a dozen small ops), not its arithmetic: ridge
regression at d = 200 spends about 150 µs per iteration on a 200 x 200 product that takes 6 µs.
:class:`CompiledImplicit` runs the first-order adjoint solve ``A u = g`` (``A = ∂F/∂z``
symmetric positive definite: argmin problems, symmetric roots) as one
``torch._higher_order_ops.while_loop`` compiled by ``torch.compile(fullgraph=True)``. The loop
re-linearises the user's function at ``z*`` on each pass (a traced loop cannot keep an autograd
graph across passes) and takes four CG steps from that linearisation, so the compiler sees the
whole product and fuses it with the CG updates.

Everything else is the eager implicit layer of :class:`~implicit_layers.backward.Implicit`:
the forward, the parameter gradients ``-(∂F/∂θ)ᵀ u`` (one VJP through a graph of ``F`` recorded
by the backward, in the same call of the function that checks which tensors it reads; for
``custom_root``, by the forward's call that finds them, checked by the loop's report of the
tensors it read, see :mod:`._compiled_reads`), the
verdicts and warnings, and every path the compiled loop does not serve
(``create_graph=True``, ``torch.func`` transforms, forward mode, the solves of a double
backward), which run the same CG settings eagerly.

The loop's iterates are those of :class:`~implicit_layers.linear.CG` (same per-sample step
sizes, stopping rule ``‖r‖ <= max(atol, rtol ‖g‖)``, stop at non-positive curvature); the
compiled arithmetic may reorder floating-point sums, so results agree to rounding.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from ._capture import capture, modes_active, transforms_active
from ._compile_failures import failed_to_compile, function_key, note_compile_failure
from ._compiled_reads import with_reads
from ._guarded_call import compile_loop
from ._implicit import ImplicitCore, _Repeated, implicit_solution
from ._info import NonFiniteError, SolveInfo, compiled_loop_info, report_failure, user_stacklevel
from ._linearize import RecordedLinearization
from ._problem import Problem
from .backward import Implicit
from .linear.cg import CG

__all__ = ["CompiledImplicit"]

T = TypeVar("T")


class CompiledImplicit(Implicit):
    """Implicit differentiation with the first-order adjoint solve compiled (CG).

    The backward solves ``(∂F/∂z)ᵀ u = g`` with conjugate gradients as one compiled loop
    (``torch._higher_order_ops.while_loop`` under ``torch.compile(fullgraph=True)``): one graph,
    fused kernels, no Python per iteration. For problems whose Jacobian is symmetric positive
    definite at the solution: ``argmin``, and ``custom_root`` / ``root`` with
    ``symmetric=True``.

    The first backward of a problem compiles the loop (8-47 s on one CPU core with a cold
    compile cache, 3-14 s with torch's on-disk cache warm); later calls with the same function
    reuse it (new values and a new ``max_steps`` do not compile again; a new batch size, dtype
    or problem size does). Past dynamo's ``recompile_limit`` (8) variants of one function, its
    new shapes solve eagerly, with a ``RuntimeWarning``.

    It pays when the same problem is differentiated many times and each CG iteration is cheap
    next to Python's overhead: ridge regression at d = 200 takes 0.57x the eager Dense
    backward's forward + backward time and 0.22x eager CG's
    (``python -m benchmarks.ridge_breakdown``).

    With ``custom_root`` the function is called once per forward + backward: the forward's
    call, which finds the tensors it reads, also records it for the parameter gradient, and
    the compiled loop reports which tensors carrying derivatives it read at the backward.
    Otherwise (``argmin``, ``root``) the forward records nothing, and before each compiled
    solve the backward calls the function once, recording it and checking that it still
    reads the tensors the layer was called with (the loop traces it as it is then). Where it
    does not (module parameters swapped in by a ``torch.func.functional_call`` that has
    returned, a closure rebound since), that backward runs the eager CG, which substitutes
    the saved tensors.

    Paths the compiled loop does not serve run eagerly with the same CG settings, with the
    same results: ``create_graph=True`` (double backward), ``torch.func`` transforms
    (``grad``, ``vmap``, ``jacrev``, ``jvp``) and forward-mode AD.

    Inside a function compiled by ``torch.compile``, a ``custom_root`` layer with this mode
    (a tensor ``z0``, tensor arguments, no keyword arguments) traces into the caller's graph
    instead of running as a graph break: its solver and one call of the optimality function
    compile with the rest, and the backward graph calls this CG loop as one opaque operator
    (``fullgraph=True`` holds), with the same verdicts. Where torch's compiler fails on the
    loop itself (in torch 2.13, ``.T`` of a tensor the function closes over), the adjoint
    solves run the eager CG, after a ``RuntimeWarning``.

    Args:
        linear_solver: the CG settings (``rtol``, ``atol``, ``max_steps``, ``on_failure``;
            ``check_every`` is not used: the compiled loop tests once per pass of four steps).
            Default ``CG()``; ``rtol=None`` inherits the forward solver's tolerance.

    Raises:
        TypeError: if ``linear_solver`` is not an :class:`~implicit_layers.linear.CG`.
        ValueError: when differentiating a problem whose Jacobian is not declared symmetric
            (a fixed point, or a root without ``symmetric=True``), or, in the backward, a
            function that ``torch.compile(fullgraph=True)`` cannot trace (``.item()``, Python
            branches on tensor values).
        RuntimeError: in the backward, where the compiler itself fails on the traced loop.

    Warns:
        implicit_layers.ConvergenceWarning: when a sample's adjoint solve does not converge
            (per ``on_failure`` of the CG settings), as the eager CG does.

    Examples:
        >>> theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> w = il.argmin(lambda w, t: ((w - t) ** 2).sum() + (w**4).sum(),
        ...               torch.zeros(2, dtype=torch.float64), theta,
        ...               backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-10)))
        >>> w.sum().backward()  # doctest: +SKIP
    """

    def __init__(self, linear_solver: CG | None = None) -> None:
        if linear_solver is not None and type(linear_solver) is not CG:
            raise TypeError(
                "CompiledImplicit compiles the conjugate-gradient loop only: linear_solver must "
                f"be il.linear.CG(...), got {type(linear_solver).__name__}. For another linear "
                "solver use il.backward.Implicit(solver) (eager)."
            )
        super().__init__(CG() if linear_solver is None else linear_solver)

    @property
    def cg(self) -> CG:
        """The CG settings of the adjoint solve."""
        return self.linear_solver  # type: ignore[return-value]  # a CG: __init__ checks it

    def _bind_recorded(
        self, problem: Problem, z: Tensor, explicit: list[Tensor]
    ) -> tuple[Problem, object] | None:
        """One call of the function at ``z`` (``custom_root``) that finds the tensors it reads
        carrying derivatives and records it for the parameter gradient; the backward then
        calls it no more (its compiled loop reports which tensors it read). ``None`` for a
        kind whose residual is not the function's output, or where a tensor found has a graph
        of its own (a parameter computed from another, or a gradient the function takes of
        one, which the capture sees as an outside tensor): then the ordinary two calls."""
        z = z.detach()

        def call() -> Tensor | None:
            out = problem.probe(z)
            problem.check_output(out)
            return problem.residual_from_output(z, out)

        with torch.enable_grad():
            residual, used = capture(call, exclude=(z,))
        if residual is None or any(t.grad_fn is not None for t in (*explicit, *used)):
            return None
        params = explicit + [t for t in used if all(t is not e for e in explicit)]
        bound = problem.with_params(params)
        # What the compiled loop must read for its operator to be this one: the tensors the
        # call used (an explicit argument the function ignores is a parameter, not a read).
        return bound, _CheckedLinearization(bound, z, residual, frozenset(id(t) for t in used))

    def _attach_recorded(self, problem: Problem, z: Tensor, forward_rtol: float, recording: object) -> Tensor:
        if not problem.params:
            return z
        core = self._core(problem, lambda bound, start: (start, None), forward_rtol, None)
        assert isinstance(core, _CompiledCore) and isinstance(recording, _CheckedLinearization)
        core.bound_recording = recording
        return implicit_solution(core, z)

    def _core(self, problem: Problem, forward: Any, forward_rtol: float, solver: Any) -> ImplicitCore:
        if not problem.symmetric:
            raise ValueError(
                f"CompiledImplicit solves the adjoint system with CG, which needs a symmetric "
                f"Jacobian; this {problem.kind} problem's is not declared symmetric. Use it for "
                "argmin, or custom_root/root with symmetric=True; otherwise use "
                "il.backward.Implicit(il.linear.GMRES())."
            )
        core = super()._core(problem, forward, forward_rtol, solver)
        return _CompiledCore(core.problem, core._forward, core.linear, core.solver, core.choose)


class _CompiledCore(ImplicitCore):
    """The implicit core whose first-order adjoint solve runs :func:`_cg_loop` compiled.

    Its forward records nothing: an ordinary backward calls the function once, recording it
    for the parameter gradient and checking, in the same call, which tensors it reads (the
    compiled loop traces the function as it is at the backward). For ``custom_root`` the
    call that found the parameters recorded it already (:attr:`bound_recording`); the
    compiled loop's report of what it read is then the check.
    """

    records_at_forward = False
    #: The recording of the current backward, by a function checked to read its parameters.
    _checked: object = None
    #: The recording made by the call that found the parameters (``custom_root``), if any:
    #: checked by the compiled loop's report of what it read, not by a call of its own.
    bound_recording: _CheckedLinearization | None = None

    def _recorded_linearization(self, z: Tensor, values: tuple[Tensor, ...]) -> RecordedLinearization:
        params = self.problem.params
        if (self.linearization is None and not torch.is_grad_enabled() and not transforms_active()
                and len(values) == len(params)
                and all(v is p for v, p in zip(values, params, strict=True))):
            if self.bound_recording is not None:
                self._checked = self.bound_recording
                return self.bound_recording  # type: ignore[return-value]
            lin = _record_checked(self.problem, z)
            if lin is not None:
                self._checked = lin
                return lin  # type: ignore[return-value]
        # A function that now reads other tensors: recorded with the saved tensors
        # substituted, solved eagerly.
        return super()._recorded_linearization(z, values)

    def linear_solve(self, lin: Any, rhs: Tensor, transpose: bool) -> Tensor:
        compiled = (
            transpose and lin is self._checked and not torch.is_grad_enabled()
            and not transforms_active() and not modes_active() and rhs.shape[0] == self.problem.batch
        )
        if not compiled:  # higher orders, transforms, tangents, folded batches: eagerly
            checked = lin.lin if isinstance(lin, _Repeated) else lin
            if isinstance(checked, _CheckedLinearization):
                # The eager solve's products with ∂F/∂z: recorded now, since the solve may
                # take them under a vmap (the cotangents of is_grads_batched=True), where
                # autograd cannot record.
                checked.record_products()
            return super().linear_solve(lin, rhs, transpose)
        cg: CG = self.linear.adjoint  # type: ignore[assignment]
        # The problem as called (its own parameters, no substitution): the loop traces the
        # user's function as it is, reading the tensors it reads now, which were just checked
        # to be the parameters the layer was called with.
        problem = self.problem
        tol = torch.clamp(cg.resolved_rtol(rhs.dtype) * torch.linalg.vector_norm(rhs, dim=-1), min=cg.atol)
        # max_steps travels as a tensor: a new limit is a new input, not a new compilation.
        limit = torch.tensor(cg.max_steps, device=rhs.device)
        loop = _compiled_cg(problem.fn)
        # Contiguous inputs: the graph is specialised to strides (the cotangent of a sum is
        # an expanded tensor of stride 0, which would compile a second graph).
        point = lin.z if isinstance(lin, _CheckedLinearization) else lin.zr.detach()
        ran = guarded_loop(lambda: with_reads(
            lambda: loop(problem.pure_residual, point.contiguous(), rhs.contiguous(), tol, limit)),
            problem.fn, problem.name)
        if ran is None:  # the loop cannot serve this function (warned): solve eagerly
            return super().linear_solve(lin, rhs, transpose)
        (u, res, steps, converged, flags), reads = ran
        bound = self.bound_recording
        if lin is bound and bound is not None and (
                reads is None or {id(t) for t in reads} != bound.read_ids):
            # The function reads other tensors than when the layer was called (or no graph
            # ran to say): the eager solve, whose products go through the saved tensors.
            return super().linear_solve(bound.record_products(), rhs, transpose)
        info = loop_verdict(res, steps, converged, tol, flags, cg.on_failure,
                            f"backward (adjoint) solve of {problem.kind}", cg._advice())
        if self.info is not None:
            self.info.backward = info if problem.batched else info.squeeze_batch()
        return u


def guarded_loop(call: Callable[[], T], fn: Any, name: str) -> T | None:
    """``call()``, a call of the compiled CG loop through the user function ``fn`` (``name``
    in messages), or ``None`` where the loop cannot serve it and the adjoint is to be solved by
    the eager CG: past dynamo's recompile limit, and where torch's tracer fails internally on
    a function that is fine (each warned; the latter remembered, see
    :mod:`._compile_failures`).

    Raises:
        ValueError: for a function that cannot be traced (``.item()``, a Python branch on a
            value: the user's to change).
        RuntimeError: where the traced loop's compiler failed.
    """
    if failed_to_compile(fn):
        return None
    try:
        return call()
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        # More shapes or dtypes of this function than dynamo compiles.
        _warn_recompile_limit(fn)
        return None
    except torch._dynamo.exc.BackendCompilerFailed as exc:  # traced; the compiler failed
        raise RuntimeError(
            f"CompiledImplicit traced the adjoint loop through {name}, but torch.compile's "
            f"compiler failed on it ({str(exc).splitlines()[0]}). Use backward=il.linear.CG(...) "
            "(the same steps, eagerly)."
        ) from exc
    except torch._dynamo.exc.TorchDynamoException as exc:  # tracing
        raise ValueError(
            f"CompiledImplicit could not compile the adjoint loop through {name} "
            f"(torch.compile: {str(exc).splitlines()[0]}). The function must be traceable by "
            "torch.compile(fullgraph=True): torch operations only, no .item(), .tolist() or "
            "Python branches on tensor values. Use backward=il.linear.CG(...) (eager) for it."
        ) from exc
    except Exception as exc:  # noqa: BLE001  (torch's tracer failed on a traceable function)
        # Not the function's fault (an internal error of torch.compile, e.g. on `.T` of a
        # tensor the function closes over): the eager CG, whose products run the function as
        # it is, gives the same solution; a function that is itself wrong fails there.
        note_compile_failure(fn, f"CompiledImplicit (the adjoint loop through {name})",
                             "its adjoint solves run the eager CG", exc)
        return None


def loop_verdict(res: Tensor, steps: Tensor, converged: Tensor, tol: Tensor, flags: Tensor,
                 on_failure: str, what: str, advice: str) -> SolveInfo:
    """The statistics of a compiled CG loop ((B,) each; ``flags`` as :func:`_cg_loop`
    returns them), with the eager CG's verdicts: an error for NaN or Inf, a warning or an
    error (per ``on_failure``) for samples that did not converge."""
    info, finite = compiled_loop_info(flags, converged=converged, steps=steps, residual=res,
                                      tolerance=tol, solver="CG (compiled)")
    if not finite:
        raise NonFiniteError(
            "CG: the residual of the compiled adjoint solve became NaN or Inf. Check the "
            "function for NaN at the solution; its Jacobian (an objective's Hessian) there "
            "must be finite."
        )
    report_failure(info, on_failure, what, advice)  # type: ignore[arg-type]
    return info


_WARNED: set[int] = set()


def _warn_recompile_limit(fn: Any) -> None:
    """Say once per function that its adjoint solves now run eagerly."""
    key = id(function_key(fn))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        "CompiledImplicit: torch.compile has compiled the adjoint loop for as many shapes and "
        f"dtypes of this function as torch._dynamo.config.recompile_limit allows "
        f"({torch._dynamo.config.recompile_limit}); its further new shapes solve eagerly (same "
        "results, eager speed). Raise that limit if it has many input shapes.",
        RuntimeWarning, stacklevel=user_stacklevel(),
    )


class _CheckedLinearization:
    """``F`` recorded at a point held constant, for the parameter gradient ``(∂F/∂θ)ᵀ u``,
    by a function checked to read exactly the layer's parameters (see
    :func:`_record_checked`). Products with ``∂F/∂z`` (an eager solve, when the compiled loop
    cannot serve) record ``F`` again, with the point as a variable, on first use.

    Args:
        problem: the problem as called (its parameters, no substitution).
        z: the point ``(B, n)``, detached.
        out: ``F(z)`` already recorded (differentiable in the parameters) by the call that
            found the parameters; ``None``: recorded here.
        read_ids: with ``out``, the ids of the tensors carrying derivatives that this call
            used, against which the compiled loop's reads are checked. Such a recording has
            not been checked by a call of its own since the layer was called: its products
            record the function through the saved tensors.
    """

    def __init__(self, problem: Problem, z: Tensor, out: Tensor | None = None,
                 read_ids: frozenset[int] | None = None) -> None:
        self.problem = problem
        self.z = z
        self.params = problem.params
        self._products: RecordedLinearization | None = None
        self.read_ids = read_ids
        # Differentiable in the parameters only: no graph of the derivatives in z is built.
        if out is None:
            with torch.enable_grad():
                out = problem.residual(z, create_graph=True)
        self.out = out

    def param_vjp(self, u: Tensor) -> tuple[Tensor | None, ...]:
        if not self.out.requires_grad:
            return tuple(None for _ in self.params)
        return torch.autograd.grad(self.out, self.params, u, retain_graph=True, allow_unused=True)

    def record_products(self) -> RecordedLinearization:
        """The recording that serves products with ``∂F/∂z`` (made on first use)."""
        if self._products is None:
            unchecked = self.read_ids is not None
            problem = self.problem.bind(self.params, deferred=True) if unchecked else self.problem
            self._products = RecordedLinearization(problem, self.z)
        return self._products

    def rmv(self, v: Tensor) -> Tensor:
        return self.record_products().rmv(v)

    def mv(self, v: Tensor) -> Tensor:
        return self.record_products().mv(v)

    def dense(self, transpose: bool = True) -> Tensor:
        return self.record_products().dense(transpose)


def _record_checked(problem: Problem, z: Tensor) -> _CheckedLinearization | RecordedLinearization | None:
    """``F`` recorded at ``z`` for the parameter gradient, if the user's function, called now,
    uses exactly the tensors carrying derivatives that it used when the layer was called
    (``problem.params``); ``None`` otherwise.

    The compiled loop traces the function as it is at the backward, reading the tensors it
    reads then; a function that now sees others (module parameters swapped in by a
    ``torch.func.functional_call`` that has returned, a closure rebound since) would give
    another operator, so the backward then takes the eager path, which substitutes the saved
    tensors. The check and the recording are one call of the function.
    """
    z = z.detach()
    params = problem.params
    if all(p.grad_fn is None for p in params):
        recorded: list[_CheckedLinearization] = []
        _, used = capture(lambda: recorded.append(_CheckedLinearization(problem, z)), exclude=(z,))
        # What the function computes from the parameters under autograd outside a torch
        # operation (the gradient a torch.func.grad inside it returns) looks like an outside
        # tensor to the capture: its graph leads back to a parameter.
        used = [t for t in used if t.grad_fn is None or not _computed_from(t, params)]
        lin: _CheckedLinearization | RecordedLinearization | None = recorded[0]
    else:
        # A parameter computed from another one is recorded through a leaf copy of its own
        # (see RecordedLinearization), in a second call: the check comes first.
        with torch.no_grad():
            _, used = capture(lambda: problem.probe(z), exclude=(z,))
        lin = None
    if {id(t) for t in used} != {id(t) for t in params}:
        return None
    return RecordedLinearization(problem, z) if lin is None else lin


def _computed_from(t: Tensor, leaves: tuple[Tensor, ...]) -> bool:
    """Whether ``t``'s autograd graph reaches one of the leaf tensors ``leaves``."""
    ids = {id(leaf) for leaf in leaves}
    seen: set[Any] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in ids:  # the AccumulateGrad of a leaf
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _cg_loop(
    residual: Any, z: Tensor, g: Tensor, tol: Tensor, max_steps: Tensor
) -> tuple[Tensor, ...]:
    """CG for ``A u = g`` with ``A v = (∂F/∂z)ᵀ v`` at ``z`` (symmetric), per sample.

    Args:
        residual: ``F``, a pure function of the flat ``(B, n)`` point (``torch.func`` only).
        z: the point ``(B, n)``.
        g: right-hand sides ``(B, n)``.
        tol: tolerances of the residual norms ``(B,)``.
        max_steps: iteration limit, a 0-d int64 tensor.

    Returns:
        ``(u, res, steps, converged, flags)``: the solution ``(B, n)``, residual norms
        ``(B,)``, steps per sample (int64 ``(B,)``), whether each met its tolerance, and
        ``flags``, bool ``(2,)``: every norm finite, every sample converged (what the caller
        reads on the host, in one read). A sample that meets non-positive curvature (or NaN)
        stops there.
    """
    tol2 = tol.square()
    rs = torch.linalg.vecdot(g, g)
    active = rs > tol2
    steps = torch.zeros_like(rs, dtype=torch.int64)
    k = torch.zeros((), dtype=torch.int64, device=g.device)

    def cond(k: Tensor, u: Tensor, r: Tensor, p: Tensor, rs: Tensor, active: Tensor, steps: Tensor,
             z: Tensor) -> Tensor:
        return (k < max_steps) & active.any()

    def body(k: Tensor, u: Tensor, r: Tensor, p: Tensor, rs: Tensor, active: Tensor, steps: Tensor,
             z: Tensor) -> tuple[Tensor, ...]:
        # The point is carried through the loop (torch.func inside a traced loop body needs
        # its primals to be loop inputs) and handed back as a copy (outputs may not alias).
        # The VJP's linearisation at z is taken once per pass and serves `_CHUNK` steps: the
        # loop's per-pass cost (a host test, the wrapper's calls) is shared by four steps, and
        # the steps are those of a step-by-step loop (no step past max_steps, a converged
        # sample stops changing).
        pull = torch.func.vjp(residual, z)[1]
        for j in range(_CHUNK):
            live = active if j == 0 else active & (k + j < max_steps)
            Ap = pull(p)[0]
            pAp = torch.linalg.vecdot(p, Ap)
            ok = live & (pAp > 0)
            # Masked-out samples may divide by zero here; ``where`` discards those values.
            alpha = torch.where(ok, rs / pAp, 0.0).unsqueeze(-1)
            u = u + alpha * p
            # Where a NaN product stopped a sample, alpha = 0 would still carry it into r
            # (0 · NaN), then into p and, at the next step, into u: the stopped sample's r is
            # kept instead.
            r = torch.where(ok.unsqueeze(-1), r - alpha * Ap, r)
            rs_new = torch.linalg.vecdot(r, r)
            beta = torch.where(ok, rs_new / rs, 0.0).unsqueeze(-1)
            p = r + beta * p
            # A sample that did not step keeps its residual norm (as the eager CG reports it).
            rs = torch.where(ok, rs_new, rs)
            # A sample stops at convergence and at non-positive curvature (or NaN); one held
            # back only by max_steps ends with the loop.
            active = active & (ok | ~live) & (rs > tol2)
            steps = steps + ok.long()
        return (k + _CHUNK, u, r, p, rs, active, steps, z.clone())

    state = (k, torch.zeros_like(g), g.clone(), g.clone(), rs, active, steps, z)
    _, u, _, _, rs, _, steps, _ = while_loop(cond, body, state)
    res = rs.sqrt()
    converged = res <= tol
    return u, res, steps, converged, torch.stack([torch.isfinite(res).all(), converged.all()])


#: CG steps per pass of the compiled loop.
_CHUNK = 4

#: One compiled loop per user function (see :func:`_compiled_cg`).
_COMPILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_SHARED: list[Any] = []


def _compiled_cg(fn: Any) -> Any:
    """:func:`_cg_loop` under ``torch.compile(fullgraph=True)`` for problems of the user
    function ``fn``.

    Dynamo keeps its compiled graphs per code object and stops compiling a code object after
    ``torch._dynamo.config.recompile_limit`` (8) variants. Each user function gets a copy of
    the loop's code of its own, so that many problems in one process (a benchmark suite, a
    test session) each keep their compiled loop; a function that cannot be weakly referenced
    shares one copy.
    """
    key = function_key(fn)
    try:
        return _COMPILED[key]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable
        if not _SHARED:
            _SHARED.append(_compile_copy())
        return _SHARED[0]
    compiled = _COMPILED[key] = _compile_copy()
    return compiled


def _compile_copy() -> Any:
    code = _cg_loop.__code__.replace()  # a new code object: a dynamo cache of its own
    copy = types.FunctionType(code, _cg_loop.__globals__, _cg_loop.__name__)
    # On the CPU, the C++ wrapper runs the passes of the loop without returning to Python
    # between them (a fifth less time per pass on the ridge problem of d = 200; elsewhere the
    # Python wrapper, whose per-pass cost is small next to kernel launches). Without the size
    # and stride assertions (the shapes are fixed by the guards). Static shapes: dynamo keeps
    # its record of shapes seen per source location, shared by the copies, so that with
    # automatic dynamic shapes one function's sizes would make another's first graph dynamic
    # (and while_loop does not take the size objects that lifts).
    return compile_loop(copy, {"size_asserts": False}, {"cpp_wrapper": True})
