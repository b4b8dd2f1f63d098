"""The forward's secant information reused in the backward: Broyden's inverse-Jacobian estimate
as the initial guess of the adjoint solve (SHINE's warm start), and the solver hooks behind it.

The guess is only a start point: every gradient here must equal the dense reference
(``torch.linalg.solve`` on the exact Jacobian) as closely as without it."""

import warnings

import pytest
import torch

import implicit_layers as il
from implicit_layers.solvers._base import adjoint_slot
from implicit_layers.solvers.base import ForwardSolver, Monitor, Problem
from implicit_layers.solvers.broyden import InverseEstimate

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _deq(n: int, batch: int, dtype=F64, seed: int = 0, scale: float = 0.9):
    """``z = tanh(z Wᵀ + x)`` with ``‖W‖₂ = scale``, and a cotangent ``t``."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=F64)
    W = (scale * G / torch.linalg.matrix_norm(G, 2)).to(dtype)
    x = torch.randn(batch, n, generator=g, dtype=F64).to(dtype)
    t = torch.randn(batch, n, generator=g, dtype=F64).to(dtype)
    return W, x, t


def f_tanh(z, x, W):
    return torch.tanh(z @ W.T + x)


def _dense_grads(z, W, t):
    """``(dW, dx)`` of ``<t, z*>`` by the implicit function theorem, with dense per-sample
    solves in float64: ``(I - D W)ᵀ u = t`` with ``D = diag(1 - z²)``."""
    z, W, t = z.double(), W.double(), t.double()
    d = 1 - z**2
    A = torch.eye(z.shape[1], dtype=F64) - d[:, :, None] * W[None]
    u = torch.linalg.solve(A.mT, t.unsqueeze(-1)).squeeze(-1)
    v = d * u  # ∂f/∂(pre-activation) applied to u
    return v.T @ z, v


def _solve(W, x, warm: bool, backward=None, **broyden):
    W = W.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    solver = il.solvers.Broyden(30, warm_start_backward=warm, **broyden)
    z, info = il.fixed_point(f_tanh, torch.zeros_like(x), x, W, solver=solver,
                             backward=backward or il.linear.GMRES(), batched=True,
                             return_info=True)
    return z, info, W, x


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 2e-4)])
def test_warm_start_gradient_matches_dense(dtype, tol):
    W0, x0, t = _deq(24, 6, dtype)
    for warm in (False, True):
        z, info, W, x = _solve(W0, x0, warm)
        dW, dx = torch.autograd.grad(z, (W, x), t)
        assert bool(info.converged.all()) and bool(info.backward.converged.all())
        rW, rx = _dense_grads(z.detach(), W0, t)
        assert _rel(dW, rW) < tol and _rel(dx, rx) < tol
        assert dW.dtype == dtype


def _counted(counter):
    """``f_tanh`` counting the products with its Jacobian's transpose (one hook call per VJP
    through the graph the backward records)."""

    def f(z, x, W):
        if torch.is_grad_enabled() and z.requires_grad:
            z.register_hook(lambda g: counter.__setitem__(0, counter[0] + 1))
        return f_tanh(z, x, W)

    return f


def test_warm_start_saves_backward_products():
    # On this DEQ Broyden's estimate starts the adjoint solve at ~0.2 of the cotangent's
    # residual: GMRES needs fewer steps, and fewer products in all (the scaling's included).
    W0, x0, t = _deq(32, 16)
    steps, vjps = {}, {}
    for warm in (False, True):
        counter = [0]
        W, x = W0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        z, info = il.fixed_point(
            _counted(counter), torch.zeros_like(x), x, W,
            solver=il.solvers.Broyden(30, warm_start_backward=warm), backward=il.linear.GMRES(),
            batched=True, return_info=True,
        )
        assert bool(info.converged.all())
        counter[0] = 0
        torch.autograd.grad(z, (W, x), t)
        steps[warm] = int(info.backward.steps.sum())
        vjps[warm] = counter[0]
    assert steps[True] < steps[False]
    assert vjps[True] < vjps[False]


def test_inverse_estimate_products_are_transposes():
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(2, 2, 4, 5, generator=g, dtype=F64)
    gamma = torch.tensor([[0.7], [1.3]], dtype=F64)
    H = gamma[:, :, None] * torch.eye(5, dtype=F64) + U.mT @ V  # γ I + Σ u_i v_iᵀ
    est = InverseEstimate(U, V, gamma)
    x = torch.randn(2, 5, generator=g, dtype=F64)
    torch.testing.assert_close(est.apply(x, False), (H @ x.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(est.apply(x, True), (H.mT @ x.unsqueeze(-1)).squeeze(-1))
    assert est.apply(x[:1], True) is None  # another batch: no guess
    assert est.apply(x.float(), True) is None


def test_broyden_estimate_meets_its_secant_equation_on_a_linear_root():
    # F(z) = A z - b: after the solve, H ≈ A⁻¹ along the last step; on the residual it was
    # built from, the Newton step H F(z0) moves z0 most of the way to the root.
    g = torch.Generator().manual_seed(1)
    n = 6
    A = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    b = torch.randn(1, n, generator=g, dtype=F64)
    z0 = torch.zeros(1, n, dtype=F64)
    problem = Problem("root", lambda z: z @ A.T - b, (), z0, batched=True, name="f")
    solver = il.solvers.Broyden(50, rtol=1e-12, warm_start_backward=True)
    with torch.no_grad(), adjoint_slot(True) as kept:
        z, info = solver.solve(problem, z0)
    assert bool(info.converged.all()) and len(kept) == 1
    guess = solver.adjoint_guess(kept[0], b, False)
    exact = torch.linalg.solve(A, b.squeeze(0)).unsqueeze(0)
    # closer to A⁻¹ b than the initial estimate γ I alone
    assert _rel(guess, exact) < _rel(kept[0].gamma * b, exact)


class _Recorder(ForwardSolver):
    """Picard iteration that records whether a backward wanted its state, and offers an
    exact (or a deliberately bad) guess for the adjoint solve."""

    name = "Recorder"
    kinds = ("fixed_point",)
    seen: list[bool] = []
    mode = "exact"

    def _solve(self, problem, z0, differentiable):
        type(self).seen.append(self.adjoint_state_wanted())
        z = z0
        r = problem.residual(z)
        mon = Monitor(self, problem, z, r)
        for _ in range(self.max_steps):
            if mon.stop():
                break
            z = z - r
            r = problem.residual(z)
            mon.record(z, r, mon.active)
        z, info = mon.finish()
        self.keep_for_adjoint(z)
        return z, info

    def adjoint_guess(self, state, rhs, transpose):
        z = state
        if type(self).mode == "shape":
            return rhs[:, :-1]
        if type(self).mode == "bad":
            return 1e6 * torch.randn(rhs.shape, generator=torch.Generator().manual_seed(0),
                                     dtype=rhs.dtype)
        d = 1 - z**2
        A = torch.eye(z.shape[1], dtype=z.dtype) - d[:, :, None] * self.W[None]
        A = A.mT if transpose else A
        return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)


def _recorder(W):
    _Recorder.seen = []
    solver = _Recorder(rtol=1e-12)
    object.__setattr__(solver, "W", W)  # test-only: the exact Jacobian for the oracle guess
    return solver


def test_hook_state_kept_only_for_a_backward():
    W0, x0, _ = _deq(8, 3, scale=0.5)
    x = x0.clone().requires_grad_(True)
    solver = _recorder(W0)
    il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=solver, batched=True)
    with torch.no_grad():
        il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=solver, batched=True)
    with torch.inference_mode():
        il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=solver, batched=True)
    torch.func.grad(lambda xx: il.fixed_point(f_tanh, torch.zeros_like(xx), xx, W0,
                                              solver=solver, batched=True).sum())(x0)
    solver.solve(Problem("fixed_point", f_tanh, (x0, W0), x0, batched=True, name="f"), x0)
    assert _Recorder.seen == [True, False, False, False, False]


@pytest.mark.parametrize("linear", [il.linear.GMRES(), il.linear.Neumann(200)])
@pytest.mark.parametrize("mode", ["exact", "bad"])
def test_hook_guess_is_only_a_start_point(mode, linear):
    # An exact guess leaves nothing to do (GMRES and the Neumann series both start from x0);
    # a wild one (1e6 x random) is scaled down to the zero start: both give the dense
    # gradient, the second in no more steps than from zero.
    W0, x0, t = _deq(16, 4, scale=0.7)
    _Recorder.mode = mode
    try:
        steps = {}
        for name, solver in (("cold", il.solvers.Picard(rtol=1e-12)), ("hooked", _recorder(W0))):
            x = x0.clone().requires_grad_(True)
            z, info = il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=solver,
                                     backward=linear, batched=True, return_info=True)
            (dx,) = torch.autograd.grad(z, x, t)
            _, rx = _dense_grads(z.detach(), W0, t)
            assert _rel(dx, rx) < 1e-9
            steps[name] = info.backward.steps
    finally:
        _Recorder.mode = "exact"
    if mode == "exact":
        assert int(steps["hooked"].max()) == 0
    else:
        assert bool((steps["hooked"] <= steps["cold"] + 1).all())


def test_hook_guess_of_the_wrong_shape_is_an_error():
    W0, x0, t = _deq(8, 3, scale=0.5)
    _Recorder.mode = "shape"
    try:
        x = x0.clone().requires_grad_(True)
        z = il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=_recorder(W0),
                           backward=il.linear.GMRES(), batched=True)
        with pytest.raises(ValueError, match="adjoint_guess returned a tensor of shape"):
            torch.autograd.grad(z, x, t)
    finally:
        _Recorder.mode = "exact"


def test_warm_start_double_backward_matches_unrolled():
    # d/dx of ‖dL/dx‖² through the implicit layer (second solves with A, guessed with H)
    # against autograd through 200 Picard steps of a 0.5-contraction (error ~ 0.5^200).
    W0, x0, t = _deq(10, 3, scale=0.5)

    def second(solver, backward):
        x = x0.clone().requires_grad_(True)
        z = il.fixed_point(f_tanh, torch.zeros_like(x), x, W0, solver=solver,
                           backward=backward, batched=True)
        (dx,) = torch.autograd.grad((z * t).sum(), x, create_graph=True)
        return torch.autograd.grad((dx**2).sum(), x)[0]

    warm = second(il.solvers.Broyden(30, rtol=1e-12, warm_start_backward=True),
                  il.linear.GMRES(rtol=1e-12))
    cold = second(il.solvers.Broyden(30, rtol=1e-12), il.linear.GMRES(rtol=1e-12))
    unrolled = second(il.solvers.Picard(rtol=0.0, max_steps=200, on_failure="ignore"),
                      il.backward.Unrolled())
    assert _rel(warm, unrolled) < 1e-8
    assert _rel(warm, cold) < 1e-9


def test_warm_start_forward_mode_matches_dense():
    # The tangent solve A ż = (∂f/∂x) ẋ, guessed with H (no torch.func transform here).
    W0, x0, t = _deq(12, 3)
    x_dot = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    solver = il.solvers.Broyden(30, rtol=1e-12, warm_start_backward=True)
    W = W0.clone().requires_grad_(True)  # a backward is possible: the state is kept
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        x = fwAD.make_dual(x0, x_dot)
        z = il.fixed_point(f_tanh, torch.zeros_like(x0), x, W, solver=solver,
                           backward=il.linear.GMRES(rtol=1e-12), batched=True)
        z_dot = fwAD.unpack_dual(z).tangent
    zs = fwAD.unpack_dual(z).primal.detach()
    d = 1 - zs**2
    A = torch.eye(12, dtype=F64) - d[:, :, None] * W0[None]
    ref = torch.linalg.solve(A, (d * x_dot).unsqueeze(-1)).squeeze(-1)
    assert _rel(z_dot, ref) < 1e-9


def test_warm_start_under_torch_func_matches_dense():
    # Under transforms the guess is not used; the gradients are still the exact ones.
    W0, x0, t = _deq(10, 4)
    solver = il.solvers.Broyden(30, rtol=1e-12, warm_start_backward=True)

    def loss(xx):
        z = il.fixed_point(f_tanh, torch.zeros_like(xx), xx, W0, solver=solver,
                           backward=il.linear.GMRES(rtol=1e-12), batched=True)
        return (z * t).sum()

    dx = torch.func.grad(loss)(x0)
    with torch.no_grad():
        z = il.fixed_point(f_tanh, torch.zeros_like(x0), x0, W0, solver=solver, batched=True)
    assert _rel(dx, _dense_grads(z, W0, t)[1]) < 1e-9
    # vmap over two copies of the batch (folded into one solve)
    xs = torch.stack([x0, 0.5 * x0])
    dxs = torch.func.vmap(torch.func.grad(loss))(xs)
    assert _rel(dxs[0], dx) < 1e-9


def test_warm_start_structured_state_and_unbatched():
    # A tuple state (two halves of the DEQ state) and an unbatched problem: the guess is made
    # on the flat state and the gradients match the warm-start-free ones.
    W0, x0, t = _deq(12, 1)

    def f_pair(zs, x, W):
        z = torch.cat(zs, -1)
        out = f_tanh(z, x, W)
        return out[..., :5], out[..., 5:]

    grads = {}
    for warm in (False, True):
        x = x0[0].clone().requires_grad_(True)
        W = W0.clone().requires_grad_(True)
        z0 = (torch.zeros(5, dtype=F64), torch.zeros(7, dtype=F64))
        za, zb = il.fixed_point(f_pair, z0, x, W,
                                solver=il.solvers.Broyden(30, rtol=1e-12, warm_start_backward=warm),
                                backward=il.linear.GMRES(rtol=1e-12))
        grads[warm] = torch.autograd.grad((za * t[0, :5]).sum() + (zb * t[0, 5:]).sum(), (x, W))
        z = torch.cat([za, zb]).detach().unsqueeze(0)
    rW, rx = _dense_grads(z, W0, t)
    assert _rel(grads[True][0], rx[0]) < 1e-9 and _rel(grads[True][1], rW) < 1e-9
    assert _rel(grads[True][1], grads[False][1]) < 1e-9


def test_warm_start_in_nn_deq_and_with_fallback():
    W0, x0, t = _deq(16, 5)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(W0.clone())

        def forward(self, z, x):
            return f_tanh(z, x, self.W)

    for backward in (il.linear.GMRES(rtol=1e-12),
                     il.backward.Implicit(il.linear.GMRES(rtol=1e-12),
                                          fallback=il.backward.JacobianFree())):
        layer = il.nn.DEQ(Cell(), solver=il.solvers.Broyden(30, rtol=1e-12,
                                                            warm_start_backward=True),
                          backward=backward)
        with warnings.catch_warnings():
            warnings.simplefilter("error", il.ConvergenceWarning)  # no fallback taken
            z, info = layer(x0, return_info=True)
            (z * t).sum().backward()
        rW, _ = _dense_grads(z.detach(), W0, t)
        assert _rel(layer.f.W.grad, rW) < 1e-9 and bool(info.backward.converged.all())


def test_warm_start_in_two_threads():
    # The state goes through a per-thread context: a thread solving under no_grad keeps
    # nothing, while another one's backward gets its own estimate.
    import threading

    W0, x0, t = _deq(16, 4)
    results: dict[str, object] = {}

    def train():
        for _ in range(3):
            z, info, W, x = _solve(W0, x0, True, rtol=1e-12)
            dW, _ = torch.autograd.grad(z, (W, x), t)
            results.setdefault("train", []).append(_rel(dW, _dense_grads(z.detach(), W0, t)[0]))

    def infer():
        _Recorder.seen = []
        solver = _recorder(W0)
        with torch.no_grad():
            for _ in range(3):
                il.fixed_point(f_tanh, torch.zeros_like(x0), x0, W0, solver=solver, batched=True)
        results["infer"] = list(_Recorder.seen)

    threads = [threading.Thread(target=train), threading.Thread(target=infer)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert max(results["train"]) < 1e-9
    assert results["infer"] == [False, False, False]


def test_warm_start_setting_is_validated():
    with pytest.raises(TypeError, match="warm_start_backward must be True or False"):
        il.solvers.Broyden(warm_start_backward=1)
    solver = il.solvers.Broyden(10, warm_start_backward=True)
    assert eval(repr(solver), {"Broyden": il.solvers.Broyden}) == solver
    assert solver.replace(warm_start_backward=False) == il.solvers.Broyden(10)


def test_benchmark_secant_rows_are_accurate():
    from benchmarks._common import Config, Section
    from benchmarks.deq_reuse import run_secant

    section = Section("deq", "t")
    run_secant(Config(tiny=True, repeats=1, warmup=1), section)
    rows = {r["method"]: r for r in section.rows}
    assert len(rows) == 2
    for r in rows.values():
        assert r["grad_rel_err"] < 1e-8 and r["bwd_vjps"] > 0
    before, after = (rows[k] for k in sorted(rows, key=lambda k: "after" in k))
    assert after["bwd_vjps"] <= before["bwd_vjps"]
