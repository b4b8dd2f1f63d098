"""The DEQ toolkit of il.nn: function maps, normalisation, variational dropout, trajectory states.

References are independent of the library: dense implicit-function-theorem gradients with a
materialised Jacobian (``torch.linalg.solve``), central finite differences in float64,
``torch.linalg.matrix_norm(ord=2)``, and plain Python loops of the map.
"""

import pytest
import torch

import implicit_layers as il

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


class Cell(torch.nn.Module):
    """``f(z, x) = tanh(W z + U x)`` with ``W``, ``U`` linear layers and optional dropout."""

    def __init__(self, d: int = 6, p: int = 4, scale: float = 0.4, dropout: float = 0.0) -> None:
        super().__init__()
        self.W = torch.nn.Linear(d, d, bias=False)
        self.U = torch.nn.Linear(p, d)
        self.drop = il.nn.VariationalDropout(dropout)
        with torch.no_grad():
            self.W.weight.copy_(scale * torch.linalg.qr(torch.randn(d, d))[0])

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.drop(self.W(z)) + self.U(x))


def picard(f, z, steps=200):
    with torch.no_grad():
        for _ in range(steps):
            z = f(z)
    return z


def dense_ift(f, z, c, params):
    """Gradients of ``sum(c * z_out)`` for ``z_out = z`` carrying the implicit gradient of
    ``z = f(z)`` at ``z`` (per sample: ``u = (I - J)⁻ᵀ c``, then ``(∂f/∂θ)ᵀ u``)."""
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    us = []
    for b in range(z.shape[0]):
        def fb(zz, b=b):
            full = z.clone()
            full[b] = zz
            return f(full)[b]
        J = torch.autograd.functional.jacobian(fb, z[b])
        us.append(torch.linalg.solve((eye - J).T, c[b]))
    return torch.autograd.grad(f(z), params, torch.stack(us))


# -- functions as maps ----------------------------------------------------------------------
def test_function_map_equals_module_form_and_dense_ift():
    torch.manual_seed(0)
    cell = Cell().double()
    x = torch.randn(5, 4, dtype=F64)
    c = torch.randn(5, 6, dtype=F64)
    params = list(cell.parameters())
    solver = il.solvers.Anderson(rtol=1e-12, max_steps=100)
    by_module = il.nn.DEQ(cell, solver=solver, state_shape=6)
    by_function = il.nn.DEQ(lambda z, x: cell(z, x), solver=solver, state_shape=6)
    assert list(by_function.parameters()) == []  # the function's parameters stay the user's
    g_module = torch.autograd.grad((c * by_module(x)).sum(), params)
    g_function = torch.autograd.grad((c * by_function(x)).sum(), params)
    z = picard(lambda z: cell(z, x), torch.zeros(5, 6, dtype=F64))
    reference = dense_ift(lambda z: cell(z, x), z, c, params)
    for a, b, r in zip(g_module, g_function, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, r, rtol=1e-8, atol=1e-10)


def test_function_map_with_extra_inputs_matches_finite_differences():
    torch.manual_seed(1)
    W = 0.5 * torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    x = torch.randn(3, 4, dtype=F64)
    shift = torch.randn(4, dtype=F64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    deq = il.nn.DEQ(lambda z, x, s, t: torch.tanh(t * z @ W.T + x + s),
                    solver=il.solvers.Anderson(rtol=1e-13, max_steps=100))

    def loss(s, t):
        return (deq(x, args=(s, t)) ** 2).sum()

    gs, gt = torch.autograd.grad(loss(shift, scale), [shift, scale])
    eps = 1e-6
    with torch.no_grad():
        fd_t = (loss(shift, scale + eps) - loss(shift, scale - eps)) / (2 * eps)
        fd_s = torch.stack([(loss(shift + eps * e, scale) - loss(shift - eps * e, scale)) / (2 * eps)
                            for e in torch.eye(4, dtype=F64)])
    torch.testing.assert_close(gt, fd_t, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gs, fd_s, rtol=1e-6, atol=1e-8)


def test_function_map_double_backward_equals_module_form():
    torch.manual_seed(2)
    cell = Cell().double()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    solver = il.solvers.Anderson(rtol=1e-12, max_steps=100)
    out = []
    for deq in (il.nn.DEQ(cell, solver=solver, state_shape=6),
                il.nn.DEQ(lambda z, x: cell(z, x), solver=solver, state_shape=6)):
        (gx,) = torch.autograd.grad((deq(x) ** 2).sum(), x, create_graph=True)
        out.append(torch.autograd.grad(gx.pow(2).sum(), cell.W.weight)[0])
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-11)


# -- normalisation --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_spectral_norm_bound_matches_matrix_norm(dtype):
    torch.manual_seed(3)
    big = torch.nn.Linear(7, 5).to(dtype)
    small = torch.nn.Linear(5, 5).to(dtype)
    conv = torch.nn.Conv2d(3, 4, 3).to(dtype)
    with torch.no_grad():
        big.weight.mul_(10)
        conv.weight.mul_(10)
        small.weight.copy_(0.3 * torch.linalg.qr(torch.randn(5, 5, dtype=dtype))[0])
    before = small.weight.detach().clone()
    for layer in (big, small, conv):
        il.nn.apply_norm(layer, "spectral", bound=0.8, n_power_iterations=3)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for _ in range(20):  # the power iteration converges over resets
        for layer in (big, conv):
            il.nn.reset_norm(layer)
    assert abs(float(torch.linalg.matrix_norm(big.weight.detach(), ord=2)) - 0.8) < tol
    conv_matrix = conv.weight.detach().flatten(1)
    assert abs(float(torch.linalg.matrix_norm(conv_matrix, ord=2)) - 0.8) < tol
    torch.testing.assert_close(small.weight.detach(), before)  # inside the bound: unchanged
    # The raw weight is still what the optimiser trains.
    big.weight.sum().backward()
    assert big.parametrizations.weight.original.grad is not None


def test_weight_norm_rows_have_learned_magnitude():
    torch.manual_seed(4)
    lin = torch.nn.Linear(6, 3)
    original = lin.weight.detach().clone()
    il.nn.apply_norm(lin, "weight")
    torch.testing.assert_close(lin.weight.detach(), original)  # g starts at the row norms
    g = lin.parametrizations.weight.original0
    with torch.no_grad():
        g.mul_(2.0)
    torch.testing.assert_close(lin.weight.detach().norm(dim=1), 2 * original.norm(dim=1))


@pytest.mark.parametrize("kind", ["spectral", "weight"])
def test_normalised_weight_computed_once_per_solve(kind):
    torch.manual_seed(5)
    cell = Cell(scale=0.9).double()
    il.nn.apply_norm(cell, kind, bound=0.7)
    calls = []
    for layer in (cell.W, cell.U):
        layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    deq = il.nn.DEQ(cell, solver=il.solvers.Picard(rtol=1e-10, max_steps=200), state_shape=6)
    x = torch.randn(4, 4, dtype=F64)
    z, info = deq(x, return_info=True)
    assert int(info.steps.max()) > 10
    assert len(calls) == 2  # once per layer, not once per iteration
    z.sum().backward()
    assert len(calls) == 2 and all(p.grad is not None for p in cell.W.parameters())


def test_spectral_norm_deq_gradient_matches_unrolled_reference():
    torch.manual_seed(6)
    cell = Cell(scale=3.0).double()  # ‖W‖ = 3: the bound is what makes the map contractive
    il.nn.apply_norm(cell, "spectral", bound=0.6)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=100), state_shape=6)
    x = torch.randn(4, 4, dtype=F64)
    c = torch.randn(4, 6, dtype=F64)
    raw = [cell.W.parametrizations.weight.original, cell.U.parametrizations.weight.original]
    deq.train()
    u_before = cell.W.parametrizations.weight[0].u.clone()
    grads = torch.autograd.grad((c * deq(x)).sum(), raw)
    assert not torch.equal(u_before, cell.W.parametrizations.weight[0].u)  # advanced once
    deq.eval()  # the power iteration stays where it is: the reference sees the same map
    torch.testing.assert_close(torch.autograd.grad((c * deq(x)).sum(), raw), grads)
    z = torch.zeros(4, 6, dtype=F64)
    for _ in range(120):  # contraction 0.6: the unrolled gradient is converged far below 1e-12
        z = cell(z, x)
    reference = torch.autograd.grad((c * z).sum(), raw)
    for a, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_remove_norm_keeps_normalised_weight():
    lin = torch.nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.mul_(5)
    il.nn.apply_norm(lin, "spectral", bound=0.5)
    normalised = lin.weight.detach().clone()
    il.nn.remove_norm(lin)
    assert isinstance(lin.weight, torch.nn.Parameter)
    torch.testing.assert_close(lin.weight.detach(), normalised)


# -- variational dropout --------------------------------------------------------------------
def test_variational_dropout_one_mask_per_solve_and_in_backward():
    torch.manual_seed(7)
    cell = Cell(d=40, dropout=0.3).double()
    masks = []
    cell.drop.register_forward_hook(lambda m, i, o: masks.append(m.mask))
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-12, max_steps=100), state_shape=40)
    x = torch.randn(3, 4, dtype=F64)
    c = torch.randn(3, 40, dtype=F64)
    params = list(cell.parameters())
    grads = torch.autograd.grad((c * deq(x)).sum(), params)
    assert len(masks) > 5 and all(m is masks[0] for m in masks)
    mask = masks[0]
    dropped = float((mask == 0).double().mean())
    assert 0.1 < dropped < 0.5 and torch.all((mask == 0) | (mask == 1 / 0.7))
    # Reference: the same map with that mask written in, dense IFT.
    def f(z):
        return torch.tanh(cell.W(z) * mask + cell.U(x))
    z = picard(f, torch.zeros(3, 40, dtype=F64))
    for a, r in zip(grads, dense_ift(f, z, c, params), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)
    deq(x)
    assert masks[-1] is not mask  # the next forward draws a new mask
    deq.eval()
    torch.testing.assert_close(cell.drop(z), z)


def test_variational_dropout_shared_dims_and_errors():
    drop = il.nn.VariationalDropout(0.5, shared_dims=(2, 3))
    y = drop(torch.ones(2, 3, 4, 5))
    assert drop.mask is not None and drop.mask.shape == (2, 3, 1, 1)
    assert torch.all(y == y[..., :1, :1])
    with pytest.raises(ValueError, match="reset_dropout"):
        drop(torch.ones(3, 3, 4, 5))
    il.nn.reset_dropout(drop)
    assert drop(torch.ones(3, 3, 4, 5)).shape == (3, 3, 4, 5)
    with pytest.raises(ValueError, match="p must be"):
        il.nn.VariationalDropout(1.0)
    with pytest.raises(ValueError, match="shared_dims"):
        il.nn.VariationalDropout(0.1, shared_dims=(0,))


# -- trajectory sampling --------------------------------------------------------------------
def test_trajectory_states_are_picard_iterates_with_implicit_gradients():
    torch.manual_seed(8)
    cell = Cell().double()
    x = torch.randn(3, 4, dtype=F64)
    params = list(cell.parameters())
    deq = il.nn.DEQ(cell, solver=il.solvers.Picard(rtol=1e-12, max_steps=200), state_shape=6,
                    backward=il.linear.GMRES(rtol=1e-12))
    states = deq(x, states=[2, 5, 10_000])
    z = torch.zeros(3, 6, dtype=F64)
    iterates = []
    with torch.no_grad():
        for _ in range(5):
            z = cell(z, x)
            iterates.append(z)
    torch.testing.assert_close(states[0], iterates[1], rtol=0, atol=0)
    torch.testing.assert_close(states[1], iterates[4], rtol=0, atol=0)
    torch.testing.assert_close(states[2], deq(x), rtol=0, atol=0)
    cs = [torch.randn(3, 6, dtype=F64) for _ in states]
    correction = sum((c * s).sum() for c, s in zip(cs, states, strict=True))
    total = torch.autograd.grad(correction, params, retain_graph=True)
    per_state = [torch.autograd.grad((c * s).sum(), params, retain_graph=True)
                 for c, s in zip(cs, states, strict=True)]
    for i, g in enumerate(total):
        torch.testing.assert_close(g, sum(p[i] for p in per_state), rtol=1e-12, atol=1e-13)
    # Each state's gradient is the implicit one taken at that state (dense reference).
    for s, c, g in zip(states, cs, per_state, strict=True):
        reference = dense_ift(lambda z: cell(z, x), s.detach(), c, params)
        for a, r in zip(g, reference, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)


def test_trajectory_n_states_and_step_backward():
    torch.manual_seed(9)
    cell = Cell()
    x = torch.randn(3, 4)
    deq = il.nn.DEQ(cell, solver=il.solvers.Picard(max_steps=100), state_shape=6,
                    backward=il.backward.JacobianFree())
    states, info = deq(x, states=3, return_info=True)
    assert len(states) == 3 and all(s.requires_grad for s in states)
    torch.testing.assert_close(states[-1], deq(x))
    # JacobianFree at a state z_k returns f(z_k) with the gradient of that one step.
    residual = [float((s - cell(s, x)).detach().norm()) for s in states]
    assert residual[0] > residual[-1]
    with pytest.raises(ValueError, match="states must be"):
        deq(x, states=0)
    with pytest.raises(ValueError, match="states must be"):
        deq(x, states=[0, 3])
    unrolled = il.nn.DEQ(cell, solver=il.solvers.Picard(max_steps=100), state_shape=6,
                         backward=il.backward.Unrolled())
    with pytest.raises(ValueError, match="Unrolled"):
        unrolled(x, states=2)


def test_toolkit_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind must be"):
        il.nn.apply_norm(torch.nn.Linear(2, 2), "batch")
    with pytest.raises(ValueError, match="bound must be"):
        il.nn.apply_norm(torch.nn.Linear(2, 2), bound=-1.0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        il.nn.apply_norm(torch.nn.ReLU())
    with pytest.raises(TypeError, match="module must be"):
        il.nn.apply_norm(lambda z: z)
    with pytest.raises(TypeError, match="f must be"):
        il.nn.DEQ(3)


def test_toolkit_under_inference_mode_state_dict_and_empty_batch():
    torch.manual_seed(10)
    cell = il.nn.apply_norm(Cell(dropout=0.2, scale=2.0), "spectral", bound=0.8)
    deq = il.nn.DEQ(cell, state_shape=6)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        z_train = deq(x)  # training mode: a power-iteration step and a mask, no graph
        deq.eval()
        z_eval = deq(x)
    assert not z_train.requires_grad and not z_eval.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(z_eval, cell(z_eval, x), rtol=0, atol=1e-4)  # dropout off
    twin = il.nn.DEQ(il.nn.apply_norm(Cell(dropout=0.2), "spectral", bound=0.8), state_shape=6)
    twin.load_state_dict(deq.state_dict())  # raw weights and power-iteration vectors
    twin.eval()
    torch.testing.assert_close(twin(x), deq(x), rtol=0, atol=0)
    deq.train()
    states = deq(torch.randn(0, 4), states=2)
    assert len(states) == 1 and states[0].shape == (0, 6)


def test_function_map_extra_input_under_torch_func_grad():
    torch.manual_seed(11)
    W = 0.4 * torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    deq = il.nn.DEQ(lambda z, x, W: torch.tanh(z @ W.T + x),
                    solver=il.solvers.Anderson(rtol=1e-12, max_steps=100))
    x = torch.randn(3, 4, dtype=F64)
    g = torch.func.grad(lambda W: (deq(x, args=(W,)) ** 2).sum())(W)
    Wr = W.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((deq(x, args=(Wr,)) ** 2).sum(), Wr)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_trajectory_states_of_a_function_map_with_extra_inputs():
    torch.manual_seed(12)
    W = (0.5 * torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]).requires_grad_(True)
    x = torch.randn(3, 4, dtype=F64)
    scale = torch.tensor(0.8, dtype=F64, requires_grad=True)
    deq = il.nn.DEQ(lambda z, x, s: torch.tanh(s * z @ W.T + x),
                    solver=il.solvers.Picard(rtol=1e-12, max_steps=200))
    states = deq(x, args=(scale,), states=[3, 10_000])
    z = torch.zeros(3, 4, dtype=F64)
    with torch.no_grad():
        for _ in range(3):
            z = torch.tanh(scale * z @ W.T + x)
    torch.testing.assert_close(states[0], z, rtol=0, atol=0)
    c = torch.randn(3, 4, dtype=F64)
    gW, gs = torch.autograd.grad((c * states[0]).sum(), [W, scale])

    def f(zz, W=W, s=scale):
        return torch.tanh(s * zz @ W.T + x)

    rW, rs = dense_ift(f, z, c, [W, scale])
    torch.testing.assert_close(gW, rW, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gs, rs, rtol=1e-8, atol=1e-10)
