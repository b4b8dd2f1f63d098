"""il.nn.DEQ's Lipschitz bound on the layers the state passes through (``lipschitz=``).

References are independent of the bound's code: ``torch.linalg.matrix_norm(ord=2)`` for the
spectral norm, the same map with the weight rescaled by its exact spectral norm and solved
without a bound, central finite differences in float64, and the functional ``il.fixed_point``
for the opt-out.
"""

import pytest
import torch

import implicit_layers as il

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


class Cell(torch.nn.Module):
    """``f(z, x) = tanh(W z + U x)``; ``W`` with singular values ``w_scale · (1, 1/2, 1/4, ...)``
    (a clear gap, so that power iteration converges fast), ``U`` of spectral norm ``u_scale``."""

    def __init__(self, d: int = 6, p: int = 4, w_scale: float = 2.0, u_scale: float = 3.0,
                 dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.W = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        self.U = torch.nn.Linear(p, d, dtype=dtype)
        with torch.no_grad():
            q1 = torch.linalg.qr(torch.randn(d, d, dtype=dtype))[0]
            q2 = torch.linalg.qr(torch.randn(d, d, dtype=dtype))[0]
            s = w_scale * 0.5 ** torch.arange(d, dtype=dtype)
            self.W.weight.copy_(q1 @ torch.diag(s) @ q2.T)
            self.U.weight.mul_(u_scale / torch.linalg.matrix_norm(self.U.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


def tight():
    return il.solvers.Anderson(rtol=1e-12, max_steps=200)


def rescaled(cell: Cell, bound: float) -> Cell:
    """A copy of ``cell`` whose ``W`` is scaled to spectral norm ``min(σ, bound)`` (exact σ)."""
    twin = Cell(cell.W.in_features, cell.U.in_features)
    twin.load_state_dict(cell.state_dict())
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(cell.W.weight, ord=2)
        twin.W.weight.mul_(bound / torch.clamp(sigma, min=bound))
    return twin


def test_default_bounds_state_layers_only_and_keeps_the_module():
    torch.manual_seed(0)
    cell = Cell()
    keys = set(cell.state_dict())
    raw = cell.W.weight.detach().clone()
    deq = il.nn.DEQ(cell, state_shape=6)
    assert deq.lipschitz == 0.9
    x = torch.randn(5, 4, dtype=F64)
    opt = torch.optim.SGD(cell.parameters(), lr=0.05)
    for _ in range(3):  # training moves the weights; the bound follows them
        opt.zero_grad()
        deq(x).square().sum().backward()
        opt.step()
    weights = deq._bound.weights(cell, advance=False)
    assert set(weights) == {"W.weight"}  # U sees only x: left free
    norm = torch.linalg.matrix_norm(weights["W.weight"].detach(), ord=2)
    # one power-iteration step per training solve tracks the moving weight to within 1 %
    assert 0.9 * (1 - 1e-2) <= norm <= 0.9 * (1 + 1e-2), norm
    # the module is untouched: its own keys, its raw weight (moved only by the optimiser)
    assert set(cell.state_dict()) == keys and set(deq.state_dict()) == {f"f.{k}" for k in keys}
    assert not torch.equal(cell.W.weight.detach(), raw)
    assert torch.linalg.matrix_norm(cell.W.weight.detach(), ord=2) > 1.5


@pytest.mark.parametrize("bound", [0.9, 0.5])
def test_bounded_fixed_point_and_gradient_match_rescaled_map(bound):
    torch.manual_seed(1)
    cell = Cell()
    deq = il.nn.DEQ(cell, state_shape=6, lipschitz=bound, solver=tight()).eval()
    x = torch.randn(4, 4, dtype=F64)
    c = torch.randn(4, 6, dtype=F64)
    z = deq(x)
    twin = rescaled(cell, bound)
    ref = il.nn.DEQ(twin, state_shape=6, lipschitz=None, solver=tight())(x)
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-10)
    with torch.no_grad():  # the map the layer solves contracts: residual of the rescaled map
        torch.testing.assert_close(twin(z, x), z, rtol=0, atol=1e-10)

    # d/dW of sum(c * z*): the bound's own derivative included, against central differences
    # of the rescaled map (exact σ) solved without a bound
    (grad,) = torch.autograd.grad((c * deq(x)).sum(), cell.W.weight)

    def loss(weight):
        probe = rescaled(cell, bound)
        with torch.no_grad():
            probe.W.weight.copy_(weight * bound / torch.clamp(torch.linalg.matrix_norm(weight, ord=2),
                                                               min=bound))
            zz = il.nn.DEQ(probe, state_shape=6, lipschitz=None, solver=tight())(x)
        return (c * zz).sum()

    W0, h = cell.W.weight.detach(), 1e-6
    fd = torch.zeros_like(W0)
    for i in range(6):
        for j in range(6):
            e = torch.zeros_like(W0)
            e[i, j] = h
            fd[i, j] = (loss(W0 + e) - loss(W0 - e)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


def test_opt_out_is_the_exact_map_bit_for_bit():
    torch.manual_seed(2)
    cell = Cell(dtype=torch.float32)
    x = torch.randn(5, 4)
    deq = il.nn.DEQ(cell, state_shape=6, lipschitz=None)
    z, info = deq(x, return_info=True)
    (g,) = torch.autograd.grad(z.square().sum(), cell.W.weight)
    z0 = torch.zeros(5, 6)
    ref, ref_info = il.fixed_point(cell, z0, x, solver=il.solvers.Adaptive(max_steps=50), batched=True,
                                   return_info=True)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), cell.W.weight)
    assert torch.equal(z, ref) and torch.equal(g, g_ref)
    assert torch.equal(info.steps, ref_info.steps)


def test_loading_weights_restarts_the_estimate():
    torch.manual_seed(6)
    x = torch.randn(3, 4, dtype=F64)
    used = il.nn.DEQ(Cell(), state_shape=6, solver=tight()).eval()
    used(x)  # estimates for its first weights
    other = Cell()
    used.load_state_dict({f"f.{k}": v for k, v in other.state_dict().items()})
    fresh = il.nn.DEQ(other, state_shape=6, solver=tight()).eval()
    torch.testing.assert_close(used(x), fresh(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(used(x), il.nn.DEQ(rescaled(other, 0.9), state_shape=6, lipschitz=None,
                                                  solver=tight())(x), rtol=0, atol=1e-10)


def test_contractive_weights_are_unchanged_and_apply_norm_is_respected():
    torch.manual_seed(3)
    x = torch.randn(3, 4, dtype=F64)
    small = Cell(w_scale=0.5)
    z = il.nn.DEQ(small, state_shape=6, solver=tight())(x)
    (g,) = torch.autograd.grad(z.sum(), small.W.weight)
    ref = il.nn.DEQ(small, state_shape=6, lipschitz=None, solver=tight())(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), small.W.weight)
    assert torch.equal(z, ref) and torch.equal(g, g_ref)  # inside the bound: the map as it is
    # a map normalised by apply_norm keeps the user's bound (0.5, not the default 0.9)
    normed = il.nn.apply_norm(Cell(), "spectral", bound=0.5)
    deq = il.nn.DEQ(normed, state_shape=6, solver=tight()).eval()
    deq(x)
    assert deq._bound.names == []
    with torch.no_grad():
        assert torch.linalg.matrix_norm(normed.W.weight, ord=2) <= 0.5 * (1 + 1e-6)


def test_bound_under_inference_mode_double_backward_and_torch_func():
    torch.manual_seed(4)
    cell = Cell()
    deq = il.nn.DEQ(cell, state_shape=6, solver=tight()).eval()
    x = torch.randn(3, 4, dtype=F64)
    with torch.inference_mode():  # the first call finds the state layers in inference mode too
        z_inf = deq(x)
    assert deq._bound.names == ["W"]
    torch.testing.assert_close(z_inf, deq(x).detach(), rtol=0, atol=0)
    # second derivative in x: double backward against torch.func.jacrev of torch.func.grad
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(deq(xr).square().sum(), xr, create_graph=True)
    (hx,) = torch.autograd.grad(gx.sum(), xr)
    g_func = torch.func.grad(lambda x: deq(x).square().sum())(x)
    torch.testing.assert_close(gx.detach(), g_func, rtol=1e-9, atol=1e-11)
    h_ref = torch.func.jacrev(torch.func.grad(lambda x: deq(x).square().sum()))(x)
    torch.testing.assert_close(hx, h_ref.sum(dim=(0, 1)), rtol=1e-8, atol=1e-10)


def test_first_call_under_torch_func_vmap_and_grad():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, dtype=F64)
    cell = Cell()
    eager = il.nn.DEQ(cell, state_shape=6, solver=tight()).eval()
    ref = torch.stack([eager(xi) for xi in x])
    fresh = il.nn.DEQ(cell, state_shape=6, solver=tight()).eval()  # first call inside vmap
    torch.testing.assert_close(torch.func.vmap(fresh)(x), ref, rtol=0, atol=1e-12)
    fresh_grad = il.nn.DEQ(cell, state_shape=6, solver=tight()).eval()
    g = torch.func.grad(lambda xi: fresh_grad(xi).square().sum())(x[0])
    xr = x[0].clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(eager(xr).square().sum(), xr)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_lipschitz_errors_name_the_argument():
    for bad in (0, -1.0, True, "big"):
        with pytest.raises(ValueError, match="lipschitz must be"):
            il.nn.DEQ(Cell(), lipschitz=bad)
    with pytest.raises(ValueError, match="lipschitz=0.9 bounds the layers of an nn.Module"):
        il.nn.DEQ(lambda z, x: torch.tanh(z + x), lipschitz=0.9)
    with pytest.raises(ValueError, match="compiled_solve=True"):
        il.nn.DEQ(Cell(), lipschitz=0.9, compiled_solve=True)
    assert il.nn.DEQ(lambda z, x: torch.tanh(z + x)).lipschitz is None
    assert il.nn.DEQ(Cell(), compiled_solve=True).lipschitz is None
