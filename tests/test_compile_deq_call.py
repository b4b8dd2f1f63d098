"""An eager ``il.nn.DEQ`` call under ``torch.compile``: the graph breaks at the layer call itself.

The layer's ``forward`` is bound, per instance, to its eagerly run implementation, so that
dynamo meets a disabled function at ``self.deq(...)`` and compiles two frames per training step
(the model's forward and its resumption after the layer) instead of three (a frame of
``DEQ.forward`` of its own, looked up and guarded at every call). Checked here: the frame count
with dynamo's own counters, values, gradients and ``SolveInfo`` equal to eager in float64, and
that the per-instance binding behaves like the method it replaces (copies, saving, hooks,
subclasses that override ``forward``, the compiled solve).
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

N = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


class Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(N, N, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(0.4)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class Model(torch.nn.Module):
    def __init__(self, **deq) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(N, N, dtype=torch.float64)
        self.deq = il.nn.DEQ(Cell(), state_shape=(N,), **deq)
        self.out = torch.nn.Linear(N, 2, dtype=torch.float64)

    def forward(self, x):
        z, info = self.deq(self.inp(x), return_info=True)
        return self.out(z).square().sum(), info


def _step(call, model, x):
    model.zero_grad()
    loss, info = call(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], info


def test_compiled_step_has_two_frames_one_break_and_equals_eager():
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(6, N, dtype=torch.float64)
    eager_loss, eager_grads, eager_info = _step(model, model, x)

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
        loss, grads, info = _step(compiled, model, x)
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
    """With compiled_solve=True the layer traces into the graph: no break, no disabled frame."""
    torch.manual_seed(4)
    model = Model(solver=il.solvers.Picard(max_steps=60), backward=il.linear.Neumann(),
                  compiled_solve=True)
    assert "forward" not in vars(model.deq)
    x = torch.randn(6, N, dtype=torch.float64)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
