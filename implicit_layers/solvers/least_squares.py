"""Gauss-Newton and Levenberg-Marquardt for ``min ½‖r(w)‖²``, from Jacobian products of ``r``."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from types import ModuleType
from typing import cast

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._capture import transforms_active
from .._compile_failures import note_compile_failure
from .._compiled_reads import with_reads
from .._config import SolverKeywords, check_positive_int
from .._info import SolveInfo, compiled_loop_info
from .._least_squares import LeastSquaresProblem
from .._problem import Problem
from ..linear._operator import FunctionOperator
from ..linear.cg import CG
from ._base import ForwardSolver, Monitor, non_finite_error
from ._compiled_loop import CompileFailed, loop_serves

__all__ = ["GaussNewton", "LevenbergMarquardt"]


class _Linearised:
    """``r`` at a point ``z`` (``(B, n)``) and products with its Jacobian ``J`` (``(B, m, n)``).

    Samples are independent, so one product with a ``(B, n)`` tangent gives every sample's.
    Outside ``torch.func`` transforms and ``inference_mode`` the products come from reverse
    mode on one recorded evaluation of ``r``: ``Jᵀu`` is its backward, and ``Jv`` the backward
    of the linear map ``u ↦ Jᵀu`` (recorded once, with ``create_graph``). Forward-mode
    products (``torch.func.jvp``) cost several times more in eager PyTorch, where each
    operation mixing a dual and a plain tensor runs a Python decomposition; they remain the
    route under transforms, where autograd cannot record.

    The dense Jacobian (``dense=True``), wanted only once a point is accepted, is formed on
    first use from ``min(m, n)`` products and kept transposed (``(B, n, m)``, contiguous), which
    makes ``JᵀJ`` a faster batched product.
    """

    def __init__(self, residuals: Callable[[Tensor], Tensor], z: Tensor, dense: bool) -> None:
        self.residuals = residuals
        self.z = z
        self.dense = dense
        self._jt: Tensor | None = None
        self._u: Tensor | None = None
        self._jtu: Tensor | None = None
        self._normal: Tensor | None = None
        self.recorded = not (torch.is_inference_mode_enabled() or transforms_active())
        if self.recorded:
            with torch.enable_grad():
                self._zz = z.detach().requires_grad_(True)
                out = residuals(self._zz)
            self._out = out
            self.r = out.detach()
        elif dense:
            self.r = residuals(z)
        else:
            result = torch.func.vjp(residuals, z)
            self.r, self._vjp = result[0], result[1]

    def _grad(self, out: Tensor, wrt: Tensor, cotangent: Tensor, create_graph: bool = False) -> Tensor:
        """``∂(out · cotangent)/∂wrt``, zero where ``out`` does not depend on ``wrt``."""
        if not out.requires_grad:
            return torch.zeros_like(wrt)
        (g,) = torch.autograd.grad(out, wrt, cotangent, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True, materialize_grads=True)
        return g

    def jtv(self, u: Tensor) -> Tensor:
        """``Jᵀu``, ``(B, n)`` for ``u`` of shape ``(B, m)``."""
        if self.dense:
            return (self.jt @ u.unsqueeze(-1)).squeeze(-1)
        if self.recorded:
            return self._grad(self._out, self._zz, u)
        return self._vjp(u)[0]

    def jv(self, v: Tensor) -> Tensor:
        """``Jv``, ``(B, m)`` for ``v`` of shape ``(B, n)``."""
        if not self.recorded:
            return torch.func.jvp(self.residuals, (self.z,), (v,))[1]
        if self._jtu is None:
            with torch.enable_grad():
                self._u = torch.zeros_like(self.r, requires_grad=True)
                self._jtu = self._grad(self._out, self._zz, self._u, create_graph=True)
        assert self._u is not None
        return self._grad(self._jtu, self._u, v)

    @property
    def jt(self) -> Tensor:
        """``Jᵀ`` of every sample, ``(B, n, m)`` (``dense`` linearisations only)."""
        if self._jt is None:
            B, n = self.z.shape
            m = self.r.shape[-1]
            if not self.recorded:
                basis = torch.eye(n, dtype=self.z.dtype, device=self.z.device).unsqueeze(1).expand(n, B, n)
                self._jt = torch.func.vmap(self.jv)(basis).permute(1, 0, 2).contiguous()
            elif m <= n:  # rows of J, one backward each
                eye = torch.eye(m, dtype=self.r.dtype, device=self.r.device)
                self._jt = torch.stack([self._grad(self._out, self._zz, eye[i].expand(B, m))
                                        for i in range(m)], -1)
            else:  # columns of J
                eye = torch.eye(n, dtype=self.z.dtype, device=self.z.device)
                self._jt = torch.stack([self.jv(eye[j].expand(B, n)) for j in range(n)], -2)
            self.release()
        return self._jt

    def release(self) -> None:
        """Drop the recorded graphs (the dense Jacobian, once formed, answers every product)."""
        self._out = self._zz = self._u = self._jtu = None  # type: ignore[assignment]

    @property
    def normal(self) -> Tensor:
        """``JᵀJ`` of every sample, ``(B, n, n)``, formed once (dense linearisations only)."""
        if self._normal is None:
            self._normal = self.jt @ self.jt.mT
        return self._normal

    def select(self, other: _Linearised, take: Tensor) -> _Linearised:
        """``other`` where ``take`` (bool ``(B,)``), this linearisation elsewhere: the state after
        a step that some samples accept. Without forming ``other``'s Jacobian when no sample
        takes it, nor a new one when every sample does (the checks synchronise, which only the
        CPU does at no cost; elsewhere the masked merge runs unconditionally)."""
        if _syncs_freely(take):
            if not bool(take.any()):
                return self
            if bool(take.all()):
                return other
        if not self.dense:  # products need one point: linearise again at the merged one
            return _Linearised(self.residuals, torch.where(take.unsqueeze(-1), other.z, self.z), False)
        merged = object.__new__(_Linearised)
        merged.residuals, merged.dense, merged.recorded = self.residuals, True, False
        keep = take.unsqueeze(-1)
        merged.z = torch.where(keep, other.z, self.z)
        merged.r = torch.where(keep, other.r, self.r)
        merged._jt = torch.where(keep.unsqueeze(-1), other.jt, self.jt)
        merged._normal = None
        return merged


def _syncs_freely(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing (the CPU): elsewhere the
    solvers merge per-sample results unconditionally rather than synchronise."""
    return t.device.type == "cpu"


def _decrease(r: Tensor, r_new: Tensor) -> Tensor:
    """``½‖r‖² - ½‖r_new‖²`` per sample, as ``½ Σ (r - r_new)(r + r_new)``: without the
    cancellation of two nearly equal sums of squares, which near the solution would refuse
    every step below ``eps·‖r‖²`` and stall the gradient far above its tolerance."""
    return 0.5 * ((r - r_new) * (r + r_new)).sum(-1)


def _noise(r: Tensor) -> Tensor:
    """A decrease of ``½‖r‖²`` below this is lost in the rounding of ``r`` itself (each entry
    is a difference of model and data, larger than ``r`` near a good fit). Steps predicted to
    gain less are taken on the model's word: the convergence test on ``‖Jᵀr‖`` and the
    monitor's best iterate, not the cost, judge them."""
    return 1e3 * torch.finfo(r.dtype).eps * 0.5 * r.square().sum(-1)


def _gain_update(
    r: Tensor, r_trial: Tensor, delta: Tensor, g: Tensor, mu: Tensor, nu: Tensor, mu_max: Tensor,
    active: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Nielsen's update after a trial step ``delta`` (per-sample ``mu``, ``nu``, ``mu_max`` and
    ``active`` of shape ``(B, 1)``): ``(accept, mu, nu)``, ``accept`` bool ``(B, 1)``. A step
    is taken where the gain ratio ``ρ`` of actual to predicted decrease is positive, or where
    the predicted decrease is below the rounding of ``r`` (see :func:`_noise`)."""
    predicted = 0.5 * (delta * (mu * delta - g)).sum(-1, keepdim=True)
    rho = _decrease(r, r_trial).unsqueeze(-1) / predicted.clamp_min(torch.finfo(r.dtype).tiny)
    accept = ((rho > 0) | (predicted < _noise(r).unsqueeze(-1))) & active
    # Nielsen's factor, for a step that decreased the cost. A step taken on the model's word
    # (rho <= 0 within rounding) keeps mu: the factor there grows as -rho³ (a rounding rho of
    # -40 would multiply mu by 5e5 and stall the solve).
    scale = torch.where(rho > 0, torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3), torch.ones_like(rho))
    mu = torch.where(accept, mu * scale, torch.where(active, mu * nu, mu)).minimum(mu_max)
    nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
    return accept, mu, nu


def _damped_solve(normal: Tensor, g: Tensor, mu: Tensor) -> Tensor:
    """``δ`` solving ``(JᵀJ + μ I) δ = -g`` per sample, from ``normal = JᵀJ`` (``(B, n, n)``)
    and ``mu`` of shape ``(B, 1)``. ``μ > 0`` makes the matrix positive definite: a Cholesky
    factorisation, several times cheaper than ``lstsq`` on a batch of small matrices. Where
    rounding defeats it (``info > 0``) the step is nil, which leaves the sample in place and
    raises its ``μ`` (see :func:`_gain_update`)."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    L, info = torch.linalg.cholesky_ex(normal + mu.unsqueeze(-1) * eye)
    delta = torch.cholesky_solve(-g.unsqueeze(-1), L).squeeze(-1)
    return torch.where((info == 0).unsqueeze(-1), delta, torch.zeros_like(delta))


def _unrolled_damped_solve(normal: Tensor, g: Tensor, mu: Tensor) -> Tensor:
    """:func:`_damped_solve` for a few unknowns, written out entry by entry (the Cholesky
    factor, then the two triangular solves): traced by the compiled step into its fused
    kernel instead of two library calls per step, about a third of a step at ``B = 1024``.
    A pivot that is not positive (rounding) gives a nil step, as ``info > 0`` does there."""
    n = g.shape[-1]
    A = normal + mu.unsqueeze(-1) * torch.eye(n, dtype=g.dtype, device=g.device)
    L: list[list[Tensor]] = [[] for _ in range(n)]  # L[i][j], j <= i
    pivots = []
    for j in range(n):
        pivot = A[:, j, j] - sum((L[j][k] ** 2 for k in range(j)), torch.zeros_like(g[:, 0]))
        pivots.append(pivot)
        d = pivot.clamp_min(torch.finfo(g.dtype).tiny).sqrt()
        for i in range(j, n):
            if i == j:
                L[j].append(d)
            else:
                off = A[:, i, j] - sum((L[i][k] * L[j][k] for k in range(j)), torch.zeros_like(d))
                L[i].append(off / d)
    y: list[Tensor] = []
    for i in range(n):
        y.append((-g[:, i] - sum((L[i][k] * y[k] for k in range(i)), torch.zeros_like(g[:, 0]))) / L[i][i])
    x: list[Tensor] = [torch.zeros_like(g[:, 0])] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum((L[k][i] * x[k] for k in range(i + 1, n)), torch.zeros_like(g[:, 0]))) / L[i][i]
    # Assembled by selection rather than torch.stack, whose compiled form is a view per entry
    # (a tensor object each, made on every step of the compiled loop).
    column = torch.arange(n, device=g.device)
    delta = x[0].unsqueeze(-1).expand_as(g)
    for i in range(1, n):
        delta = torch.where(column == i, x[i].unsqueeze(-1), delta)
    ok = functools.reduce(operator.and_, (p > 0 for p in pivots)).unsqueeze(-1)
    return torch.where(ok, delta, torch.zeros_like(delta))


#: Up to this many unknowns the compiled step unrolls its forward-mode products and its
#: Cholesky solve.
_UNROLLED_PRODUCTS = 8


def _value_and_jt(residuals: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``r(z)`` and ``Jᵀ`` (``(B, n, m)``) from ``n`` forward-mode products, the route of the
    compiled step, where they are traced into the graph and cost nothing per operation. For a
    few unknowns the products are unrolled: the compiler then shares their primal computation
    (``r`` is the first product's), measured about twice as fast as one ``vmap`` over them
    (``B = 1024``, ``n = 3``); beyond, one ``vmap`` keeps the graph (and its compilation) small."""
    n = z.shape[-1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    if n <= _UNROLLED_PRODUCTS:
        # Contiguous tangents: a broadcast one fails forward mode's write checks when traced
        # outside a loop body.
        products = [torch.func.jvp(residuals, (z,), (eye[j].expand_as(z).contiguous(),))
                    for j in range(n)]
        return products[0][0], torch.stack([p[1] for p in products], -2)
    basis = eye.unsqueeze(1).expand(n, *z.shape)
    jt = torch.func.vmap(lambda v: torch.func.jvp(residuals, (z,), (v,))[1])(basis)  # (n, B, m)
    return residuals(z), jt.transpose(0, 1)


def _lm_step(
    residuals: Callable[[Tensor], Tensor], z: Tensor, r: Tensor, jt: Tensor, g: Tensor, mu: Tensor,
    nu: Tensor, mu_max: Tensor, active: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One Levenberg-Marquardt step of every sample (the body of ``compile=True``): the damped
    normal equations by Cholesky, the trial point with its Jacobian, the gain ratio and the
    per-sample update of ``z, r, Jᵀ, g, μ, ν``, without a synchronisation. ``active`` is
    ``(B, 1)``; the other per-sample scalars ``(B, 1)`` too."""
    solve = _unrolled_damped_solve if z.shape[-1] <= _UNROLLED_PRODUCTS else _damped_solve
    delta = solve(jt @ jt.mT, g, mu)
    r_trial, jt_trial = _value_and_jt(residuals, z + delta)
    acc, mu, nu = _gain_update(r, r_trial, delta, g, mu, nu, mu_max, active)
    z = torch.where(acc, z + delta, z)
    r = torch.where(acc, r_trial, r)
    # Contiguous, as the eager linearisation that starts the loop gives it: one layout, one
    # compiled graph.
    jt = torch.where(acc.unsqueeze(-1), jt_trial, jt).contiguous()
    g = (jt @ r.unsqueeze(-1)).squeeze(-1)
    return z, r, jt, g, mu, nu


class _NormalEquationsKeywords(SolverKeywords, total=False):
    dense_max_size: int
    cg_max_steps: int | None


class _NormalEquations(ForwardSolver):
    """What Gauss-Newton and Levenberg-Marquardt share: settings, the damped normal-equation
    solve ``(JᵀJ + μ I) δ = -Jᵀr`` (dense up to ``dense_max_size`` unknowns, CG beyond)."""

    problems = (LeastSquaresProblem,)
    default_max_steps = 200
    supports_unrolled = False

    def __init__(
        self,
        *,
        dense_max_size: int = 128,
        cg_max_steps: int | None = None,
        **settings: Unpack[SolverKeywords],
    ) -> None:
        super().__init__(**settings)
        self.dense_max_size = check_positive_int(dense_max_size, "dense_max_size", allow_zero=True)
        self.cg_max_steps = (
            None if cg_max_steps is None else check_positive_int(cg_max_steps, "cg_max_steps")
        )

    def _direction(self, lin: _Linearised, g: Tensor, mu: Tensor | None) -> Tensor:
        """``δ`` solving ``(JᵀJ + μ I) δ = -g`` per sample (``mu`` of shape ``(B, 1)``; ``None``
        for Gauss-Newton's undamped ``JᵀJ δ = -g``, least norm where it is singular)."""
        B, n = g.shape
        if lin.dense:
            if mu is None:
                return torch.linalg.lstsq(lin.normal, -g.unsqueeze(-1)).solution.squeeze(-1)
            return _damped_solve(lin.normal, g, mu)
        damp = torch.zeros_like(g[:, :1]) if mu is None else mu
        op = FunctionOperator(
            lambda v: lin.jtv(lin.jv(v)) + damp * v, B, n, g.dtype, g.device,
            symmetric=True, positive_definite=True,
        )
        cg = CG(rtol=1e-2 * self.resolved_rtol(g.dtype) ** 0.5, max_steps=self.cg_max_steps or 2 * n,
                on_failure="ignore")
        return cg.solve(op, -g, what=f"{self.name} step")[0]

    def _start(self, problem: Problem, z0: Tensor) -> tuple[Callable[[Tensor], Tensor], _Linearised, Tensor]:
        # A LeastSquaresProblem (check_kind), or its fold under vmap, which has residuals().
        residuals = cast(LeastSquaresProblem, problem).residuals
        lin = _Linearised(residuals, z0, self._dense(z0))
        return residuals, lin, lin.jtv(lin.r)

    def _dense(self, z: Tensor) -> bool:
        return z.shape[-1] <= self.dense_max_size


class LevenbergMarquardt(_NormalEquations):
    """Levenberg-Marquardt with per-sample damping, the solver of
    :func:`~implicit_layers.least_squares` by default.

    Each step solves ``(JᵀJ + μ I) δ = -Jᵀr`` (``J`` the Jacobian of the residuals): with the
    dense ``JᵀJ`` formed from ``n`` Jacobian-vector products up to ``dense_max_size`` unknowns,
    by conjugate gradients on products ``Jᵀ(J v)`` beyond. The damping ``μ`` of each sample
    follows the gain ratio ``ρ`` of actual to predicted decrease (Nielsen's update): a step
    with ``ρ > 0`` is taken and ``μ`` multiplied by ``max(1/3, 1 - (2ρ - 1)³)``; otherwise the
    step is refused and ``μ`` multiplied by ``ν`` (``ν`` doubling after each refusal).

    A sample has converged when its gradient ``‖Jᵀr‖`` is at most ``max(atol, rtol·‖Jᵀr(w0)‖)``.

    Args:
        damping: initial ``μ`` relative to the largest diagonal entry of ``JᵀJ`` at ``w0``
            (default ``1e-3``). The one positional argument.
        dense_max_size: largest number of unknowns solved with the dense normal equations
            (default 128).
        cg_max_steps: CG steps per step beyond (default ``2n``).
        compile: run the whole solve (dense normal equations only) as one
            ``torch.compile``'d function, its loop a ``while_loop`` with the residual function
            traced into it (default ``False``): one call, one host synchronisation at the end,
            the same iterates, statistics, warnings and errors as the eager steps. Worth it
            for a batch of small fits solved again and again with the same residual function
            and shapes (measured in ``benchmarks/composite.py``). The first solve of each new
            residual function, batch size, dtype or setting compiles (seconds, a C++ compiler
            needed as for any ``torch.compile`` on the CPU); the residual function must be
            traceable by ``torch.compile`` without a graph break (else a ``ValueError`` says
            so; a ``RuntimeError`` where the compiler itself fails on a traced loop). Under
            ``torch.func`` transforms and ``inference_mode`` the eager steps run.
            ``check_every`` has no effect there (the loop tests every sample after every step,
            on the device).
        rtol, atol, max_steps, check_every, on_failure: as for every forward solver
            (:class:`~implicit_layers.solvers.ForwardSolver`); ``max_steps`` defaults to 200.

    The dense Jacobian comes from reverse mode on one recorded evaluation of the residuals
    (``min(m, n)`` backward passes for ``m`` residuals and ``n`` unknowns per sample, all
    samples at once) and is formed only at accepted points: a refused step changes ``μ``
    alone and reuses it.

    Examples:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> y = 2.0 * torch.exp(-3.0 * t)
        >>> w = il.least_squares(lambda w: w[0] * torch.exp(-w[1] * t) - y,
        ...                      torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(w, torch.tensor([2.0, 3.0], dtype=torch.float64))
        True
    """

    name = "LevenbergMarquardt"

    def __init__(
        self, damping: float = 1e-3, *, compile: bool = False, **settings: Unpack[_NormalEquationsKeywords]
    ) -> None:
        super().__init__(**settings)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {type(compile).__name__}.")
        self.compile = compile
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a float, got {type(damping).__name__}.")
        if not 0 < damping < math.inf:
            raise ValueError(f"damping must be a finite number > 0, got {damping}.")
        self.damping = float(damping)

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        if self._compiles(problem, z0):
            try:
                return self._compiled_solve(problem, z0)
            except CompileFailed as failure:
                self._note_failure(problem, failure.error)  # then the eager steps below
        residuals, lin, g = self._start(problem, z0)
        mon = Monitor(self, problem, z0, g)
        if lin.dense:
            diag = torch.diagonal(lin.normal, dim1=-2, dim2=-1).amax(-1, keepdim=True)
        else:
            diag = g.abs().amax(-1, keepdim=True)  # a scale without forming JᵀJ
        mu = self.damping * diag.clamp_min(torch.finfo(z0.dtype).tiny)
        # Refused steps at rounding level grow μ without bound; past this the step is nil.
        mu_max = mu / (self.damping * torch.finfo(z0.dtype).eps ** 2)
        nu = torch.full_like(mu, 2.0)

        def advance(taken: int) -> int:
            nonlocal lin, g, mu, nu
            active = mon.active.unsqueeze(-1)
            delta = self._direction(lin, g, mu)
            # The residual at the trial point, recorded: its Jacobian is formed only if a
            # sample accepts the step (a refused step changes only μ, and keeps J).
            trial = _Linearised(residuals, lin.z + delta, lin.dense)
            accept, mu, nu = _gain_update(lin.r, trial.r, delta, g, mu, nu, mu_max, active)
            lin = lin.select(trial, accept.squeeze(-1))
            g = lin.jtv(lin.r)
            mon.record(lin.z, g, mon.active)
            return 1

        mon.iterate(self.max_steps, advance)
        return mon.finish()

    def _compiles(self, problem: Problem, z0: Tensor) -> bool:
        """Whether the compiled loop runs here: ``compile=True``, dense normal equations, and
        where a compiled loop can trace the problem
        (:func:`~implicit_layers.solvers._compiled_loop.loop_serves`)."""
        return (self.compile and isinstance(problem, LeastSquaresProblem) and self._dense(z0)
                and loop_serves(problem))

    @staticmethod
    def _note_failure(problem: Problem, error: Exception) -> None:
        note_compile_failure(problem.fn, f"LevenbergMarquardt(compile=True) on {problem.name}",
                             "its solves run the eager steps", error)

    def _compiled_solve(self, problem: Problem, z0: Tensor) -> tuple[Tensor, SolveInfo]:
        """The whole solve as one compiled loop (:mod:`._lm_loop`), with the verdicts of the
        eager loop: the same info, and the same error for a NaN or Inf gradient."""
        z, info, finite, _ = self._run_compiled(problem, z0)
        if finite is not None:
            raise non_finite_error(self, problem, ~finite)
        return z, info

    def solve_unbound(self, problem: Problem, z0: Tensor) -> tuple[Tensor, SolveInfo] | None:
        """Where the compiled loop runs: the loop, which reads every tensor the residual
        function reads and says which of them carry derivatives
        (:mod:`~implicit_layers._compiled_reads`), and returns the function's output at ``z0``
        for its checks. ``None`` where the function read one (or where the loop does not
        serve, or could not be compiled: the caller's ordinary path then says why)."""
        if not self._compiles(problem, z0):
            return None
        try:
            (z, info, finite, out), reads = with_reads(lambda: self._run_compiled(problem, z0))
        except ValueError:
            return None
        except CompileFailed as failure:
            self._note_failure(problem, failure.error)
            return None
        if reads is None or reads:  # no graph ran (an eager stance), or it read some
            return None
        problem.check_output(out)
        if finite is not None:
            raise non_finite_error(self, problem, ~finite)
        self._conclude(problem, z, info)
        return z, info

    def _run_compiled(self, problem: Problem, z0: Tensor) -> tuple[Tensor, SolveInfo, Tensor | None, Tensor]:
        """The compiled loop: ``(z, info, finite, out)``, ``finite`` the per-sample flags where
        a gradient norm is NaN or Inf (``None`` where all are finite), ``out`` the function's
        output at ``z0``."""
        loop = _compiled_loop_module()
        settings = loop.LoopSettings.of(self.resolved_rtol(z0.dtype), float(self.atol), self.max_steps,
                                        self.damping)
        residuals, probe = cast(LeastSquaresProblem, problem).traced_calls()
        z, best, tol, steps, converged, finite, flags, out = loop.run_compiled(
            residuals, z0, settings, problem.name, probe)
        info, all_finite = compiled_loop_info(flags, converged=converged, steps=steps,
                                              residual=best, tolerance=tol, solver=self.name)
        return z, info, None if all_finite else finite, out


@functools.cache
def _compiled_loop_module() -> ModuleType:
    """:mod:`._lm_loop`, imported on the first compiled solve (it imports this module's step),
    then returned from the cache without an import statement on every call."""
    from . import _lm_loop

    return _lm_loop


class GaussNewton(_NormalEquations):
    """Gauss-Newton with a backtracking line search: ``δ`` solves ``JᵀJ δ = -Jᵀr`` (least
    norm where ``JᵀJ`` is singular; dense up to ``dense_max_size`` unknowns, CG beyond), and
    the step ``α δ`` halves ``α`` until ``½‖r‖²`` decreases sufficiently (Armijo, ``c = 1e-4``).

    Fast on zero- or small-residual problems; prefer
    :class:`LevenbergMarquardt` (the default) far from the solution or on large residuals.

    Args:
        max_halvings: line-search halvings per step (default 30).
        dense_max_size, cg_max_steps, rtol, atol, max_steps, check_every, on_failure: as for
            :class:`LevenbergMarquardt`.

    Examples:
        >>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> w = il.least_squares(lambda w: w[0] * torch.exp(-w[1] * t) - 2 * torch.exp(-3 * t),
        ...                      torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...                      solver=il.solvers.GaussNewton())
        >>> torch.allclose(w, torch.tensor([2.0, 3.0], dtype=torch.float64))
        True
    """

    name = "GaussNewton"

    def __init__(self, *, max_halvings: int = 30, **settings: Unpack[_NormalEquationsKeywords]) -> None:
        super().__init__(**settings)
        self.max_halvings = check_positive_int(max_halvings, "max_halvings")

    def _solve(self, problem: Problem, z0: Tensor, differentiable: bool) -> tuple[Tensor, SolveInfo]:
        residuals, lin, g = self._start(problem, z0)
        z = z0
        mon = Monitor(self, problem, z, g)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            active = mon.active
            delta = self._direction(lin, g, None)
            slope = (delta * g).sum(-1)
            alpha = torch.ones_like(slope)
            pending = active.clone()
            for _ in range(self.max_halvings):
                trial = z + alpha.unsqueeze(-1) * delta
                ok = (_decrease(lin.r, residuals(trial)) >= -1e-4 * alpha * slope) | (
                    -slope < _noise(lin.r))
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
                alpha = torch.where(pending, alpha / 2, alpha)
            take = active & ~pending
            z = torch.where(take.unsqueeze(-1), z + alpha.unsqueeze(-1) * delta, z)
            lin = _Linearised(residuals, z, self._dense(z))
            g = lin.jtv(lin.r)
            mon.record(z, g, active)
        return mon.finish()
