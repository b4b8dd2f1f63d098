"""``custom_root`` with ``CompiledImplicit`` traced into a ``torch.compile`` graph: no graph
break (``fullgraph=True`` holds), gradients equal to the dense closed form's (explicit
arguments and closed-over tensors alike), verdicts of the adjoint solve kept."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import implicit_layers as il

DT = torch.float64


def _ridge(d: int = 12, n: int = 30, seed: int = 0, dtype: torch.dtype = DT):
    """A ridge problem whose regressors are scaled by a closed-over ``s``: the optimality
    function reads ``θ`` (an argument) and ``s`` (a closure), both differentiated."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype)
    s = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    theta = (0.1 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_(True)

    def optimality(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        Xs = s * X
        return Xs.T @ (Xs @ w - y) / n + th.exp() * w

    def closed_form(th: torch.Tensor) -> torch.Tensor:
        Xs = s * X
        H = Xs.T @ Xs / n + torch.diag(th.exp())
        return torch.linalg.solve(H, Xs.T @ y / n)

    return X, y, s, theta, optimality, closed_form


def _layer(optimality, closed_form, cg: il.linear.CG | None = None, **kw):  # noqa: ANN001, ANN202
    backward = il.backward.CompiledImplicit(cg or il.linear.CG(rtol=1e-12))
    return il.custom_root(optimality, backward=backward, symmetric=True, **kw)(
        lambda w0, th: closed_form(th))


def _grads(loss, *params):  # noqa: ANN001, ANN202
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_gradients_equal_closed_form_without_a_graph_break(backend: str) -> None:
    torch._dynamo.reset()
    _, _, s, theta, optimality, closed_form = _ridge()
    inner = _layer(optimality, closed_form)
    w0 = torch.zeros_like(theta)
    c = torch.roll(torch.arange(12, dtype=DT), 3)

    def loss(th: torch.Tensor) -> torch.Tensor:
        return (c * inner(w0, th)).sum() ** 2

    compiled = torch.compile(loss, fullgraph=True, backend=backend)  # no break, or an error
    got = _grads(compiled(theta), theta, s)
    want = _grads((c * closed_form(theta)).sum() ** 2, theta, s)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch._dynamo.explain(loss)(theta).graph_break_count == 0


def test_a_layer_decorated_later_does_not_recompile_the_graph() -> None:
    torch._dynamo.reset()
    _, _, s, theta, optimality, closed_form = _ridge(d=6, n=15, seed=7)
    inner = _layer(optimality, closed_form)
    w0 = torch.zeros_like(theta)
    counters.clear()
    compiled = torch.compile(lambda th: inner(w0, th).sum(), fullgraph=True, backend="aot_eager")
    compiled(theta).backward()
    graphs = counters["stats"]["unique_graphs"]
    _layer(optimality, closed_form)  # another layer registered
    compiled(theta).backward()
    assert counters["stats"]["unique_graphs"] == graphs


def test_inductor_matches_eager_layer_and_compiles_once() -> None:
    torch._dynamo.reset()
    _, _, s, theta, optimality, closed_form = _ridge(d=8, n=20, seed=1)
    inner = _layer(optimality, closed_form)
    w0 = torch.zeros_like(theta)

    def loss(th: torch.Tensor) -> torch.Tensor:
        return inner(w0, th).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager = _grads(loss(theta), theta, s)
    for _ in range(3):  # new values each time, one graph
        theta2 = (theta.detach() + 0.05 * torch.randn_like(theta)).requires_grad_(True)
        got = _grads(compiled(theta2), theta2, s)
        want = _grads(loss(theta2), theta2, s)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert not torch.equal(eager[0], want[0])  # the values did change


def test_dynamic_shapes() -> None:
    torch._dynamo.reset()
    for d in (6, 9):
        _, _, s, theta, optimality, closed_form = _ridge(d=d, n=20, seed=d)
        inner = _layer(optimality, closed_form)
        w0 = torch.zeros_like(theta)
        compiled = torch.compile(lambda th, inner=inner, w0=w0: inner(w0, th).square().sum(),
                                 fullgraph=True, dynamic=True, backend="aot_eager")
        got = _grads(compiled(theta), theta, s)
        want = _grads(closed_form(theta).square().sum(), theta, s)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_batched_float32() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    B, n = 3, 6
    M = torch.randn(B, n, n, generator=g)
    A = M @ M.transpose(-1, -2) + n * torch.eye(n)  # SPD per sample
    b = torch.randn(B, n, generator=g, requires_grad=True)

    def optimality(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (A @ z.unsqueeze(-1)).squeeze(-1) + z**3 / 10 - b

    @il.custom_root(optimality, symmetric=True, batched=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG()))
    def solve(z0: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = z0
        for _ in range(60):  # Newton, a traceable fixed-count loop
            J = A + torch.diag_embed(0.3 * z**2)
            z = z - torch.linalg.solve(J, optimality(z, b))
        return z

    weights = torch.arange(1.0, n + 1)
    loss = lambda b: (weights * solve(torch.zeros(B, n), b)).sum()  # noqa: E731
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(b), b)[0]
    z = solve(torch.zeros(B, n), b.detach())
    J = A + torch.diag_embed(0.3 * z**2)
    want = torch.linalg.solve(J.transpose(-1, -2), weights.expand(B, n))  # ∂F/∂b = -I
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unconverged_adjoint_warns_or_raises_under_compile() -> None:
    torch._dynamo.reset()
    _, _, _, theta, optimality, closed_form = _ridge(d=20, n=24, seed=3)
    w0 = torch.zeros_like(theta)
    for on_failure, expect in (("warn", il.ConvergenceWarning), ("raise", il.ConvergenceError)):
        inner = _layer(optimality, closed_form,
                       cg=il.linear.CG(rtol=1e-12, max_steps=2, on_failure=on_failure))
        compiled = torch.compile(lambda th, inner=inner: inner(w0, th).sum(), fullgraph=True,
                                 backend="aot_eager")
        out = compiled(theta)
        if expect is il.ConvergenceWarning:
            with pytest.warns(il.ConvergenceWarning, match="custom_root"):
                out.backward()
        else:
            with pytest.raises(il.ConvergenceError):
                out.backward()


def test_nan_operator_warns_and_leaks_no_nan() -> None:
    """A NaN in ``∂F/∂z``: CG stops at the NaN curvature, as the eager CG does; the gradient
    stays finite and the backward says that the adjoint solve did not converge."""
    torch._dynamo.reset()
    theta = torch.ones(4, dtype=DT, requires_grad=True)
    scale = torch.tensor(float("nan"), dtype=DT)

    inner = il.custom_root(lambda w, th: scale * w - th, symmetric=True,
                           backward=il.backward.CompiledImplicit(il.linear.CG()))(
        lambda w0, th: th.clone())
    out = torch.compile(lambda th: inner(torch.zeros(4, dtype=DT), th).sum(), fullgraph=True,
                        backend="aot_eager")(theta)
    with pytest.warns(il.ConvergenceWarning, match="did not converge"):
        out.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def test_converged_backward_is_silent_and_no_grad_returns_the_solution() -> None:
    torch._dynamo.reset()
    _, _, _, theta, optimality, closed_form = _ridge(seed=4)
    inner = _layer(optimality, closed_form)
    w0 = torch.zeros_like(theta)
    compiled = torch.compile(lambda th: inner(w0, th), fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", il.ConvergenceWarning)
        compiled(theta).sum().backward()
    with torch.no_grad():
        w = compiled(theta)
    assert not w.requires_grad
    torch.testing.assert_close(w, closed_form(theta).detach())


def test_a_solver_of_the_wrong_shape_is_the_eager_layers_error() -> None:
    torch._dynamo.reset()
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    inner = il.custom_root(lambda w, th: w - th, symmetric=True,
                           backward=il.backward.CompiledImplicit())(lambda w0, th: th[:2])
    with pytest.raises(ValueError, match="shaped like z0"):
        torch.compile(lambda th: inner(torch.zeros(3, dtype=DT), th))(theta)


def test_has_aux_passes_the_aux_through() -> None:
    torch._dynamo.reset()
    _, _, s, theta, optimality, closed_form = _ridge(d=5, n=12, seed=8)

    @il.custom_root(optimality, symmetric=True, has_aux=True,
                    backward=il.backward.CompiledImplicit(il.linear.CG(rtol=1e-12)))
    def inner(w0: torch.Tensor, th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = closed_form(th)
        return w, w.norm()

    def loss(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, aux = inner(torch.zeros_like(th), th)
        return w.square().sum(), aux

    value, aux = torch.compile(loss, fullgraph=True, backend="aot_eager")(theta)
    torch.testing.assert_close(aux, closed_form(theta).detach().norm())
    got = _grads(value, theta, s)
    want = _grads(closed_form(theta).square().sum(), theta, s)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_double_backward_is_an_error_not_a_wrong_number() -> None:
    """``create_graph=True`` through the compiled layer: its adjoint operator has no derivative
    of its own. With the "eager" backend the backward runs as Python, where the second
    derivative came out wrong (the dependence of ``A⁻ᵀ`` on ``θ`` missing); it is refused. (AOT
    autograd's backends refuse double backward themselves.)"""
    torch._dynamo.reset()
    _, _, _, theta, optimality, closed_form = _ridge(d=6, n=15, seed=9)
    inner = _layer(optimality, closed_form)
    compiled = torch.compile(lambda th: inner(torch.zeros_like(th), th).square().sum(),
                             backend="eager")
    (g,) = torch.autograd.grad(compiled(theta), theta)  # first order: fine
    (want,) = _grads(closed_form(theta).square().sum(), theta)
    torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="create_graph=True"):
        torch.autograd.grad(compiled(theta), theta, create_graph=True)


def test_a_bad_z0_is_the_eager_layers_error() -> None:
    torch._dynamo.reset()
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    inner = il.custom_root(lambda w, th: w - th, symmetric=True,
                           backward=il.backward.CompiledImplicit())(lambda w0, th: th.clone())
    with pytest.raises(TypeError, match="z0"):
        torch.compile(lambda th: inner(torch.zeros(3, dtype=torch.int64), th))(theta)


def test_other_backwards_still_break_the_graph_once() -> None:
    torch._dynamo.reset()
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    inner = il.custom_root(lambda w, th: w - th, symmetric=True, backward=il.linear.CG())(
        lambda w0, th: th.clone())
    explained = torch._dynamo.explain(lambda th: inner(torch.zeros(3, dtype=DT), th).sum())(theta)
    assert explained.graph_break_count == 1


def test_a_function_torch_cannot_compile_in_a_loop_solves_eagerly_inside_the_graph() -> None:
    """``.T`` of a closed-over tensor: torch 2.13's tracer fails on the adjoint loop, not on
    the caller's graph; the compiled backward warns once and solves with the eager CG."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(20, 5, generator=g, dtype=DT)
    y = torch.randn(20, generator=g, dtype=DT)

    def optimality(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return X.T @ (X @ w - y) / 20 + th.exp() * w

    def closed_form(th: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X / 20 + torch.diag(th.exp()), X.T @ y / 20)

    inner = _layer(optimality, closed_form)
    theta = torch.zeros(5, dtype=DT, requires_grad=True)
    compiled = torch.compile(lambda th: inner(torch.zeros(5, dtype=DT), th).square().sum(),
                             fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="eager CG"):
        (got,) = _grads(compiled(theta), theta)
    (want,) = _grads(closed_form(theta).square().sum(), theta)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_torch_func_around_a_compiled_function_with_the_layer() -> None:
    """torch.func.grad and vmap over the compiled function (AOT autograd backends: dynamo
    runs the function eagerly under the transform) equal the closed form's."""
    torch._dynamo.reset()
    X, y, _, theta, optimality, closed_form = _ridge(d=5, n=12, seed=3)
    inner = _layer(optimality, closed_form)
    w0 = torch.zeros(5, dtype=DT)

    def loss(th: torch.Tensor) -> torch.Tensor:
        return inner(w0, th).square().sum()

    def reference(th: torch.Tensor) -> torch.Tensor:
        return closed_form(th).square().sum()

    th = theta.detach()
    compiled = torch.compile(loss, backend="aot_eager")
    torch.testing.assert_close(torch.func.grad(compiled)(th), torch.func.grad(reference)(th),
                               rtol=1e-9, atol=1e-12)
    batch = th + 0.1 * torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.func.vmap(compiled)(batch), torch.func.vmap(reference)(batch),
                               rtol=1e-10, atol=1e-12)
