"""``il.nn.DEQ(..., compiled_solve=True)``: the forward and adjoint loops as torch control flow.

References: the eager path with the same iteration (``Picard`` + ``Neumann``), a dense
implicit-function-theorem gradient (``torch.linalg.solve`` on per-sample Jacobians), and the
compiled graph against the eager run of the same layer.
"""

from __future__ import annotations

import gc

import pytest
import torch

import implicit_layers as il


@pytest.fixture(autouse=True)
def _seed_and_release_compiled_state():
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    # The traced graphs' fake tensors sit in reference cycles freed only by a second
    # collection (the first runs finalizers); collect them now, so that later tests counting
    # live tensors (test_nn's no-graph test) do not see them disappear mid-test.
    for _ in range(3):
        gc.collect()


class Cell(torch.nn.Module):
    """``tanh(W z + x) + c`` with ``‖W‖₂ = scale`` and a buffer ``c`` (read by the map)."""

    def __init__(self, n: int, scale: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(n, n)
        with torch.no_grad():
            w = torch.randn(n, n, generator=gen)
            self.lin.weight.copy_(scale * w / torch.linalg.matrix_norm(w, 2))
            self.lin.bias.copy_(0.1 * torch.randn(n, generator=gen))
        self.register_buffer("c", 0.05 * torch.ones(n))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x) + self.c


def _layers(cell: torch.nn.Module, damping: float = 1.0, **neumann) -> tuple[il.nn.DEQ, il.nn.DEQ]:
    """The compiled-solve layer and the eager layer with the same iteration."""
    solver = il.solvers.Picard(damping, max_steps=200)
    backward = il.linear.Neumann(200, **neumann)
    return (
        il.nn.DEQ(cell, solver=solver, backward=backward, compiled_solve=True),
        il.nn.DEQ(cell, solver=solver, backward=backward),
    )


def _run(layer: torch.nn.Module, cell: torch.nn.Module, x: torch.Tensor):
    """Solution, info and the gradients of a fixed loss w.r.t. x and the cell's parameters."""
    cell.zero_grad()
    x = x.detach().requires_grad_()
    z, info = layer(x, return_info=True)
    weights = torch.linspace(-1.0, 1.0, z.shape[-1], dtype=z.dtype)
    (z * weights).square().sum().backward()
    return z.detach(), info, [x.grad] + [p.grad.clone() for p in cell.parameters()]


@pytest.mark.parametrize("damping", [1.0, 0.7])
def test_equals_eager_picard_and_neumann_in_float64(damping):
    cell = Cell(12).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    compiled, eager = _layers(cell, damping)
    z, info, grads = _run(compiled, cell, x)
    z_ref, info_ref, grads_ref = _run(eager, cell, x)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-14)
    assert torch.equal(info.steps, info_ref.steps)
    assert torch.equal(info.converged, info_ref.converged) and bool(info.converged.all())
    torch.testing.assert_close(info.residual, info_ref.residual, rtol=1e-6, atol=1e-18)
    torch.testing.assert_close(info.tolerance, info_ref.tolerance, rtol=1e-12, atol=0)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.equal(info.backward.steps, info_ref.backward.steps)
    assert bool(info.backward.converged.all())


def test_gradients_equal_dense_implicit_function_theorem():
    n, B = 6, 3
    cell = Cell(n, scale=0.8).double()
    x = torch.randn(B, n, dtype=torch.float64)
    compiled, _ = _layers(cell)
    z, _, grads = _run(compiled, cell, x)
    weights = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    g = 2 * (z * weights) * weights  # dℓ/dz*
    for b in range(B):
        zb, xb = z[b], x[b]
        J = torch.func.jacrev(cell, argnums=0)(zb, xb)
        Jx = torch.func.jacrev(cell, argnums=1)(zb, xb)
        u = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - J).T, g[b])
        # both solves stop at rtol 1e-10 of their right-hand sides (gradients are O(1))
        torch.testing.assert_close(grads[0][b], Jx.T @ u, rtol=1e-8, atol=1e-8)
    # the bias gradient: Σ_b (∂f/∂bias)ᵀ u_b, with ∂f/∂bias = diag(1 - tanh²)
    expected = torch.zeros(n, dtype=torch.float64)
    for b in range(B):
        J = torch.func.jacrev(lambda v, b=b: cell(v, x[b]))(z[b])
        u = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - J).T, g[b])
        expected += (1 - (z[b] - cell.c).square()) * u
    torch.testing.assert_close(grads[2], expected, rtol=1e-8, atol=1e-8)


def test_float32_and_batches_of_different_sizes():
    cell = Cell(10)
    compiled, eager = _layers(cell)
    x_all = torch.randn(7, 10)
    for B in (1, 3, 7):
        z, info, grads = _run(compiled, cell, x_all[:B])
        z_ref, info_ref, grads_ref = _run(eager, cell, x_all[:B])
        assert z.dtype == torch.float32 and info.steps.shape == (B,)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
        assert torch.equal(info.steps, info_ref.steps)
        assert bool(info.converged.all())
        for g, r in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # per-sample: a sample's solution does not depend on the rest of its batch
    z_one = compiled(x_all[2:3]).detach()
    torch.testing.assert_close(compiled(x_all).detach()[2:3], z_one, rtol=0, atol=1e-6)


def test_fullgraph_compile_has_no_graph_break_and_equals_eager():
    cell = Cell(8).double()
    layer, _ = _layers(cell)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    z_c, info_c, grads_c = _run(compiled, cell, x)
    z, info, grads = _run(layer, cell, x)
    torch.testing.assert_close(z_c, z, rtol=0, atol=1e-14)
    assert torch.equal(info_c.steps, info.steps) and torch.equal(info_c.converged, info.converged)
    for g, r in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_fullgraph_equals_eager():
    cell = Cell(16)
    layer, _ = _layers(cell)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    z_c, info_c, grads_c = _run(compiled, cell, x)
    z, info, grads = _run(layer, cell, x)
    torch.testing.assert_close(z_c, z, rtol=1e-5, atol=1e-5)
    assert bool(info_c.converged.all())
    assert (info_c.steps - info.steps).abs().max() <= 1  # float32 rounding at the tolerance
    for g, r in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


def test_non_convergence_warns_eagerly_and_is_flagged_when_compiled():
    cell = Cell(8, scale=0.95).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    layer = il.nn.DEQ(cell, solver=il.solvers.Picard(max_steps=3), compiled_solve=True)
    with pytest.warns(il.ConvergenceWarning, match="3 of 3"):
        z, info = layer(x, return_info=True)
    assert not bool(info.converged.any()) and torch.equal(info.steps, torch.full((3,), 3))
    # the returned iterate is the one whose residual the info reports
    torch.testing.assert_close(torch.linalg.vector_norm(z - cell(z, x), dim=-1), info.residual)
    raising = il.nn.DEQ(
        cell, solver=il.solvers.Picard(max_steps=3, on_failure="raise"), compiled_solve=True
    )
    with pytest.raises(il.ConvergenceError):
        raising(x)


@pytest.mark.slow
def test_non_convergence_is_flagged_in_the_compiled_graph():
    cell = Cell(8, scale=0.95).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    layer = il.nn.DEQ(cell, solver=il.solvers.Picard(max_steps=3), compiled_solve=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    _, info_c = compiled(x, return_info=True)  # no warning from inside a graph: the flags say it
    assert not bool(info_c.converged.any())
    with torch.no_grad():  # the inference graph (no autograd.Function) says it too
        z_ng, info_ng = compiled(x, return_info=True)
    assert not bool(info_ng.converged.any()) and torch.equal(info_ng.steps, info_c.steps)
    with pytest.warns(il.ConvergenceWarning):
        z_eager = layer(x)
    torch.testing.assert_close(z_ng, z_eager.detach(), rtol=0, atol=1e-14)


def test_adjoint_non_convergence_warns():
    cell = Cell(8).double()
    layer = il.nn.DEQ(
        cell, solver=il.solvers.Picard(max_steps=200), backward=il.linear.Neumann(2),
        compiled_solve=True,
    )
    z = layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.warns(il.ConvergenceWarning, match="backward"):
        z.sum().backward()


def test_nan_raises_and_never_returns_nan():
    class NaNCell(Cell):
        def forward(self, z, x):
            return super().forward(z, x) * torch.where(x > 5, torch.nan, 1.0)

    cell = NaNCell(4).double()
    x = torch.zeros(2, 4, dtype=torch.float64)
    x[1, 0] = 10.0
    layer = il.nn.DEQ(cell, solver=il.solvers.Picard(max_steps=50), compiled_solve=True)
    with pytest.raises(il.NonFiniteError, match="1 sample"):
        layer(x)


def test_inference_mode_no_grad_and_eval_solver():
    cell = Cell(6).double()
    layer = il.nn.DEQ(
        cell, solver=il.solvers.Picard(max_steps=200),
        eval_solver=il.solvers.Picard(max_steps=200, rtol=1e-4), compiled_solve=True,
    )
    x = torch.randn(3, 6, dtype=torch.float64)
    z = layer(x).detach()
    with torch.inference_mode():
        z_inf = layer(x)
    with torch.no_grad():
        z_ng = layer(x)
    torch.testing.assert_close(z_inf, z, rtol=0, atol=0)
    torch.testing.assert_close(z_ng, z, rtol=0, atol=0)
    layer.eval()
    _, info = layer(x, return_info=True)
    assert bool((info.tolerance > 1e-8).all())  # the eval solver's looser rtol


def test_autocast_keeps_the_state_dtype():
    cell = Cell(8)
    layer = il.nn.DEQ(
        cell, solver=il.solvers.Picard(max_steps=100, rtol=2e-2),
        backward=il.linear.Neumann(100, rtol=2e-2), compiled_solve=True,
    )
    x = torch.randn(3, 8)
    z_ref = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x.requires_grad_())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.detach(), z_ref, rtol=0, atol=5e-2)
    z.sum().backward()
    assert torch.isfinite(cell.lin.weight.grad).all()


def test_settings_the_compiled_solve_cannot_honour_are_refused():
    cell = Cell(4).double()
    with pytest.raises(ValueError, match="Picard"):
        il.nn.DEQ(cell, solver=il.solvers.Anderson(), compiled_solve=True)
    with pytest.raises(ValueError, match="eval_solver=il.solvers.Picard"):
        il.nn.DEQ(cell, eval_solver=il.solvers.Broyden(), compiled_solve=True)
    with pytest.raises(ValueError, match="Neumann"):
        il.nn.DEQ(cell, backward=il.linear.GMRES(), compiled_solve=True)
    with pytest.raises(ValueError, match="Neumann"):
        il.nn.DEQ(cell, backward=il.backward.Unrolled(), compiled_solve=True)
    with pytest.raises(ValueError, match="fallback"):
        il.nn.DEQ(
            cell, backward=il.backward.Implicit(il.linear.Neumann(), fallback=il.backward.Phantom()),
            compiled_solve=True,
        )
    with pytest.raises(TypeError, match="compiled_solve must be a bool"):
        il.nn.DEQ(cell, compiled_solve="yes")
    layer = il.nn.DEQ(cell, backward=il.backward.Implicit(il.linear.Neumann(50)), compiled_solve=True)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.vmap(layer)(x.unsqueeze(1))
    with pytest.raises(TypeError, match="single tensor state"):
        layer(x, z0=(x, x))
    with pytest.raises(ValueError, match="double backward"):
        torch.autograd.grad(layer(x.requires_grad_()).square().sum(), x, create_graph=True)


@pytest.mark.slow
def test_new_batch_sizes_compile_no_new_graph_after_the_second():
    from torch._dynamo.utils import counters

    cell = Cell(6).double()
    layer, eager = _layers(cell)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    graphs = []
    for B in (3, 4, 7, 10):
        x = torch.randn(B, 6, dtype=torch.float64)
        z_c, info_c, grads_c = _run(compiled, cell, x)
        z, info, grads = _run(eager, cell, x)
        torch.testing.assert_close(z_c, z, rtol=0, atol=1e-14)
        assert torch.equal(info_c.steps, info.steps)
        torch.testing.assert_close(grads_c[0], grads[0], rtol=1e-10, atol=1e-12)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], graphs


def test_empty_batch_gives_zero_gradients():
    cell = Cell(4).double()
    layer = il.nn.DEQ(cell, compiled_solve=True)
    z, info = layer(torch.zeros(0, 4, dtype=torch.float64), return_info=True)
    assert z.shape == (0, 4) and info.steps.shape == (0,)
    z.sum().backward()
    assert torch.equal(cell.lin.weight.grad, torch.zeros_like(cell.lin.weight))
