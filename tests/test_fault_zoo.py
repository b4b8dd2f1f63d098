"""The fault zoo: bad and unusual inputs, each with the outcome the library promises.

Every case ends in one of two ways, never in silent garbage:

* the right answer, checked against an independent reference; or
* a clear error or warning of the library's classes (``il.ConvergenceWarning``,
  ``il.ConvergenceError``, ``il.NonFiniteError``, ``ValueError``/``TypeError``) naming what
  went wrong.

Policy for a batch: the samples of a batch are solved and monitored one by one, but a sample
whose residual becomes NaN or Inf fails the whole call with ``NonFiniteError`` naming its
index (returning the other samples would hide the bad one). A sample that merely does not
converge is reported per sample in ``info.converged`` with one warning for the call.

The classes below follow the failure classes of the issue that introduced this file. Its
numbered problems are covered here and in ``test_core_convergence_verdict.py`` (false
convergence, fixed points at 0, the default root solver on ``F`` and ``-F``),
``test_examples_outputs.py``, ``test_docs_snippets.py`` and ``test_nn_fsdp.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import implicit_layers as il
from implicit_layers._problem import Problem

F64 = torch.float64
LOUD = (il.ConvergenceWarning, il.ConvergenceError, il.NonFiniteError)


def _loud(fn):
    """Run ``fn`` with ConvergenceWarning as an error; return the exception it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", il.ConvergenceWarning)
        with pytest.raises(LOUD) as exc:
            fn()
    return exc.value


def _quiet(fn):
    """Run ``fn`` with every warning as an error (the case must pass silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


class _Cell(torch.nn.Module):
    """``z ↦ tanh(W z + U x + b)``, contractive with ``‖W‖ = 0.5``."""

    def __init__(self, n: int = 6, m: int = 4, dtype: torch.dtype = F64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, n, generator=g, dtype=dtype)
        self.W = torch.nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(n, m, generator=g, dtype=dtype) / m**0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _picard_reference(f, z, *args, steps=400):
    for _ in range(steps):
        z = f(z, *args)
    return z


# -- divergent and expansive maps, no fixed point, no root, no minimum -------------------
class TestDivergence:
    def test_expansive_affine_map_diverges_loudly(self):
        err = _loud(lambda: il.fixed_point(lambda z: 2 * z + 1, torch.zeros(3, dtype=F64),
                                           solver=il.solvers.Picard()))
        assert "Picard" in str(err)

    def test_expansive_affine_map_overflows_float32_loudly(self):
        with pytest.raises(il.NonFiniteError, match="Picard.*NaN or Inf"):
            il.fixed_point(lambda z: 2 * z + 1, torch.zeros(3), solver=il.solvers.Picard())

    def test_anderson_finds_the_repelling_fixed_point_of_an_affine_map(self):
        # Anderson on an affine map is a Krylov method: it finds z* = -1 although Picard
        # diverges from it.
        z, info = _quiet(lambda: il.fixed_point(lambda z: 2 * z + 1, torch.zeros(3, dtype=F64),
                                                return_info=True))
        assert bool(info.converged)
        torch.testing.assert_close(z, -torch.ones(3, dtype=F64), rtol=0, atol=1e-9)

    @pytest.mark.parametrize("solver", [il.solvers.Anderson, il.solvers.Broyden, il.solvers.Picard])
    def test_map_without_fixed_point(self, solver):
        # z = z + 1 has no fixed point: every solver ends with a warning, never "converged".
        with pytest.warns(il.ConvergenceWarning, match=solver.__name__):
            _, info = il.fixed_point(lambda z: z + 1, torch.zeros(3, dtype=F64),
                                     solver=solver(max_steps=100), return_info=True)
        assert not bool(info.converged)

    def test_residual_without_root(self):
        with pytest.warns(il.ConvergenceWarning, match="Broyden.*root"):
            _, info = il.root(lambda z: z**2 + 1, torch.zeros(3, dtype=F64),
                              solver=il.solvers.Broyden(max_steps=100), return_info=True)
        assert not bool(info.converged)

    def test_objective_unbounded_below(self):
        _loud(lambda: il.argmin(lambda w: -(w**2).sum(), torch.ones(3, dtype=F64)))
        _loud(lambda: il.argmin(lambda w: w.sum(), torch.ones(3, dtype=F64),
                                solver=il.solvers.LBFGS(max_steps=50)))

    def test_diverging_batch_sample_is_not_reported_converged(self):
        # One expansive sample among contractive ones: the others converge, it does not.
        scale = torch.tensor([[0.5], [2.0], [0.5]], dtype=F64)
        with pytest.warns(il.ConvergenceWarning, match="1 of 3"):
            z, info = il.fixed_point(lambda z: scale * z + 1, torch.zeros(3, 2, dtype=F64),
                                     solver=il.solvers.Picard(max_steps=200), batched=True,
                                     return_info=True)
        assert info.converged.tolist() == [True, False, True]
        torch.testing.assert_close(z[[0, 2]], torch.full((2, 2), 2.0, dtype=F64))


# -- fixed points at 0 and at huge scale --------------------------------------------------
class TestScale:
    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    def test_deq_with_equilibrium_at_zero(self, dtype):
        # tanh(W z) with ‖W‖ < 1 and no input: the equilibrium is exactly 0.
        cell = _Cell(dtype=dtype)
        with torch.no_grad():
            cell.U.zero_()
            cell.b.zero_()
        deq = il.nn.DEQ(cell, state_shape=6)
        z0 = torch.ones(5, 6, dtype=dtype)
        z, info = _quiet(lambda: deq(torch.zeros(5, 4, dtype=dtype), z0, return_info=True))
        assert bool(info.converged.all())
        bound = 1e-3 if dtype == torch.float32 else 1e-8
        assert float(z.detach().abs().max()) <= bound

    @pytest.mark.parametrize("dtype, size", [(torch.float32, 1e30), (F64, 1e200)])
    def test_fixed_point_at_huge_scale(self, dtype, size):
        # ‖z*‖² overflows the dtype; the norms in the convergence test must not.
        f = lambda z: 0.5 * z + size  # noqa: E731
        if dtype == F64:
            # Squares of 1e200 overflow float64 itself: the library reports it loudly.
            _loud(lambda: il.fixed_point(f, torch.zeros(3, dtype=dtype)))
            return
        z, info = _quiet(lambda: il.fixed_point(f, torch.zeros(3, dtype=dtype), return_info=True))
        assert bool(info.converged)
        torch.testing.assert_close(z, torch.full((3,), 2 * size, dtype=dtype), rtol=1e-4, atol=0)

    def test_root_at_huge_scale(self):
        z = _quiet(lambda: il.root(lambda z: z - 1e20, torch.zeros(3, dtype=F64)))
        torch.testing.assert_close(z, torch.full((3,), 1e20, dtype=F64))

    def test_tiny_scale_problem_is_solved_relative_to_its_scale(self):
        # z = 0.5 z + 1e-30: the answer 2e-30 to the relative tolerance, not "0 is close".
        z = _quiet(lambda: il.fixed_point(lambda z: 0.5 * z + 1e-30, torch.zeros(3, dtype=F64)))
        torch.testing.assert_close(z, torch.full((3,), 2e-30, dtype=F64), rtol=1e-8, atol=0)


# -- singular and near-singular Jacobians, indefinite Hessians under CG --------------------
class TestSingular:
    def test_singular_jacobian_dense_backward_raises(self):
        # F(z, a) = (z - 1)³ + a has a triple root at a = 0: ∂F/∂z = 0 there.
        a = torch.tensor(0.0, dtype=F64, requires_grad=True)
        z = il.root(lambda z, a: (z - 1) ** 3 + a, torch.ones(1, dtype=F64), a,
                    backward=il.linear.Dense())
        with pytest.raises(il.NonFiniteError, match="Dense.*singular"):
            torch.autograd.grad(z.sum(), a)

    def test_singular_jacobian_default_backward_falls_back_to_gmres_and_warns(self):
        # A small root's default backward is Dense, which raises here; it falls back to GMRES.
        a = torch.zeros(3, dtype=F64, requires_grad=True)
        z, info = il.root(lambda z, a: (z - 1) ** 3 + a, torch.ones(3, dtype=F64), a,
                          return_info=True)
        with pytest.warns(il.ConvergenceWarning, match="GMRES.*backward"):
            (g,) = torch.autograd.grad(z.sum(), a)
        assert bool(torch.isfinite(g).all())
        assert info.backward.solver == "GMRES"

    @staticmethod
    def _near_singular(backward):
        # cond(A) = 1e8, n = 8.
        g = torch.Generator().manual_seed(0)
        n = 8
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        A = Q @ torch.diag(torch.logspace(0, -8, n, dtype=F64)) @ Q.T
        b = torch.randn(n, generator=g, dtype=F64, requires_grad=True)

        @il.custom_root(lambda z, b: A @ z - b, backward=backward)
        def solve(z0, b):
            return torch.linalg.solve(A, b)

        z = solve(torch.zeros(n, dtype=F64), b)
        w = torch.linspace(1, 2, n, dtype=F64)
        (grad,) = torch.autograd.grad((w * z).sum(), b)
        return grad, torch.linalg.solve(A.T, w)

    def test_near_singular_jacobian_dense_gives_the_exact_gradient(self):
        grad, expected = _quiet(lambda: self._near_singular(il.linear.Dense()))
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)

    def test_near_singular_jacobian_gmres_backward_warns(self):
        # GMRES(20) stagnates above the 1e-10 tolerance at cond 1e8, and says so.
        with pytest.warns(il.ConvergenceWarning, match="GMRES.*backward.*Dense is exact"):
            grad, expected = self._near_singular(il.linear.GMRES())
        assert bool(torch.isfinite(grad).all())

    def test_near_singular_jacobian_default_backward_is_exact(self):
        # A small root's default backward is Dense (cond 1e8, n = 8), exact to rounding.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grad, expected = self._near_singular(None)
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)

    def _saddle(self, backward):
        th = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        M = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))

        @il.custom_root(lambda w, th: M @ w - th, backward=backward, symmetric=True)
        def solve(w0, th):
            return torch.linalg.solve(M, th)

        w = solve(torch.zeros(2, dtype=F64), th)
        return torch.autograd.grad(w.sum(), th)[0], M

    def test_indefinite_hessian_under_cg_warns_and_names_minres(self):
        with pytest.warns(il.ConvergenceWarning, match="CG.*MINRES"):
            self._saddle(il.linear.CG())

    def test_indefinite_hessian_under_minres_is_exact(self):
        grad, M = self._saddle(il.linear.MINRES())
        torch.testing.assert_close(grad, torch.linalg.solve(M.T, torch.ones(2, dtype=F64)))


# -- NaN and Inf in inputs, parameters, z0, cotangents, one sample of a batch ----------------
class TestNonFinite:
    def test_nan_input(self):
        x = torch.randn(3, 4, dtype=F64)
        x[1, 2] = float("nan")
        with pytest.raises(il.NonFiniteError, match=r"sample\(s\) 1 of 3; the whole batch fails"):
            il.nn.DEQ(_Cell(), state_shape=6)(x)

    def test_nan_parameter(self):
        cell = _Cell()
        with torch.no_grad():
            cell.W[0, 0] = float("nan")
        with pytest.raises(il.NonFiniteError, match="NaN or Inf"):
            il.nn.DEQ(cell, state_shape=6)(torch.randn(2, 4, dtype=F64))

    def test_nan_initial_guess(self):
        z0 = torch.zeros(2, 6, dtype=F64)
        z0[0, 0] = float("nan")
        with pytest.raises(il.NonFiniteError, match=r"sample\(s\) 0 of 2"):
            il.nn.DEQ(_Cell(), state_shape=6)(torch.randn(2, 4, dtype=F64), z0)

    @pytest.mark.parametrize("backward", [None, il.linear.Dense(), il.linear.Broyden()])
    def test_nan_cotangent(self, backward):
        x = torch.randn(2, 4, dtype=F64, requires_grad=True)
        z = il.nn.DEQ(_Cell(), state_shape=6, backward=backward)(x)
        g = torch.ones_like(z)
        g[1, 0] = float("nan")
        with pytest.raises(il.NonFiniteError):
            torch.autograd.grad(z, x, g)

    def test_nan_objective_in_one_sample_of_argmin_batch(self):
        c = torch.randn(4, 3, dtype=F64)
        c[2] = float("nan")
        with pytest.raises(il.NonFiniteError, match=r"sample\(s\) 2 of 4"):
            il.argmin(lambda w, c: ((w - c) ** 2).sum(-1), torch.zeros(4, 3, dtype=F64), c,
                      batched=True)

    def test_finite_batch_next_to_a_failed_one_is_unaffected(self):
        # The same samples without the bad one: the answer does not depend on the batch.
        x = torch.randn(3, 4, dtype=F64)
        deq = il.nn.DEQ(_Cell(), state_shape=6)
        z = deq(x)
        torch.testing.assert_close(deq(x[[0, 2]]), z[[0, 2]], rtol=1e-9, atol=1e-12)


# -- low precision: float32 and half-precision underflow and overflow -----------------------
class TestPrecision:
    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    def test_underflow_towards_zero_stays_finite(self, dtype):
        theta = torch.tensor(0.5, dtype=dtype)
        solver = il.solvers.Anderson(rtol=0.0, max_steps=80, on_failure="ignore")
        z = il.fixed_point(lambda z: theta * z, torch.ones(4, dtype=dtype), solver=solver)
        assert bool(torch.isfinite(z).all()) and float(z.abs().max()) < 1e-20

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_overflow_is_loud(self, dtype):
        with pytest.raises(il.NonFiniteError):
            il.fixed_point(lambda z: 2 * z + 1, torch.zeros(3, dtype=dtype),
                           solver=il.solvers.Picard())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_deq_with_defaults(self, dtype):
        # Needs the mixed-precision work of the core: a half-precision module and input run
        # with the default solver and backward, to the accuracy of the dtype.
        cell = _Cell(dtype=torch.float32)
        x = torch.randn(3, 4)
        ref_x = x.clone().requires_grad_(True)
        ref = il.nn.DEQ(cell, state_shape=6)(ref_x)
        (ref_g,) = torch.autograd.grad(ref.sum(), ref_x)
        xh = x.to(dtype).requires_grad_(True)
        z = il.nn.DEQ(cell.to(dtype), state_shape=6)(xh)
        assert z.dtype == dtype
        (g,) = torch.autograd.grad(z.float().sum(), xh)
        torch.testing.assert_close(z.float(), ref.detach(), rtol=0, atol=3e-2)
        torch.testing.assert_close(g.float(), ref_g, rtol=0, atol=1e-1)

    def test_deq_under_cpu_autocast(self):
        # Needs the mixed-precision work of the core: autocast as for any nn.Module.
        cell = _Cell(dtype=torch.float32)
        x = torch.randn(3, 4, requires_grad=True)
        deq = il.nn.DEQ(cell, state_shape=6)
        ref = deq(x)
        (ref_g,) = torch.autograd.grad(ref.sum(), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = deq(x)
        (g,) = torch.autograd.grad(z.float().sum(), x)
        torch.testing.assert_close(z.float(), ref.detach(), rtol=0, atol=3e-2)
        torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-1)


# -- max_steps exhausted, forward and backward -------------------------------------------
class TestMaxSteps:
    def test_forward_max_steps_warns_at_the_callers_line(self):
        x = torch.randn(2, 4, dtype=F64)
        deq = il.nn.DEQ(_Cell(), state_shape=6, solver=il.solvers.Picard(max_steps=2))
        with pytest.warns(il.ConvergenceWarning, match=r"Picard.*2 of 2.*max_steps \(now 2\)") as rec:
            deq(x)
        assert rec[0].filename == __file__

    def test_forward_max_steps_raises_on_request(self):
        solver = il.solvers.Anderson(max_steps=2, on_failure="raise")
        with pytest.raises(il.ConvergenceError, match="Anderson"):
            il.nn.DEQ(_Cell(), state_shape=6, solver=solver)(torch.randn(2, 4, dtype=F64))

    def test_backward_max_steps_warns_at_the_callers_line(self):
        x = torch.randn(2, 4, dtype=F64, requires_grad=True)
        z = il.nn.DEQ(_Cell(), state_shape=6, backward=il.linear.GMRES(max_steps=1))(x)
        with pytest.warns(il.ConvergenceWarning, match="GMRES.*backward") as rec:
            z.sum().backward()
        assert rec[0].filename == __file__

    def test_backward_max_steps_raises_on_request(self):
        x = torch.randn(2, 4, dtype=F64, requires_grad=True)
        backward = il.linear.GMRES(max_steps=1, on_failure="raise")
        z = il.nn.DEQ(_Cell(), state_shape=6, backward=backward)(x)
        with pytest.raises(il.ConvergenceError, match="GMRES"):
            z.sum().backward()

    def test_dense_failure_advice_does_not_mention_steps(self):
        # Dense has one "step": its failure means an ill-conditioned matrix.
        i = torch.arange(14, dtype=F64)
        hilbert = 1 / (i[:, None] + i[None, :] + 1)  # cond ~ 1e19: the solve's residual is large
        op = il.linear.MatrixOperator(hilbert)
        with pytest.warns(il.ConvergenceWarning, match="Dense") as rec:
            b = torch.randn(1, 14, dtype=F64, generator=torch.Generator().manual_seed(0))
            il.linear.Dense().solve(op, b)
        assert "max_steps" not in str(rec[0].message)
        assert "ill-conditioned" in str(rec[0].message)


# -- grad modes ----------------------------------------------------------------------------
def _tanh_map(z, x, W):
    return torch.tanh(z @ W.T + x)


class TestGradModes:
    W = 0.4 * torch.eye(5, dtype=F64) + 0.05
    x = torch.linspace(-1, 1, 10, dtype=F64).reshape(2, 5)

    def _ref(self):
        return _picard_reference(_tanh_map, torch.zeros(2, 5, dtype=F64), self.x, self.W)

    def test_no_grad(self):
        x = self.x.clone().requires_grad_(True)
        with torch.no_grad():
            z = il.fixed_point(_tanh_map, torch.zeros(2, 5, dtype=F64), x, self.W, batched=True)
        assert not z.requires_grad
        torch.testing.assert_close(z, self._ref())

    @pytest.mark.parametrize("kind", ["fixed_point", "root", "deq", "box_argmin_layer"])
    def test_inference_mode(self, kind):
        with torch.inference_mode():
            if kind == "fixed_point":
                z = il.fixed_point(_tanh_map, torch.zeros(2, 5, dtype=F64), self.x, self.W,
                                   batched=True)
                torch.testing.assert_close(z, self._ref())
            elif kind == "root":
                z = il.root(lambda z, x, W: _tanh_map(z, x, W) - z, torch.zeros(2, 5, dtype=F64),
                            self.x, self.W, batched=True)
                torch.testing.assert_close(z, self._ref())
            elif kind == "deq":
                x = torch.randn(2, 4, dtype=F64)
                cell = _Cell()
                z = il.nn.DEQ(cell, state_shape=6)(x)
                ref = _picard_reference(cell, torch.zeros(2, 6, dtype=F64), x)
                torch.testing.assert_close(z, ref)
            else:
                c = torch.tensor([[-2.0, 0.3, 2.0]], dtype=F64)
                layer = il.nn.ArgminLayer(lambda w, c: ((w - c) ** 2).sum(-1), w_shape=3,
                                          lower=-1.0, upper=1.0)
                w = layer(c)
                torch.testing.assert_close(w, c.clamp(-1, 1))

    def test_inference_mode_argmin(self):
        # Needs the core's inference-mode support for argmin (the forward needs gradients
        # of the objective even though no graph is kept).
        c = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
        with torch.inference_mode():
            w = il.argmin(lambda w, c: ((w - c) ** 2).sum() + (w**4).sum(), torch.zeros(3, dtype=F64), c)
        ref = il.argmin(lambda w, c: ((w - c) ** 2).sum() + (w**4).sum(), torch.zeros(3, dtype=F64), c)
        torch.testing.assert_close(w, ref)

    def test_inference_mode_unconstrained_argmin_layer(self):
        c = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
        layer = il.nn.ArgminLayer(lambda w, c: ((w - c) ** 2).sum(-1), w_shape=3)
        with torch.inference_mode():
            w = layer(c)
        torch.testing.assert_close(w, c)

    def test_enable_grad_inside_no_grad(self):
        x = self.x.clone().requires_grad_(True)
        with torch.no_grad():
            with torch.enable_grad():
                z = il.fixed_point(_tanh_map, torch.zeros(2, 5, dtype=F64), x, self.W,
                                   batched=True)
                (g,) = torch.autograd.grad(z.sum(), x)
        # Reference: the IFT gradient with a dense Jacobian, per sample.
        ref = self._ref()
        for k in range(2):
            J = torch.func.jacrev(_tanh_map)(ref[k], self.x[k], self.W)
            d = 1 - ref[k] ** 2  # ∂f/∂x = diag(1 - z²)
            expected = d * torch.linalg.solve((torch.eye(5, dtype=F64) - J).T, torch.ones(5, dtype=F64))
            torch.testing.assert_close(g[k], expected)


# -- the smaller problems of the issue -------------------------------------------------------
class TestUserMistakes:
    def test_argmin_layer_empty_box(self):
        with pytest.raises(ValueError, match="lower must not exceed upper.*3 of 3"):
            il.nn.ArgminLayer(lambda w, x: (w**2).sum(-1), w_shape=3,
                              lower=torch.ones(3), upper=torch.zeros(3))
        lower = torch.nn.Parameter(torch.zeros(3))
        layer = il.nn.ArgminLayer(lambda w, x: ((w - x) ** 2).sum(-1), w_shape=3,
                                  lower=lower, upper=torch.ones(3))
        with torch.no_grad():
            lower[1] = 2.0  # a learnable bound crossed during training
        with pytest.raises(ValueError, match="lower must not exceed upper.*1 of 3"):
            layer(torch.zeros(2, 3))

    def test_argmin_layer_errors_name_objective(self):
        layer = il.nn.ArgminLayer(lambda w, x: (w**2).sum(-1, keepdim=True).expand(-1, 2),
                                  w_shape=3)
        with pytest.raises(ValueError, match="^objective must return one value per sample"):
            layer(torch.zeros(4, 3, dtype=F64))
        layer = il.nn.ArgminLayer(lambda w, x: ((w - x) ** 2).sum(-1).float(), w_shape=3)
        with pytest.raises(TypeError, match="^objective returned dtype torch.float32"):
            layer(torch.zeros(4, 3, dtype=F64))
        layer = il.nn.ArgminLayer(lambda w, x: (x**2).sum(-1), w_shape=3)
        with pytest.raises(ValueError, match="^objective.*does not depend on w"):
            layer(torch.zeros(4, 3, dtype=F64))

    def test_argmin_objective_independent_of_w(self):
        # Needs the core's check: a clear error instead of autograd's "does not require grad".
        c = torch.ones(3, dtype=F64)
        with pytest.raises(ValueError, match="does not depend on w"):
            il.argmin(lambda w, c: (c**2).sum(), torch.zeros(3, dtype=F64), c)

    def test_truncated_zero_step_size(self):
        # Needs the core's check: a zero step gives zero gradients.
        with pytest.raises(ValueError, match="step_size"):
            il.backward.Truncated(3, step_size=0.0)

    def test_deq_on_an_empty_batch(self):
        cell = _Cell()
        deq = il.nn.DEQ(cell, state_shape=6)
        x = torch.zeros(0, 4, dtype=F64, requires_grad=True)
        z, info = deq(x, return_info=True)
        assert z.shape == (0, 6) and info.converged.shape == (0,)
        z.sum().backward()
        assert torch.equal(cell.W.grad, torch.zeros_like(cell.W))
        lin = torch.nn.Linear(4, 6).double()
        assert lin(x).shape == (0, 6)  # the behaviour DEQ follows


# -- the default backward's choice ---------------------------------------------------------
class TestDefaultBackward:
    @pytest.mark.parametrize("B, n, expected", [
        (1, 128, "Dense"), (1, 16, "Dense"), (64, 32, "Dense"),
        (32, 64, "DenseOrCG"), (256, 128, "CG"), (1000, 64, "CG"), (1, 300, "DenseOrCG"),
        (1, 1024, "DenseOrCG"), (1, 1025, "CG"),
    ])
    def test_dense_only_where_it_is_cheap(self, B, n, expected):
        # Measured by benchmarks/default_backward.py: Dense costs ~B n³ against CG's k B n²;
        # in between the first backward measures both (DenseOrCG).
        z0 = torch.zeros(B, n, dtype=F64)
        problem = Problem("argmin", lambda w: (w**2).sum(-1), (), z0, batched=True, name="fun")
        assert problem.default_adjoint_solver().name == expected

    def test_default_backward_on_a_batch_of_per_sample_hessians(self):
        g = torch.Generator().manual_seed(0)
        B, n = 40, 48
        Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=F64))[0]
        A = (Q * torch.logspace(0, 2, n, dtype=F64)) @ Q.mT
        c = torch.randn(B, n, generator=g, dtype=F64, requires_grad=True)

        def fun(w, c):
            return 0.5 * (w.unsqueeze(1) @ A @ w.unsqueeze(-1)).reshape(B) - (c * w).sum(-1)

        w = _quiet(lambda: il.argmin(fun, torch.zeros(B, n, dtype=F64), c,
                                     solver=il.solvers.Newton(), batched=True))
        (grad,) = torch.autograd.grad((w**2).sum(), c)
        ref_w = torch.linalg.solve(A, c.detach())
        expected = torch.linalg.solve(A, 2 * ref_w)
        torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-10)
