"""Implicit layers inside ``torch.compile``d models: the same values, gradients and ``SolveInfo``
as eager, one graph break per implicit-layer call (counted with dynamo's own counters), no new
graphs for batch sizes after the second, a clear error under ``fullgraph=True``, and the frames
dynamo compiles for a ``DEQ`` model (the break at the layer call itself).

The "eager" backend is used throughout (dynamo's graph capture without code generation): the
graph breaks and recompiles are decided by dynamo, not by the backend, and it keeps the tests
fast. One test runs inductor end to end.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import implicit_layers as il

pytestmark = pytest.mark.usefixtures("single_thread")

N = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _breaks(fn, *args) -> int:
    """Graph breaks dynamo reports for one call of ``fn`` (``torch._dynamo.explain``), each
    checked to be an implicit-layer call run eagerly."""
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    for reason in report.break_reasons:
        assert "implicit_layers runs each solve eagerly" in str(reason.reason), reason.reason
    return report.graph_break_count


def _compare_function(fn, args: tuple, breaks: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """A compiled function's loss and gradients equal the eager function's, with between
    ``breaks[0]`` and ``breaks[1]`` graph breaks, each an implicit-layer call run eagerly
    (dynamo runs a resumed frame that would start with a break eagerly, so back-to-back calls
    can cost fewer than one each). Returns the compiled gradients."""
    eager_loss = fn(*args)
    eager = torch.autograd.grad(eager_loss, args)
    assert breaks[0] <= _breaks(fn, *args) <= breaks[1]
    loss = torch.compile(fn, backend="eager")(*args)
    grads = torch.autograd.grad(loss, args)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    return grads


def _no_new_graphs_after_two_batch_sizes(model: torch.nn.Module, sizes=(3, 4, 5, 6, 9, 17)) -> None:
    """Training steps of the compiled ``model`` at each batch size: dynamo compiles no new
    graph after the first two sizes (its ``unique_graphs`` counter)."""
    compiled = torch.compile(model, backend="eager")
    after_two = None
    for i, B in enumerate(sizes):
        compiled(torch.randn(B, N, dtype=torch.float64)).backward()
        if i == 1:
            after_two = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == after_two


class Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(N, N, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class DEQModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.deq = il.nn.DEQ(Cell(), state_shape=(N,))
        self.out = torch.nn.Linear(N, 2, dtype=torch.float64)

    def forward(self, x):
        return self.out(self.deq(self.inp(x))).square().sum()


class ArgminModel(torch.nn.Module):
    """A quadratic argmin layer between two linear layers, with or without a box."""

    def __init__(self, bounded: bool) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.linspace(1.0, 2.0, N, dtype=torch.float64))
        box = {"lower": -0.2, "upper": 0.2} if bounded else {}
        self.layer = il.nn.ArgminLayer(self._objective, w_shape=(N,), **box)

    def _objective(self, w, x):
        return (0.5 * self.scale * w.square() - x * w).sum(-1) + 0.1 * w.pow(4).sum(-1)

    def forward(self, x):
        return self.layer(self.inp(x)).sin().sum()


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _compare(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The compiled model's loss and parameter gradients equal the eager model's, and its
    forward holds exactly one graph break: the layer call."""
    model.zero_grad()
    eager_loss = model(x)
    eager_loss.backward()
    eager = _grads(model)

    assert _breaks(model, x) == 1
    compiled = torch.compile(model, backend="eager")
    model.zero_grad()
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
    for g, e in zip(_grads(model), eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_deq_model_compiles_with_one_break_and_equal_gradients():
    torch.manual_seed(0)
    _compare(DEQModel(), torch.randn(5, N, dtype=torch.float64))


@pytest.mark.parametrize("bounded", [False, True])
def test_argmin_layer_compiles_with_one_break_and_equal_gradients(bounded):
    torch.manual_seed(1)
    _compare(ArgminModel(bounded), torch.randn(4, N, dtype=torch.float64))


class QPModel(torch.nn.Module):
    """An OptNet layer (inequalities and one equality) between a linear layer and a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.qp = il.nn.QPLayer(N, n_ineq=4, n_eq=1, dtype=torch.float64)

    def forward(self, x):
        return self.qp(self.inp(x)).sin().sum()


class CompositeModel(torch.nn.Module):
    """An argmin layer with a learnable l1 penalty (``prox=``) or a simplex constraint."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.lam = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        if kind == "prox":
            extra = {"prox": lambda w, step: il.prox.l1(w, self.lam, step)}
        else:
            extra = {"constraint": il.projection.simplex}
        self.layer = il.nn.ArgminLayer(self._objective, w_shape=(N,), **extra)

    def _objective(self, w, x):
        return (0.5 * w.square() - x * w).sum(-1) + 0.1 * self.lam * w.square().sum(-1)

    def forward(self, x):
        return self.layer(self.inp(x)).sin().sum()


def test_qp_layer_compiles_with_one_break_and_equal_gradients():
    """The OptNet layer: its checks, interior point and reports run eagerly as one break (traced,
    they were over forty breaks and new graphs for every batch size)."""
    torch.manual_seed(6)
    _compare(QPModel(), torch.randn(5, N, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["prox", "constraint"])
def test_composite_argmin_layer_compiles_with_one_break_and_equal_gradients(kind):
    torch.manual_seed(7)
    model = CompositeModel(kind)
    _compare(model, torch.randn(4, N, dtype=torch.float64))
    if kind == "prox":  # the closed-over strength receives its gradient through the break
        assert model.lam.grad is not None and model.lam.grad.abs() > 0


def test_qp_polyhedron_and_least_squares_calls_each_break_once():
    """``il.qp``, a projection onto a polyhedron (a QP) and ``il.least_squares`` called in a
    compiled function: at most one break each, values and gradients as eager."""
    torch.manual_seed(8)
    t = torch.linspace(0, 2, 25, dtype=torch.float64)
    Q = torch.eye(N, dtype=torch.float64) * 2
    G = torch.randn(3, N, dtype=torch.float64)
    h = torch.ones(3, dtype=torch.float64)
    q = torch.randn(2, N, dtype=torch.float64, requires_grad=True)
    y = (2 * torch.exp(-t) + 0.01 * torch.randn(2, 25, dtype=torch.float64)).requires_grad_()

    def residual(w, y):
        return w[:, :1] * torch.exp(-w[:, 1:2] * t) - y

    def model(q, y):
        z = il.qp(Q, q, G, h)
        p = il.projection.polyhedron(q, G=G, h=h)
        w = il.least_squares(residual, torch.ones(2, 2, dtype=torch.float64), y, batched=True)
        return z.sin().sum() + p.square().sum() + w.square().sum()

    _compare_function(model, (q, y), breaks=(1, 3))


def test_linear_solve_breaks_once_and_equals_eager():
    """``il.linear.solve`` (host-side checks, per-system verdicts) runs eagerly as one break
    (traced, it broke about twenty times); values and the gradient through it as eager."""
    torch.manual_seed(10)
    M = torch.randn(N, N, dtype=torch.float64)
    S = M @ M.T + N * torch.eye(N, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)

    def model(b):
        u, _ = il.linear.solve(lambda v: S @ v, 2 * b, il.linear.CG(rtol=1e-12))
        return u.square().sum()

    (grad,) = _compare_function(model, (b,), breaks=(1, 1))
    # And the gradient is the closed form's: d/db |S⁻¹ 2b|² = 8 S⁻² b.
    torch.testing.assert_close(grad, 8 * torch.linalg.solve(S @ S, b.detach()), rtol=1e-8, atol=1e-10)


def test_qp_layer_no_new_graphs_after_the_second_batch_size_and_fullgraph_names_what_to_do():
    torch.manual_seed(9)
    model = QPModel()
    _no_new_graphs_after_two_batch_sizes(model)
    torch._dynamo.reset()
    strict = torch.compile(model.qp, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="implicit_layers runs each solve eagerly"):
        strict(torch.randn(2, N, dtype=torch.float64))


def test_qp_and_polyhedron_warnings_point_at_the_callers_line():
    """An empty feasible set warns at the line that called ``il.qp`` / the projection, eagerly
    and inside a compiled function (the eager run sits behind dynamo's wrapper there)."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    h = torch.tensor([-1.0, -1.0], dtype=torch.float64)  # z1 <= -1 and z1 >= 1
    x = torch.zeros(2, dtype=torch.float64)

    def solve(x):
        return il.qp(torch.eye(2, dtype=torch.float64), x, G, h)

    def project(x):
        return il.projection.polyhedron(x, G=G, h=h)

    for fn in (solve, project, torch.compile(solve, backend="eager"),
               torch.compile(project, backend="eager")):
        with pytest.warns(il.ConvergenceWarning, match="primal infeasible") as record:
            fn(x)
        assert [w.filename for w in record] == [__file__], [w.filename for w in record]


def test_functional_calls_each_break_once():
    """fixed_point, root, argmin and a custom_root solver in one compiled function: four calls,
    at most four breaks (dynamo runs a resumed frame that would start with a break eagerly, so
    back-to-back calls can cost fewer); values and gradients as eager."""
    torch.manual_seed(2)
    W = (0.4 * torch.randn(N, N, dtype=torch.float64)).requires_grad_()
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)

    @il.custom_root(lambda z, b: z - 0.5 * torch.tanh(z) - b)
    def custom(z0, b):
        z = z0
        for _ in range(200):
            z = 0.5 * torch.tanh(z) + b
        return z

    def model(W, b):
        z0 = torch.zeros(N, dtype=torch.float64)
        z1 = il.fixed_point(lambda z, W, b: torch.tanh(W @ z + b), z0, W, b)
        z2 = il.root(lambda z, b: z + z.pow(3) - b, z0, b)
        z3 = il.argmin(lambda w, W: 0.5 * w.square().sum() + (W @ w).cos().sum() * 0.1, z0, W)
        z4 = custom(z0, b)
        return z1.sum() + z2.square().sum() + z3.sin().sum() + z4.sum()

    _compare_function(model, (W, b), breaks=(1, 4))


def test_info_is_the_eager_info():
    torch.manual_seed(3)
    deq = il.nn.DEQ(Cell(), state_shape=(N,))
    x = torch.randn(7, N, dtype=torch.float64)
    _, eager = deq(x, return_info=True)
    _, info = torch.compile(deq, backend="eager")(x, return_info=True)
    assert torch.equal(info.steps, eager.steps)
    assert torch.equal(info.converged, eager.converged)
    torch.testing.assert_close(info.residual, eager.residual)


def test_no_new_graphs_after_the_second_batch_size():
    torch.manual_seed(4)
    _no_new_graphs_after_two_batch_sizes(DEQModel())


def test_fullgraph_names_what_to_do():
    deq = il.nn.DEQ(Cell(), state_shape=(N,))
    compiled = torch.compile(deq, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="implicit_layers runs each solve eagerly") as caught:
        compiled(torch.randn(2, N, dtype=torch.float64))
    # ... and names the layers that do trace with fullgraph=True.
    assert "compiled_solve=True" in str(caught.value)
    assert "CompiledImplicit" in str(caught.value)


@pytest.mark.slow
def test_inductor_model_equals_eager():
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as exc:  # no C++ compiler for inductor on this machine
        pytest.skip(f"inductor unavailable: {type(exc).__name__}")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(5)
    model = DEQModel()
    x = torch.randn(5, N, dtype=torch.float64)
    eager_loss = model(x)
    eager_loss.backward()
    eager = _grads(model)
    model.zero_grad()
    loss = torch.compile(model)(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-10, atol=1e-12)
    for g, e in zip(_grads(model), eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)

# An eager DEQ call breaks the graph at the layer call itself: its forward is bound, per
# instance, to the eagerly run implementation, so dynamo compiles two frames per training step
# (the model's forward and its resumption after the layer), not also a frame of DEQ.forward
# looked up and guarded at every call. The binding must behave like the method it replaces.


class InfoModel(torch.nn.Module):
    """A DEQ model whose forward also returns the layer's SolveInfo."""

    def __init__(self, **deq) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.deq = il.nn.DEQ(Cell(), state_shape=(N,), **deq)
        self.out = torch.nn.Linear(N, 2, dtype=torch.float64)

    def forward(self, x):
        z, info = self.deq(self.inp(x), return_info=True)
        return self.out(z).square().sum(), info


def _info_step(call, model, x):
    model.zero_grad()
    loss, info = call(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], info


def test_compiled_step_has_two_frames_one_break_and_equals_eager():
    torch.manual_seed(0)
    model = InfoModel()
    x = torch.randn(6, N, dtype=torch.float64)
    eager_loss, eager_grads, eager_info = _info_step(model, model, x)

    report = torch._dynamo.explain(model)(x)
    assert report.graph_break_count == 1
    assert "implicit_layers runs each solve eagerly" in str(report.break_reasons[0].reason)
    # The break is at the layer call in the model's forward, not inside DEQ.forward.
    stack = report.break_reasons[0].user_stack
    assert stack[0].filename == __file__ and stack[0].name == "forward"
    assert not any(Path(f.filename).match("implicit_layers/nn.py") for f in stack)
    torch._dynamo.reset()
    counters.clear()

    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        loss, grads, info = _info_step(compiled, model, x)
    # The model's forward and its resumption after the layer; no frame of DEQ.forward.
    assert counters["frames"]["total"] == 2
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(loss, eager_loss, rtol=1e-13, atol=0)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert torch.equal(info.steps, eager_info.steps)
    assert torch.equal(info.converged, eager_info.converged)
    assert info.solver == eager_info.solver
    torch.testing.assert_close(info.residual, eager_info.residual, rtol=1e-12, atol=0)
    # The adjoint solve's statistics reach the info as they do eagerly.
    assert info.backward is not None and eager_info.backward is not None
    assert torch.equal(info.backward.steps, eager_info.backward.steps)


def test_the_eager_forward_is_bound_to_each_copy_and_saved_layer():
    torch.manual_seed(1)
    deq = il.nn.DEQ(Cell(), state_shape=(N,))
    x = torch.randn(3, N, dtype=torch.float64)
    expected = deq(x)
    twin = copy.deepcopy(deq)
    with torch.no_grad():
        twin.f.lin.bias.add_(1.0)
    # The copy's forward solves the copy's map, not the original's.
    assert twin.forward.__self__ is twin
    torch.testing.assert_close(deq(x), expected, rtol=0, atol=0)
    assert not torch.allclose(twin(x), expected)
    # A shallow copy too: put in eval mode, it uses its eval_solver, not the original's mode.
    shallow = copy.copy(deq)
    shallow.eval_solver = il.solvers.Picard(max_steps=1, on_failure="ignore")
    shallow.eval()
    assert shallow.forward.__self__ is shallow and deq.training
    assert shallow(x, return_info=True)[1].steps.max() == 1
    torch.testing.assert_close(deq(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(deq, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.forward.__self__ is loaded
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert set(deq.state_dict()) == {"f.lin.weight", "f.lin.bias"}


def test_hooks_and_arguments_go_through_the_bound_forward():
    torch.manual_seed(2)
    deq = il.nn.DEQ(Cell(), state_shape=(N,))
    seen = []
    deq.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    x = torch.randn(4, N, dtype=torch.float64)
    states = deq(x, states=2)
    assert len(states) == 2 and seen == [{"states": 2}]
    with pytest.raises(ValueError, match="states must be None, a positive int"):
        deq(x, states=0)


def test_a_subclass_overriding_forward_keeps_its_forward():
    class Scaled(il.nn.DEQ):
        def forward(self, x, z0=None, **kwargs):
            return 2.0 * super().forward(x, z0, **kwargs)

    torch.manual_seed(3)
    cell = Cell()
    x = torch.randn(3, N, dtype=torch.float64)
    plain = il.nn.DEQ(cell, state_shape=(N,))(x)
    torch.testing.assert_close(Scaled(cell, state_shape=(N,))(x), 2.0 * plain, rtol=1e-14, atol=0)


def test_the_compiled_solve_keeps_the_traced_forward():
    """With compiled_solve=True the layer's forward is the method dynamo traces into the graph
    (tests/test_compiled_solve.py counts no break); without, the eagerly run one."""
    torch.manual_seed(4)
    cell = Cell()
    settings = {"solver": il.solvers.Picard(max_steps=60), "backward": il.linear.Neumann()}
    traced = il.nn.DEQ(cell, state_shape=(N,), compiled_solve=True, **settings)
    assert "forward" not in vars(traced) and traced.forward.__func__ is il.nn.DEQ.forward
    eager = il.nn.DEQ(cell, state_shape=(N,), lipschitz=None, **settings)
    assert eager.forward.__func__ is not il.nn.DEQ.forward
    x = torch.randn(6, N, dtype=torch.float64)
    torch.testing.assert_close(traced(x), eager(x), rtol=0, atol=0)
