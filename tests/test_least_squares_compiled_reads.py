"""``LevenbergMarquardt(compile=True)`` solving before looking for the tensors that carry
derivatives: the compiled loop reads every tensor the residual function reads and says which of
them require grad, so where none does the layer calls the function no other time; where one does
(however the function reaches it), or where the loop cannot say, the layer looks for them as
before, with the same solutions, gradients, errors and warnings.

Each new residual function or shape compiles (seconds): the tests share a few.
"""

from __future__ import annotations

import types

import pytest
import torch

import implicit_layers as il
from implicit_layers import _compiled_reads

D = torch.float64
T = torch.linspace(0, 2, 25, dtype=D)
Y = 2.0 * torch.exp(-1.5 * T) + 0.5 * torch.sin(3 * T) + 0.1 * torch.cos(7 * T)
COMPILED = il.solvers.LevenbergMarquardt(compile=True)

#: A module holding a tensor: ``reaches_no_derivatives`` does not follow module attributes, so
#: only the compiled loop's report shows that the residual below reads one that requires grad.
params = types.ModuleType("params")
params.scale = torch.tensor(1.5, dtype=D)
#: Eager calls of the residual function (a module attribute, which the layer's check of the
#: objects a function names does not follow, unlike a list).
counter = types.ModuleType("counter")
counter.calls = 0


def _residual(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # eager calls only (a traced loop has no side effects)
        counter.calls += 1
    return w[..., 0:1] * torch.exp(-w[..., 1:2] * T) + w[..., 2:3] * torch.sin(3 * T) - y


def _scaled(w: torch.Tensor) -> torch.Tensor:
    return _residual(w, params.scale * Y)


@pytest.mark.slow
def test_no_other_call_of_the_function_and_the_same_fit(captures) -> None:
    y = Y.expand(2, -1) * torch.tensor([[1.0], [1.2]], dtype=D)
    w0 = torch.ones(2, 3, dtype=D)
    w, info = il.least_squares(_residual, w0, y, batched=True, solver=COMPILED, return_info=True)
    before = counter.calls
    w2, info2 = il.least_squares(_residual, w0, y, batched=True, solver=COMPILED, return_info=True)
    # Compiled already: the function's Python body runs no more (no probe, no capture).
    assert counter.calls == before and captures[0] == 0
    assert not w2.requires_grad and torch.equal(w, w2)
    # The fit of the bound path (an explicit argument that requires grad) and of the eager
    # solver: the same iterates.
    w_bound, info_bound = il.least_squares(_residual, w0, y.clone().requires_grad_(), batched=True,
                                           solver=COMPILED, return_info=True)
    assert captures[0] == 1
    torch.testing.assert_close(w_bound.detach(), w, rtol=0.0, atol=0.0)
    w_eager, info_eager = il.least_squares(_residual, w0, y, batched=True, return_info=True)
    torch.testing.assert_close(w, w_eager, rtol=1e-10, atol=1e-12)
    for field in ("converged", "steps"):
        assert torch.equal(getattr(info, field), getattr(info_eager, field)), field
        assert torch.equal(getattr(info, field), getattr(info_bound, field)), field
    # Under no_grad and inference_mode the same fit (no derivatives to look for).
    with torch.no_grad():
        torch.testing.assert_close(il.least_squares(_residual, w0, y, batched=True, solver=COMPILED),
                                   w, rtol=0.0, atol=0.0)
    with torch.inference_mode():
        torch.testing.assert_close(il.least_squares(_residual, w0, y, batched=True, solver=COMPILED),
                                   w, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_tensor_reached_through_a_module_attribute_gets_its_gradient(captures) -> None:
    # The fit scales with the data in (a, c): d(a + b + c)/ds = (a + c)/s.
    w0 = torch.ones(3, dtype=D)
    params.scale = torch.tensor(1.5, dtype=D)
    w = il.least_squares(_scaled, w0, solver=COMPILED)
    assert captures[0] == 0 and not w.requires_grad
    params.scale = torch.tensor(1.5, dtype=D, requires_grad=True)
    try:
        w = il.least_squares(_scaled, w0, solver=COMPILED)
        assert captures[0] == 1 and w.requires_grad
        (grad,) = torch.autograd.grad(w.sum(), params.scale)
    finally:
        params.scale = torch.tensor(1.5, dtype=D)
    torch.testing.assert_close(grad, (w[0] + w[2]).detach() / 1.5, rtol=1e-7, atol=0.0)
    # An eager stance runs no graph, so nothing reports: the layer looks for the tensors.
    with torch.compiler.set_stance("force_eager"):
        w_eager = il.least_squares(_scaled, w0, solver=COMPILED)
    assert captures[0] == 1  # a plain probe settled it (no capture), as for compile=False
    torch.testing.assert_close(w_eager, w.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("bad, error, match", [
    (lambda w, y: (w, y), TypeError, "must return a floating-point torch.Tensor of residuals, got tuple"),
    (lambda w, y: (w[..., :1] - y).sum(-1)[:1], ValueError, "must return residuals shaped"),
    (lambda w, y: torch.zeros(2, 0, dtype=D), ValueError, "returned no residuals"),
    (lambda w, y: (100 * (w[..., :1] - y)).long(), TypeError, "got torch.int64"),
])
def test_same_errors_as_the_eager_solver(bad, error, match) -> None:
    w0 = torch.ones(2, 3, dtype=D)
    y = Y.expand(2, -1)
    with pytest.raises(error, match=match) as compiled:
        il.least_squares(bad, w0, y, batched=True, solver=COMPILED)
    with pytest.raises(error, match=match) as eager:
        il.least_squares(bad, w0, y, batched=True)
    assert str(compiled.value) == str(eager.value)


@pytest.mark.slow
def test_verdicts_of_a_solve_before_the_binding() -> None:
    y = Y.expand(2, -1) * torch.tensor([[1.0], [1.2]], dtype=D)
    w0 = torch.ones(2, 3, dtype=D)
    few = il.solvers.LevenbergMarquardt(compile=True, max_steps=2)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        _, info = il.least_squares(_residual, w0, y, batched=True, solver=few, return_info=True)
    assert not bool(info.converged.any())
    with pytest.raises(il.ConvergenceError):
        il.least_squares(_residual, w0, y, batched=True, return_info=True,
                         solver=il.solvers.LevenbergMarquardt(compile=True, max_steps=2, on_failure="raise"))
    with pytest.raises(il.NonFiniteError):
        il.least_squares(_residual, w0, y * float("nan"), batched=True, solver=COMPILED)


def test_module_parameters_are_reads() -> None:
    net = torch.nn.Linear(3, 3)
    compiled = torch.compile(lambda x: net(x), fullgraph=True,
                             backend=_compiled_reads.inductor_reporting_reads({}))
    with torch.no_grad():
        _, reads = _compiled_reads.with_reads(lambda: compiled(torch.ones(2, 3)))
    assert reads is not None and {id(t) for t in reads} == {id(net.weight), id(net.bias)}
    net.requires_grad_(False)  # a new graph (dynamo guards requires_grad), reading none
    with torch.no_grad():
        assert _compiled_reads.with_reads(lambda: compiled(torch.ones(2, 3)))[1] == ()


def test_reads_are_those_of_the_call() -> None:
    # A call that runs no compiled graph cannot read the answer an earlier call left.
    compiled = torch.compile(lambda x, y: x * y, fullgraph=True,
                             backend=_compiled_reads.inductor_reporting_reads({}))
    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        _, reads = _compiled_reads.with_reads(lambda: compiled(x, torch.ones(3)))
    assert [t is x for t in reads or ()] == [True]
    with torch.no_grad():
        compiled(x, torch.ones(3))  # leaves an answer behind
    assert _compiled_reads.with_reads(lambda: None) == (None, None)


def test_cpu_patches_apply_to_cpu_graphs_only(monkeypatch) -> None:
    # The C++ wrapper of the compiled loops is asked for on the CPU only; a graph with an input
    # elsewhere (here "meta", standing in for an accelerator) gets the other patches alone.
    import torch._inductor.compile_fx

    seen = []

    def recording(graph, example_inputs, config_patches=None):  # noqa: ANN001, ANN202
        seen.append(config_patches)
        return graph

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", recording)
    backend = _compiled_reads.inductor_reporting_reads({"size_asserts": False}, {"cpp_wrapper": True})
    graph = torch.fx.symbolic_trace(lambda x, y: x * y)
    backend(graph, [torch.ones(2), 3])
    backend(graph, [torch.ones(2), torch.ones(2, device="meta")])
    assert seen == [{"size_asserts": False, "cpp_wrapper": True}, {"size_asserts": False}]


@pytest.mark.slow
def test_torch_func_grad_through_a_compiled_fit() -> None:
    # Under torch.func.grad the layer's forward calls the residual with unwrapped values
    # substituted: the eager steps serve it, with the gradient of the eager solver.
    def fit_sum(y: torch.Tensor, solver: il.solvers.LevenbergMarquardt) -> torch.Tensor:
        return il.least_squares(_residual, torch.ones(3, dtype=D), y, solver=solver).sum()

    got = torch.func.grad(fit_sum)(Y, COMPILED)
    want = torch.func.grad(fit_sum)(Y, il.solvers.LevenbergMarquardt())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    y = Y.clone().requires_grad_()
    (plain,) = torch.autograd.grad(fit_sum(y, COMPILED), y)
    torch.testing.assert_close(got, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_a_compiler_failure_is_not_blamed_on_the_function(monkeypatch) -> None:
    import torch._inductor.compile_fx

    def failing(*args, **kwargs):
        raise RuntimeError("simulated code generation failure")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", failing)

    def residual(w: torch.Tensor) -> torch.Tensor:  # a new function: traced and compiled anew
        return _residual(w, 1.25 * Y)

    with pytest.raises(RuntimeError, match="compiler failed on the loop .*Use compile=False"):
        il.least_squares(residual, torch.ones(3, dtype=D), solver=COMPILED)

    def optimality(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 2.0 * w - theta

    @il.custom_root(optimality, symmetric=True, backward=il.backward.CompiledImplicit(il.linear.CG()))
    def inner(w0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return theta / 2

    theta = torch.ones(3, dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match="compiler failed on it .*backward=il.linear.CG"):
        inner(torch.zeros(3, dtype=D), theta).sum().backward()
