"""Tests of the nn.Module layers: DEQ, ArgminLayer, jacobian_penalty."""

import gc
import io
import pickle

import pytest
import torch

import implicit_layers as il

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


class Cell(torch.nn.Module):
    """``f(z, x) = tanh(W z + U x + b)``, contractive for small ``W``."""

    def __init__(self, d: int, p: int, scale: float = 0.3) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(scale * torch.randn(d, d) / d**0.5)
        self.U = torch.nn.Linear(p, d)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.U(x))


class Quadratic(torch.nn.Module):
    """``L(w, x) = ½ wᵀ Q w - (P x + q)ᵀ w`` with ``Q = L Lᵀ + ½ I``."""

    def __init__(self, n: int, p: int) -> None:
        super().__init__()
        self.L = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.P = torch.nn.Parameter(torch.randn(n, p))
        self.q = torch.nn.Parameter(torch.randn(n))

    def Q(self) -> torch.Tensor:
        n = self.L.shape[0]
        return self.L @ self.L.T + 0.5 * torch.eye(n, dtype=self.L.dtype, device=self.L.device)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.P.T + self.q

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((w @ self.Q()) * w).sum(-1) - (w * self.linear(x)).sum(-1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def dense_ift_grads(cell: Cell, x: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``sum(c * z*)`` by a dense IFT: own Picard solve, materialised Jacobian."""
    z = torch.zeros(x.shape[0], cell.W.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for _ in range(300):  # contraction ≈ 0.3: converged to rounding long before
            z = cell(z, x)
    params = [cell.W, cell.U.weight, cell.U.bias]
    grads = [torch.zeros_like(t) for t in [*params, x]]
    eye = torch.eye(z.shape[1], dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        xb = x[b:b + 1].detach()
        J = torch.autograd.functional.jacobian(lambda zz, xb=xb: cell(zz[None], xb)[0], z[b])
        u = torch.linalg.solve((eye - J).T, c[b])
        out = cell(z[b:b + 1], x[b:b + 1])[0]
        for i, g in enumerate(torch.autograd.grad(out, [*params, x], u)):
            grads[i] += g
    return grads


@pytest.mark.parametrize("backward", [None, il.linear.Dense(), il.linear.BiCGStab()],
                         ids=["default-gmres", "dense", "bicgstab"])
def test_deq_gradients_match_dense_ift(device, backward):
    torch.manual_seed(0)
    cell = Cell(6, 3).to(device, F64)
    x = torch.randn(5, 3, dtype=F64, device=device, requires_grad=True)
    deq = il.nn.DEQ(cell, state_shape=(6,), backward=backward)
    z, info = deq(x, return_info=True)
    assert info.steps.shape == (5,) and bool(info.converged.all())
    c = torch.randn(5, 6, dtype=F64, device=device)
    grads = torch.autograd.grad((z * c).sum(), [cell.W, cell.U.weight, cell.U.bias, x])
    assert info.backward is not None and bool(info.backward.converged.all())
    ref = dense_ift_grads(cell, x, c)
    for g, r in zip(grads, ref, strict=True):
        assert rel(g, r) < 1e-6


def test_deq_unrolled_and_step_modes(device):
    """Unrolled through a converged solve equals the implicit gradient; JFB is ``∂f/∂θᵀ g``."""
    torch.manual_seed(1)
    cell = Cell(6, 3).to(device, F64)
    x = torch.randn(4, 3, dtype=F64, device=device)
    c = torch.randn(4, 6, dtype=F64, device=device)

    def grad_W(backward):
        deq = il.nn.DEQ(cell, state_shape=(6,), backward=backward,
                        solver=il.solvers.Picard(max_steps=200))
        return torch.autograd.grad((deq(x) * c).sum(), cell.W)[0]

    g_imp = grad_W(None)
    assert rel(grad_W(il.backward.Unrolled()), g_imp) < 1e-8
    z = il.nn.DEQ(cell, state_shape=(6,))(x).detach()
    g_jfb_ref = torch.autograd.grad((cell(z, x) * c).sum(), cell.W)[0]
    assert rel(grad_W(il.backward.JacobianFree()), g_jfb_ref) < 1e-8


def quad_reference(obj: Quadratic, x: torch.Tensor, w: torch.Tensor, lower, upper) -> torch.Tensor:
    """Closed form on the free set ``F`` found in ``w``: ``w_F = Q_FF⁻¹ (b_F - Q_FA w_A)``.

    Differentiable in the objective's parameters and ``x``; also checks the KKT conditions of
    the result, so a wrong active set cannot pass.
    """
    Q, b = obj.Q(), obj.linear(x)
    out = []
    for i in range(w.shape[0]):
        at_lo = torch.zeros_like(w[i], dtype=torch.bool) if lower is None else w[i] <= lower + 1e-8
        at_up = torch.zeros_like(w[i], dtype=torch.bool) if upper is None else w[i] >= upper - 1e-8
        act, free = at_lo | at_up, ~(at_lo | at_up)
        wa = torch.zeros_like(w[i])
        if lower is not None:
            wa = torch.where(at_lo, torch.full_like(wa, lower), wa)
        if upper is not None:
            wa = torch.where(at_up, torch.full_like(wa, upper), wa)
        wf = torch.linalg.solve(Q[free][:, free], b[i][free] - Q[free][:, act] @ wa[act])
        wi = wa.clone()
        wi[free] = wf
        grad = (Q @ wi - b[i]).detach()  # KKT: zero on F, >= 0 at lower bounds, <= 0 at upper
        assert float(grad[free].abs().sum()) < 1e-7
        assert bool((grad[at_lo] > 1e-9).all()) and bool((grad[at_up] < -1e-9).all())
        if lower is not None:
            assert bool((wi[free] > lower).all())
        if upper is not None:
            assert bool((wi[free] < upper).all())
        out.append(wi)
    return torch.stack(out)


@pytest.mark.parametrize("bounds", [(None, None), (-0.5, 0.5), (0.0, None)],
                         ids=["unconstrained", "box", "nonnegative"])
def test_argmin_layer_closed_form(device, bounds):
    torch.manual_seed(2)
    lower, upper = bounds
    obj = Quadratic(5, 3).to(device, F64)
    x = torch.randn(8, 3, dtype=F64, device=device, requires_grad=True)
    layer = il.nn.ArgminLayer(obj, w_shape=5, lower=lower, upper=upper)
    w, info = layer(x, return_info=True)
    assert bool(info.converged.all())
    ref = quad_reference(obj, x, w.detach(), lower, upper)
    assert rel(w.detach(), ref.detach()) < 1e-8
    if lower is not None:
        n_active = int(((w <= lower + 1e-8) | (w >= (upper if upper is not None else 1e9) - 1e-8)).sum())
        assert 0 < n_active < w.numel()  # the box binds for some, not all, coordinates
    c = torch.randn(8, 5, dtype=F64, device=device)
    inputs = [obj.L, obj.P, obj.q, x]
    grads = torch.autograd.grad((w * c).sum(), inputs)
    refs = torch.autograd.grad((ref * c).sum(), inputs)
    for g, r in zip(grads, refs, strict=True):
        assert rel(g, r) < 1e-6


def test_argmin_layer_learnable_bound(device):
    """A learnable upper bound gets gradient exactly on the coordinates it clips."""
    torch.manual_seed(3)
    obj = Quadratic(4, 2).to(device, F64)
    upper = torch.nn.Parameter(torch.full((4,), 0.3, dtype=F64, device=device))
    layer = il.nn.ArgminLayer(obj, w_shape=4, upper=upper)
    assert any(p is upper for p in layer.parameters())
    x = torch.randn(6, 2, dtype=F64, device=device)
    w = layer(x)
    c = torch.randn(6, 4, dtype=F64, device=device)
    (g,) = torch.autograd.grad((w * c).sum(), upper)
    # Closed form with the active set of the layer: w_A = upper_A, w_F = Q_FF⁻¹ (b_F - Q_FA upper_A),
    # differentiable in upper (moving a bound also moves the free coordinates).
    Q, b = obj.Q().detach(), obj.linear(x).detach()
    at_up = w.detach() >= 0.3 - 1e-8
    ref = []
    for i in range(6):
        act, free = at_up[i], ~at_up[i]
        wi = upper * act
        wf = torch.linalg.solve(Q[free][:, free], b[i][free] - Q[free][:, act] @ upper[act])
        ref.append(wi.index_put((free.nonzero()[:, 0],), wf))
    ref = torch.stack(ref)
    assert torch.allclose(w.detach(), ref.detach(), atol=1e-8)
    (g_ref,) = torch.autograd.grad((ref * c).sum(), upper)
    assert bool(at_up.any()) and g.abs().sum() > 0 and rel(g, g_ref) < 1e-6


def test_tiny_deq_trains(device):
    """A DEQ inside a Sequential learns; the Jacobian penalty keeps its map contractive."""
    torch.manual_seed(0)
    # Data drawn on the CPU: the same problem on every device (device RNGs differ).
    X = torch.randn(32, 4, dtype=F64).to(device)
    y = (X[:, 0] * X[:, 1] > 0).long()
    deq = il.nn.DEQ(Cell(16, 8, scale=0.3), state_shape=(16,),
                    solver=il.solvers.Anderson(max_steps=50))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), deq, torch.nn.Linear(16, 2)).to(device, F64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        u = model[0](X)
        z = deq(u)
        loss = torch.nn.functional.cross_entropy(model[2](z), y)
        penalty = il.nn.jacobian_penalty(deq.f, z.detach(), u).mean()
        opt.zero_grad()
        (loss + 0.1 * penalty).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert torch.allclose(model(X)[:, 0], model[2](deq(model[0](X)))[:, 0])


def test_state_dict_round_trip_and_pickle(device):
    torch.manual_seed(5)
    deq = il.nn.DEQ(Cell(6, 3), state_shape=6, eval_solver=il.solvers.Anderson(max_steps=20)).to(device)
    x = torch.randn(3, 3, device=device)
    z = deq(x)
    other = il.nn.DEQ(Cell(6, 3), state_shape=6).to(device)
    assert not torch.allclose(other(x), z)
    other.load_state_dict(deq.state_dict())
    assert torch.equal(other(x), z)
    assert set(deq.state_dict()) == {"f.W", "f.U.weight", "f.U.bias"}

    buf = io.BytesIO()
    torch.save(deq, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), z)
    clone = pickle.loads(pickle.dumps(deq))
    assert torch.equal(clone(x), z) and clone.eval_solver.max_steps == 20

    layer = il.nn.ArgminLayer(Quadratic(3, 2), w_shape=3, lower=torch.zeros(3)).to(device)
    xa = torch.randn(4, 2, device=device)
    assert "lower" in layer.state_dict()  # a tensor bound is a buffer
    assert torch.equal(pickle.loads(pickle.dumps(layer))(xa), layer(xa))


def test_dtype_and_device_moves(device):
    torch.manual_seed(6)
    deq = il.nn.DEQ(Cell(6, 3), state_shape=6)
    deq.double()
    x = torch.randn(2, 3, dtype=F64)
    assert deq(x).dtype == F64
    deq.to(device)
    assert deq.f.W.device.type == device.type and deq(x.to(device)).device.type == device.type
    layer = il.nn.ArgminLayer(Quadratic(3, 2), w_shape=3, upper=torch.ones(3)).to(device, F64)
    assert layer.upper.dtype == F64 and layer.upper.device.type == device.type
    assert layer(torch.randn(2, 2, dtype=F64, device=device)).dtype == F64


def test_eval_mode_uses_its_own_limits(device):
    torch.manual_seed(7)
    deq = il.nn.DEQ(
        Cell(6, 3, scale=0.9), state_shape=6,
        solver=il.solvers.Picard(max_steps=200),
        eval_solver=il.solvers.Picard(max_steps=3, on_failure="ignore"),
    ).to(device, F64)
    x = torch.randn(4, 3, dtype=F64, device=device)
    _, info = deq(x, return_info=True)
    assert bool(info.converged.all()) and int(info.steps.min()) > 3
    deq.eval()
    with torch.no_grad():
        _, info = deq(x, return_info=True)
    assert info.steps.tolist() == [3, 3, 3, 3] and not bool(info.converged.any())
    deq.train()
    assert deq.active_solver is deq.solver


def test_no_grad_builds_no_graph(device):
    torch.manual_seed(8)
    deq = il.nn.DEQ(Cell(8, 3), state_shape=8).to(device)
    layer = il.nn.ArgminLayer(Quadratic(4, 3), w_shape=4, lower=0.0).to(device)
    x = torch.randn(16, 3, device=device, requires_grad=True)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    with torch.no_grad():
        for module in (deq, layer):
            assert not module(x).requires_grad
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            deq(x)
        assert saved == []  # the DEQ records nothing (the argmin layer does, transiently, for ∇L)
        before = live_tensors()
        for _ in range(5):
            deq(x)
            layer(x)
        after = live_tensors()
    assert after == before


def test_fallback_backward_in_layer(device):
    """A failing adjoint solve falls back to the phantom gradient, with a warning."""
    torch.manual_seed(9)
    cell = Cell(6, 3, scale=0.8).to(device, F64)
    x = torch.randn(4, 3, dtype=F64, device=device)
    c = torch.randn(4, 6, dtype=F64, device=device)
    phantom = il.backward.Phantom(steps=4, damping=0.7)

    def grads(backward):
        deq = il.nn.DEQ(cell, state_shape=6, backward=backward)
        return torch.autograd.grad((deq(x) * c).sum(), [cell.W, cell.U.weight])

    weak = il.linear.GMRES(max_steps=1)  # one Krylov step cannot reach 1e-10
    with pytest.warns(il.ConvergenceWarning, match="Phantom"):
        fb = grads(il.backward.Implicit(weak, fallback=phantom))
    for g, r in zip(fb, grads(phantom), strict=True):
        assert rel(g, r) < 1e-8
    exact = grads(None)
    assert rel(fb[0], exact[0]) > 1e-3  # the fallback is a different (approximate) gradient
    with pytest.warns(il.ConvergenceWarning):
        grads(weak)  # without a fallback the failure is reported too


def test_jacobian_penalty_matches_frobenius_norm(device):
    torch.manual_seed(10)
    cell = Cell(5, 3, scale=1.0).to(device, F64)
    x = torch.randn(3, 3, dtype=F64, device=device)
    z = il.nn.DEQ(cell, state_shape=5)(x).detach()
    jac = torch.stack([
        torch.autograd.functional.jacobian(lambda zz, b=b: cell(zz[None], x[b:b + 1])[0], z[b])
        for b in range(3)
    ])
    exact = jac.pow(2).sum((1, 2))
    JJt = jac @ jac.mT
    n = 4000
    for probe in ("gaussian", "rademacher"):
        gen = torch.Generator(device=device).manual_seed(0)
        est = il.nn.jacobian_penalty(cell, z, x, n_samples=n, probe=probe, generator=gen)
        # Exact variance of one probe's estimate vᵀ J Jᵀ v.
        var = 2 * JJt.pow(2).sum((1, 2))
        if probe == "rademacher":
            var = var - 2 * JJt.diagonal(dim1=1, dim2=2).pow(2).sum(-1)
        assert bool(((est.detach() - exact).abs() <= 5 * (var / n).sqrt()).all())

    # Differentiable: with the same probes, its gradient equals that of the dense formula.
    gen = torch.Generator(device=device).manual_seed(1)
    est = il.nn.jacobian_penalty(cell, z, x, n_samples=3, generator=gen).sum()
    (g,) = torch.autograd.grad(est, cell.W)
    gen = torch.Generator(device=device).manual_seed(1)
    v = torch.randn((3, *z.shape), dtype=F64, device=device, generator=gen)

    def dense_estimate(W):
        pre = z @ W.T + cell.U(x)
        J = (1 - torch.tanh(pre) ** 2).unsqueeze(-1) * W  # J[b] = diag(tanh') W
        return torch.einsum("kbi,bij->kbj", v, J).pow(2).sum() / 3

    (g_ref,) = torch.autograd.grad(dense_estimate(cell.W), cell.W)
    assert rel(g, g_ref) < 1e-10
    a = il.nn.jacobian_penalty(cell, z, x, normalize=True, generator=gen.manual_seed(2))
    b = il.nn.jacobian_penalty(cell, z, x, generator=gen.manual_seed(2))
    assert torch.allclose(5 * a, b)


def saved_bytes_of_step(backward, steps: int, device) -> tuple[int, int]:
    torch.manual_seed(11)
    cell = Cell(32, 8, scale=0.95).to(device, F64)
    # rtol = 0 forces exactly `steps` iterations, so the two runs differ only in that.
    solver = il.solvers.Picard(max_steps=steps, rtol=0.0, on_failure="ignore")
    deq = il.nn.DEQ(cell, state_shape=32, solver=solver, backward=backward)
    x = torch.randn(16, 8, dtype=F64, device=device)
    with il.memory.SavedTensorBytes() as counter:
        z, info = deq(x, return_info=True)
        loss = z.pow(2).sum()
    loss.backward()
    return counter.total, int(info.steps.max())


def test_memory_independent_of_forward_steps_for_implicit(device):
    implicit = il.backward.Implicit(il.linear.GMRES(on_failure="ignore"))
    imp10, s10 = saved_bytes_of_step(implicit, 10, device)
    imp100, s100 = saved_bytes_of_step(implicit, 100, device)
    assert (s10, s100) == (10, 100)
    assert imp10 == imp100 > 0
    unr10, _ = saved_bytes_of_step(il.backward.Unrolled(), 10, device)
    unr100, _ = saved_bytes_of_step(il.backward.Unrolled(), 100, device)
    assert unr100 > 5 * unr10 and unr10 > imp10


def test_user_errors_are_explained():
    with pytest.raises(TypeError, match="nn.Module or a function"):
        il.nn.DEQ(torch.eye(2))  # a function is accepted since the DEQ toolkit; a tensor is not
    with pytest.raises(ValueError, match="solver=LBFGS"):
        il.nn.DEQ(Cell(2, 2), solver=il.solvers.LBFGS())
    with pytest.raises(ValueError, match="solver=Anderson"):
        il.nn.ArgminLayer(Quadratic(2, 2), solver=il.solvers.Anderson())  # unconstrained
    with pytest.raises(TypeError, match="backward"):
        il.nn.DEQ(Cell(2, 2), backward="implicit")
    with pytest.raises(ValueError, match="w_shape"):
        il.nn.ArgminLayer(Quadratic(2, 2))(torch.randn(3, 2))
    with pytest.raises(ValueError, match="lower must be < upper"):
        il.nn.ArgminLayer(Quadratic(2, 2), lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="batch size"):
        il.nn.DEQ(Cell(2, 2), state_shape=2)(torch.randn(3, 2), z0=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="one value per sample"):
        il.nn.ArgminLayer(lambda w, x: w.sum(), w_shape=2, lower=0.0)(torch.randn(3, 2))


def load_example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deq_digits_example_tiny(capsys):
    result = load_example("deq_digits").main(["--tiny", "--backward", "phantom"])
    assert result["train_loss_last_epoch"] < result["train_loss_first_epoch"]
    assert result["mean_backward_steps"] is None and result["mean_forward_steps_train"] > 1


def test_optnet_example_tiny(capsys):
    result = load_example("optnet_style").main(["--tiny"])
    assert 0.2 < result["fraction_on_box"] < 0.8
    # Only the box-constrained layer can represent box-QP targets.
    assert result["box QP"]["test_mse"] < 0.5 * result["unconstrained"]["test_mse"]
    assert result["box QP"]["test_mse"] < 0.5 * result["clipped linear"]["test_mse"]


def test_deq_with_integer_input_and_warm_start(device):
    """Token ids as input (the state takes the parameters' dtype); z0 warm start."""

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.W = torch.nn.Linear(6, 6, bias=False)

        def forward(self, z, tokens):
            return torch.tanh(0.5 * self.W(z) + self.emb(tokens))

    torch.manual_seed(12)
    deq = il.nn.DEQ(Embed(), state_shape=6).to(device, F64)
    tokens = torch.tensor([1, 4, 7], device=device)
    z, info = deq(tokens, return_info=True)
    assert z.dtype == F64 and z.shape == (3, 6)
    z2, info2 = deq(tokens, z0=z.detach(), return_info=True)
    assert int(info2.steps.max()) <= 1 < int(info.steps.min())  # warm start: already converged
    torch.testing.assert_close(z2, z, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="state_shape"):
        il.nn.DEQ(Embed())(tokens)
