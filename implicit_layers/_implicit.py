"""The one implicit core shared by fixed_point, root, argmin and custom_root.

The forward solve runs without autograd. The residual is then evaluated once more, with
autograd, at the detached solution ``z*``: ``out = z* - F(z*, θ)``, numerically ``z*``. ``out``
passes through :class:`_AdjointHook`, whose forward is the identity and whose backward swaps
the incoming cotangent ``g`` for the solution ``u`` of ``(∂F/∂z)ᵀ u = g``. Autograd then
carries ``-(∂F/∂θ)ᵀ u`` — the implicit-function-theorem gradient — to every tensor and module
parameter that ``F`` touched, without the user listing them.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor

from ._info import ConvergenceWarning, NonFiniteError, SolveInfo
from ._problem import Problem
from .backward import BackwardMode, Implicit, Unrolled, _StepMode
from .linear._base import LinearSolver
from .linear._operator import FunctionOperator
from .linear.cg import CG
from .linear.dense import Dense
from .linear.gmres import GMRES
from .linear.neumann import Neumann
from .solvers._base import ForwardSolver


def resolve_backward(backward: BackwardMode | LinearSolver | None) -> BackwardMode:
    if backward is None:
        return Implicit()
    if isinstance(backward, LinearSolver):
        return Implicit(backward)
    if isinstance(backward, BackwardMode):
        return backward
    raise TypeError(
        "backward must be a backward mode (il.backward.Implicit(), Unrolled(), Truncated(k), "
        "JacobianFree(), Phantom(k, damping)) or a linear solver such as il.linear.CG(); got "
        f"{type(backward).__name__}."
    )


def solve(
    problem: Problem,
    z0: Tensor,
    solver: ForwardSolver,
    backward: BackwardMode,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``problem`` from ``z0`` and attach the gradient chosen by ``backward``."""
    z0f = problem.flatten(z0)
    grad_on = torch.is_grad_enabled()
    unrolled = isinstance(backward, Unrolled) and grad_on
    if unrolled and not solver.supports_unrolled:
        raise ValueError(
            f"backward=Unrolled() cannot differentiate through {solver.name}; use LBFGS, "
            "GradientDescent, Picard, Anderson or Broyden as solver, or an implicit backward."
        )
    # Unrolled: autograd records every step; otherwise the solve runs without a graph.
    with torch.set_grad_enabled(unrolled):
        z, info = solver.solve(problem, z0f if unrolled else z0f.detach(), differentiable=unrolled)
    if not problem.batched:
        info.squeeze_batch()
    if unrolled:
        return z, info
    z = z.detach()
    if not grad_on:
        return z, info
    return attach(problem, z, backward, info, solver.resolved_rtol(z.dtype), solver), info


def attach(
    problem: Problem,
    z: Tensor,
    backward: BackwardMode,
    info: SolveInfo | None,
    forward_rtol: float,
    solver: object = None,
) -> Tensor:
    """Return ``z`` (flat, detached solution) carrying the gradient of ``backward``."""
    if isinstance(backward, _StepMode):
        eta = backward.resolved_step_size(problem.kind, solver)
        zk = z
        for _ in range(backward.steps):
            zk = zk - eta * problem.residual(zk, create_graph=True)
        return zk
    if isinstance(backward, Unrolled):
        raise ValueError(
            "backward=Unrolled() needs a forward solver to unroll; a black-box solver wrapped "
            "by custom_root cannot be unrolled. Use an implicit backward."
        )
    if not isinstance(backward, Implicit):
        raise TypeError(f"unsupported backward mode {type(backward).__name__}.")
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        res = None
        if problem.kind == "fixed_point":
            # z - (z - f(z)) is f(z): record f alone, so that every adjoint VJP skips the
            # two subtractions and the sum of the direct and the f branch.
            out = problem.fixed_point_map(zr)
        else:
            # The adjoint products are VJPs of F itself (res); out only carries -∂F/∂θ.
            res = problem.residual(zr, create_graph=True)
            out = zr - res
    if not _depends_on_other_leaves(out, zr):
        return z
    hook = _Adjoint(problem, zr, out, backward, info, forward_rtol, solver, res)
    return _AdjointHook.apply(out, hook)


#: Largest system size ``n`` for which the default backward materialises the Jacobian and
#: solves it directly. The crossover depends on how many CG iterations the problem needs
#: (CPU, float64, one thread): on ridge hypergradients (condition number ~17, ~45 CG steps)
#: Dense beats CG up to n ~ 400 (1.5 vs 4.0 ms at n = 200); on digits softmax regression
#: (~15 CG steps) CG is faster already at n = 128 (1.6 vs 7.1 ms), the vectorised
#: Hessian-vector products being costly there. 128 keeps the worst case of either choice small
#: (figures: ``python -m benchmarks.dense_crossover``).
DENSE_MAX_SIZE = 128
#: ... as long as ``B n³`` stays below this. Dense builds the matrix from ``n`` vectorised
#: operator products over the whole batch; with per-sample data (a per-sample Hessian) each
#: product touches ``B n²`` numbers, so the build holds and computes ``~ B n³``, against CG's
#: ``k B n²`` for ``k`` iterations. Measured (``python -m benchmarks.default_backward``, batched
#: quadratics, condition number 100): unbatched up to n = 128 Dense is 5-10x faster than CG at
#: the same memory; at B n³ = 2^21 (B = 64, n = 32; B = 8, n = 64) the two are even; beyond,
#: Dense loses (B = 32, n = 64: 4.7x CG's time; B = 256, n = 128: 13x its time and memory).
DENSE_MAX_ENTRIES = 2**21


def default_linear_solver(problem: Problem) -> LinearSolver:
    """The adjoint solver used when none is given: for symmetric problems (argmin, a symmetric
    custom_root) Dense when the system is small (the fastest exact method there, mostly for
    unbatched problems), else CG; GMRES for the others."""
    if not problem.symmetric:
        return GMRES()
    n, B = problem.size, problem.batch
    if n <= DENSE_MAX_SIZE and B * n**3 <= DENSE_MAX_ENTRIES:
        return Dense()
    return CG()


def _depends_on_other_leaves(out: Tensor, zr: Tensor) -> bool:
    """Whether ``out``'s graph reaches any tensor requiring grad other than ``zr``."""
    if out.grad_fn is None:
        return False
    seen = set()
    stack = [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            if variable is not zr:
                return True
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


class _Adjoint:
    """Everything the backward pass needs: the operator ``(∂F/∂z)ᵀ`` and the linear solver."""

    def __init__(
        self,
        problem: Problem,
        zr: Tensor,
        out: Tensor,
        mode: Implicit,
        info: SolveInfo | None,
        forward_rtol: float,
        solver: object,
        res: Tensor | None = None,
    ) -> None:
        self.problem = problem
        self.solver = solver
        self.zr = zr
        self.out = out
        # With the residual F(z) recorded, (∂F/∂z)ᵀ v is one VJP of it; without (fixed
        # points, where out = f(z)), it is v - vjp_f(v).
        self.res = res
        self.mode = mode
        self.info = info
        linear = mode.linear_solver
        if linear is None:
            linear = default_linear_solver(problem)
        self.linear = linear.with_rtol(forward_rtol)

    def _vjp(self, v: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(
            self.out if self.res is None else self.res, self.zr, v, retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros_like(v) if g is None else g

    def rmv(self, v: Tensor) -> Tensor:
        """``(∂F/∂z)ᵀ v``: a VJP of ``F``, or ``v - vjp_f(v)`` for a fixed point ``F = z - f``."""
        if self.res is not None:
            return self._vjp(v)
        return v - self._vjp(v)

    def dense(self) -> Tensor:
        """The ``(B, n, n)`` matrix ``(∂F/∂z)ᵀ``, by one vectorised batch of VJPs if possible."""
        B, n = self.zr.shape
        eye = torch.eye(n, dtype=self.zr.dtype, device=self.zr.device)
        basis = eye.unsqueeze(1).expand(n, B, n)
        try:
            # torch.func.vmap batches the backward formulas with its own batching rules
            # (autograd.grad's is_grads_batched expands a residual ``G @ w`` into an (n, n, n)
            # bmm, 12x slower at n = 200). Operations without a batching rule fall back to one
            # VJP per column.
            rows = torch.func.vmap(self._vjp)(basis)  # rows[i] = vjp(e_i), shape (n, B, n)
        except RuntimeError:
            rows = torch.stack([self._vjp(basis[i]) for i in range(n)])
        cols = rows if self.res is not None else basis - rows  # cols[i] = (∂F/∂z)ᵀ e_i
        return cols.permute(1, 2, 0)

    def operator(self) -> FunctionOperator:
        B, n = self.zr.shape
        return FunctionOperator(
            self.rmv, B, n, self.zr.dtype, self.zr.device,
            symmetric=self.problem.symmetric,
            positive_definite=True if self.problem.kind == "argmin" else None,
            dense=self.dense,
        )

    def solve(self, g: Tensor) -> Tensor:
        problem = self.problem
        gf = g.reshape(problem.batch, problem.size)
        op = self.operator()
        what = f"backward (adjoint) solve of {problem.kind}"
        fallback = self.mode.fallback
        if fallback is None:
            u, binfo = self.linear.solve(op, gf, what=what)
        else:
            u, binfo = self._solve_with_fallback(op, gf, what, fallback)
        if self.info is not None:
            self.info.backward = binfo if problem.batched else binfo.squeeze_batch()
        return u.reshape(g.shape)

    def _solve_with_fallback(
        self, op: FunctionOperator, gf: Tensor, what: str, fallback: _StepMode
    ) -> tuple[Tensor, SolveInfo]:
        quiet = copy.copy(self.linear)
        quiet.on_failure = "ignore"
        try:
            u, binfo = quiet.solve(op, gf, what=what)
            failed = ~binfo.converged
        except NonFiniteError:
            u, binfo, failed = None, None, None
        if failed is not None and not bool(failed.any()):
            return u, binfo
        eta = fallback.resolved_step_size(self.problem.kind, self.solver)
        op_fb, g_fb = op, gf
        if isinstance(eta, Tensor):
            # A learnable step size of GradientDescent: the fallback only needs its value.
            eta = eta.detach()
            if eta.numel() == 1:
                eta = float(eta)
            else:
                # One step per sample: Neumann with step 1 on the row-scaled system
                # (η A) u = η g takes exactly the steps u ← u + η (g - A u).
                eta_b = eta.reshape(-1, 1).to(gf.dtype)
                op_fb = FunctionOperator(
                    lambda v: eta_b * op.mv(v), op.batch, op.size, op.dtype, op.device
                )
                g_fb = eta_b * gf
                eta = 1.0
        neumann = Neumann(max_steps=fallback.steps, alpha=eta, rtol=0.0, on_failure="ignore")
        u_fb, _ = neumann.solve(op_fb, g_fb)
        n_failed = gf.shape[0] if failed is None else int(failed.sum())
        if failed is None:
            reached = "its iterate became NaN or Inf"
        else:
            # Name the residual reached and the tolerance missed, as every non-convergence
            # warning does.
            worst = float(binfo.residual[failed].max())
            tol = float(binfo.tolerance[failed].max()) if binfo.tolerance is not None else 0.0
            reached = (f"stopped after {int(binfo.steps.max())} steps with residual "
                       f"{worst:.3e} > tolerance {tol:.3e}")
        warnings.warn(
            f"{self.linear.name} did not converge in the {what} for {n_failed} of "
            f"{gf.shape[0]} sample(s) ({reached}); used the {type(fallback).__name__} gradient "
            f"for them. For the implicit gradient raise max_steps (now {self.linear.max_steps}) "
            "or choose another linear solver.",
            ConvergenceWarning,
            stacklevel=3,
        )
        if failed is None:
            steps = torch.full((gf.shape[0],), fallback.steps, device=gf.device)
            binfo = SolveInfo(
                converged=torch.zeros(gf.shape[0], dtype=torch.bool, device=gf.device),
                steps=steps,
                residual=torch.full((gf.shape[0],), float("nan"), device=gf.device),
                solver=f"{self.linear.name} -> {type(fallback).__name__}",
            )
            return u_fb, binfo
        return torch.where(failed.unsqueeze(-1), u_fb, u), binfo


class _AdjointHook(torch.autograd.Function):
    """Identity forward; backward replaces the cotangent ``g`` by ``u = (∂F/∂z)⁻ᵀ g``."""

    @staticmethod
    def forward(ctx, out: Tensor, hook: _Adjoint) -> Tensor:  # type: ignore[override]
        ctx.hook = hook
        # The value is the solver's z, not out = z - F(z): they differ by the residual, which
        # is not small when a black-box solver (custom_root) stops early.
        return hook.zr.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        with torch.enable_grad():
            u = ctx.hook.solve(g)
        return u, None
