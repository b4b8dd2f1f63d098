"""``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``, ``vmap``,
``functional_call``) on functions that call the library, ``autograd.grad(...,
is_grads_batched=True)`` and ``autograd.functional.jacobian(..., vectorize=True)``.

Every result equals a Python loop over the eager library calls and a dense reference (the ridge
closed form, Picard unrolled by hand). Closed-over tensors and module parameters keep receiving
gradients in eager autograd without being listed.
"""

import copy
import re

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev, stack_module_state, vjp, vmap

import implicit_layers as il
from tests.helpers import DT, leaf, randn_factory, rel


class Ridge:
    """``w*(λ) = argmin ½‖Xw - y‖² + ½ Σ λ_j w_j²``; outer loss ``Σ w sin(w)``."""

    def __init__(self, device, m=30, d=6, seed=0):
        randn = randn_factory(seed, device)
        self.X, self.y = randn(m, d), randn(m)
        self.lam = 0.4 + 0.1 * randn(d).abs()
        self.d = d
        self.device = device

    def fun(self, w, lam, X=None, y=None):
        X = self.X if X is None else X
        y = self.y if y is None else y
        return 0.5 * (X @ w - y).square().sum() + 0.5 * (lam * w.square()).sum()

    def closed_form(self, lam, X=None, y=None):
        X = self.X if X is None else X
        y = self.y if y is None else y
        return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)

    @staticmethod
    def outer(w):
        return (w.sin() * w).sum()

    def solve(self, lam, X=None, y=None, backward=None):
        w0 = torch.zeros(self.d, dtype=DT, device=self.device)
        args = (lam,) if X is None else (lam, X, y)
        return il.argmin(self.fun, w0, *args, solver=il.solvers.LBFGS(rtol=1e-12),
                         backward=backward)


class Cell(torch.nn.Module):
    def __init__(self, n, seed=6, contraction=0.6):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=gen, dtype=DT)
        self.W = torch.nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, 2))
        self.b = torch.nn.Parameter(0.3 * torch.randn(n, generator=gen, dtype=DT))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def unrolled_cell(cell, x, steps=150):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return z


# --------------------------------------------------------------------------------------------
# grad, vjp, jacrev, hessian
# --------------------------------------------------------------------------------------------
def test_func_grad_and_vjp_of_hypergradient_match_closed_form(device):
    p = Ridge(device)
    g = grad(lambda lam: p.outer(p.solve(lam)))(p.lam)
    g_ref = grad(lambda lam: p.outer(p.closed_form(lam)))(p.lam)
    assert rel(g, g_ref) < 1e-8
    u = randn_factory(1, device)(p.d)
    w, pull = vjp(p.solve, p.lam)
    w_ref, pull_ref = vjp(p.closed_form, p.lam)
    assert rel(w, w_ref) < 1e-9
    assert rel(pull(u)[0], pull_ref(u)[0]) < 1e-8


def test_func_jacrev_and_hessian_match_closed_form(device):
    p = Ridge(device)
    J = jacrev(p.solve)(p.lam)
    J_ref = jacrev(p.closed_form)(p.lam)
    assert rel(J, J_ref) < 1e-8
    H = hessian(lambda lam: p.outer(p.solve(lam)))(p.lam)
    H_ref = hessian(lambda lam: p.outer(p.closed_form(lam)))(p.lam)
    assert rel(H, H_ref) < 1e-6


def test_func_hessian_through_fixed_point_matches_unrolled(device):
    cell = Cell(4).to(device)
    x = randn_factory(2, device)(2, 4)
    z0 = torch.zeros(2, 4, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)

    def loss(x, solve):
        z = solve(x)
        return (z.sin() * z).sum() + z.square().sum().square()

    layer = lambda x: il.fixed_point(cell, z0, x, solver=solver, batched=True)  # noqa: E731
    H = hessian(lambda x: loss(x, layer))(x)
    H_ref = hessian(lambda x: loss(x, lambda x: unrolled_cell(cell, x)))(x)
    assert rel(H, H_ref) < 1e-6


def test_func_grad_of_functional_call_of_deq_matches_eager(device):
    """``grad`` w.r.t. the module's parameters through ``functional_call`` equals eager autograd
    (and the unrolled reference)."""
    cell = Cell(5).to(device)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
    x = randn_factory(3, device)(3, 5)
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(params, x):
        z = functional_call(deq, params, (x,))
        return (z.sin() * z).sum()

    g = grad(loss)(params, x)
    eager = torch.autograd.grad(loss(dict(deq.named_parameters()), x), list(deq.parameters()))
    ref = torch.autograd.grad((unrolled_cell(cell, x).sin() * unrolled_cell(cell, x)).sum(),
                              list(cell.parameters()))
    for (name, _), e, r in zip(deq.named_parameters(), eager, ref, strict=True):
        assert rel(g[name], e) < 1e-9, name
        assert rel(g[name], r) < 1e-8, name


# --------------------------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------------------------
def test_vmap_over_hyperparameters_equals_loop_and_closed_form(device):
    p = Ridge(device)
    lams = p.lam + 0.3 * torch.rand(5, p.d, dtype=DT, generator=torch.Generator().manual_seed(4)).to(device)
    got = vmap(p.solve)(lams)
    loop = torch.stack([p.solve(lam) for lam in lams])
    ref = torch.stack([p.closed_form(lam) for lam in lams])
    assert rel(got, loop) < 1e-9
    assert rel(got, ref) < 1e-9


def test_vmap_over_fixed_point_inputs_converges_per_sample(device):
    """Samples of very different difficulty: each one is solved to its own tolerance."""
    cell = Cell(4, contraction=0.9).to(device)
    scales = torch.tensor([0.01, 1.0, 10.0], dtype=DT, device=device).unsqueeze(-1)
    xs = scales * randn_factory(5, device)(3, 4)
    z0 = torch.zeros(4, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-12, max_steps=500)
    f = lambda z, x: cell(z.unsqueeze(0), x.unsqueeze(0)).squeeze(0)  # noqa: E731
    got = vmap(lambda x: il.fixed_point(f, z0, x, solver=solver))(xs)
    loop = torch.stack([il.fixed_point(f, z0, x, solver=solver) for x in xs])
    assert rel(got, loop) < 1e-9
    with torch.no_grad():
        res = torch.linalg.vector_norm(cell(got, xs) - got, dim=-1)
    assert bool((res <= 1e-10 * torch.linalg.vector_norm(got, dim=-1)).all())


def test_vmap_of_a_batched_problem_equals_loop(device):
    """vmap over a call with ``batched=True``: two batch dimensions, one of them vmapped."""
    cell = Cell(4).to(device)
    xs = randn_factory(6, device)(3, 2, 4)  # (vmap, batch, n)
    z0 = torch.zeros(2, 4, dtype=DT, device=device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)
    layer = lambda x: il.fixed_point(cell, z0, x, solver=solver, batched=True)  # noqa: E731
    got = vmap(layer)(xs)
    assert rel(got, torch.stack([layer(x) for x in xs])) < 1e-9
    assert rel(got, unrolled_cell(cell, xs)) < 1e-9


def test_vmap_over_an_ensemble_of_deqs_equals_loop(device):
    models = [il.nn.DEQ(Cell(4, seed=s).to(device),
                        solver=il.solvers.Anderson(rtol=1e-13, max_steps=300)) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = randn_factory(7, device)(2, 4)

    def run(params, buffers, x):
        return functional_call(base, (params, buffers), (x,))

    got = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    loop = torch.stack([m(x) for m in models])
    ref = torch.stack([unrolled_cell(m.f, x) for m in models])
    assert rel(got, loop) < 1e-9
    assert rel(got, ref) < 1e-9

    def loss(params, buffers, x):
        return run(params, buffers, x).square().sum()

    grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        eager = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
        for (name, _), e in zip(m.named_parameters(), eager, strict=True):
            assert rel(grads[name][i], e) < 1e-8, (i, name)


def test_vmap_grad_per_task_hypergradients_match_closed_form(device):
    """Each task has its own data: ``vmap(grad(ℓ ∘ w*))`` over tasks."""
    p = Ridge(device)
    randn = randn_factory(8, device)
    K, m = 4, 30
    Xs, ys = randn(K, m, p.d), randn(K, m)

    def hypergrad(lam, X, y):
        return grad(lambda lam: p.outer(p.solve(lam, X, y)))(lam)

    got = vmap(hypergrad, in_dims=(None, 0, 0))(p.lam, Xs, ys)
    for k in range(K):
        lam = leaf(p.lam)
        (loop,) = torch.autograd.grad(p.outer(p.solve(lam, Xs[k], ys[k])), lam)
        (ref,) = torch.autograd.grad(p.outer(p.closed_form(lam, Xs[k], ys[k])), lam)
        assert rel(got[k], loop) < 1e-8, k
        assert rel(got[k], ref) < 1e-8, k


# --------------------------------------------------------------------------------------------
# Batched cotangents in eager autograd
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backward", [None, il.linear.CG(), il.linear.Dense()],
                         ids=["default", "CG", "Dense"])
def test_is_grads_batched_equals_loop_and_closed_form(backward, device):
    p = Ridge(device)
    lam = leaf(p.lam)
    w = p.solve(lam, backward=backward)
    U = randn_factory(9, device)(5, p.d)
    (got,) = torch.autograd.grad(w, lam, U, is_grads_batched=True, retain_graph=True)
    loop = torch.stack([torch.autograd.grad(w, lam, u, retain_graph=True)[0] for u in U])
    J_ref = torch.autograd.functional.jacobian(p.closed_form, p.lam)
    assert rel(got, loop) < 1e-9
    assert rel(got, U @ J_ref) < 1e-8


def test_is_grads_batched_through_fixed_point(device):
    cell = Cell(4).to(device)
    x = leaf(randn_factory(10, device)(2, 4))
    z = il.fixed_point(cell, torch.zeros(2, 4, dtype=DT, device=device), x,
                       solver=il.solvers.Anderson(rtol=1e-13, max_steps=300), batched=True)
    U = randn_factory(11, device)(3, 2, 4)
    (got,) = torch.autograd.grad(z, x, U, is_grads_batched=True, retain_graph=True)
    xr = leaf(x)
    zr = unrolled_cell(cell, xr)
    ref = torch.stack([torch.autograd.grad(zr, xr, u, retain_graph=True)[0] for u in U])
    assert rel(got, ref) < 1e-8


def test_functional_jacobian_vectorized_matches_closed_form(device):
    p = Ridge(device)
    J = torch.autograd.functional.jacobian(p.solve, p.lam, vectorize=True)
    J_ref = torch.autograd.functional.jacobian(p.closed_form, p.lam)
    assert rel(J, J_ref) < 1e-8


def test_functional_jacobian_forward_mode_vectorized_is_refused_with_the_alternative(device):
    """The legacy vmap of strategy="forward-mode" cannot batch a custom function's tangents;
    the refusal names what works instead (torch.func.jacfwd, checked in test_forward_mode)."""
    p = Ridge(device)
    with pytest.raises(NotImplementedError, match="torch.func.jacfwd"):
        torch.autograd.functional.jacobian(p.solve, p.lam, vectorize=True, strategy="forward-mode")


# --------------------------------------------------------------------------------------------
# Eager autograd still reaches closed-over tensors and module parameters.
# --------------------------------------------------------------------------------------------
def test_closed_over_tensors_and_parameters_receive_gradients(device):
    p = Ridge(device)
    X = leaf(p.X)  # closed over, never passed as an argument
    lam = leaf(p.lam)
    w0 = torch.zeros(p.d, dtype=DT, device=device)
    w = il.argmin(lambda w, lam: p.fun(w, lam, X, p.y), w0, lam, solver=il.solvers.LBFGS(rtol=1e-12))
    p.outer(w).backward()
    Xr, lamr = leaf(p.X), leaf(p.lam)
    p.outer(p.closed_form(lamr, Xr, p.y)).backward()
    assert rel(X.grad, Xr.grad) < 1e-8
    assert rel(lam.grad, lamr.grad) < 1e-8

    cell = Cell(4).to(device)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
    x = randn_factory(12, device)(3, 4)
    deq(x).square().sum().backward()
    ref = torch.autograd.grad(unrolled_cell(cell, x).square().sum(), list(cell.parameters()))
    for prm, r in zip(cell.parameters(), ref, strict=True):
        assert prm.grad is not None
        assert rel(prm.grad, r) < 1e-8


def test_vmap_with_unrolled_backward_is_exact_or_refused(device):
    """An unrolled forward stops on data, which vmap cannot trace: the library either solves the
    vmapped batch correctly or refuses with an error naming the combination."""
    cell = Cell(4).to(device)
    xs = randn_factory(13, device)(3, 4)
    z0 = torch.zeros(4, dtype=DT, device=device)
    f = lambda z, x: cell(z.unsqueeze(0), x.unsqueeze(0)).squeeze(0)  # noqa: E731
    solver = il.solvers.Picard(rtol=1e-12, max_steps=500)
    layer = lambda x: il.fixed_point(f, z0, x, solver=solver,  # noqa: E731
                                     backward=il.backward.Unrolled())
    try:
        got = vmap(layer)(xs)
    except (ValueError, TypeError, NotImplementedError) as exc:
        assert re.search(r"(?i)unrolled", str(exc)) and re.search(r"(?i)vmap", str(exc)), exc
        return
    assert rel(got, torch.stack([layer(x) for x in xs])) < 1e-9


def test_is_grads_batched_with_create_graph_is_refused_with_the_alternative(device):
    p = Ridge(device)
    lam = leaf(p.lam)
    w = p.solve(lam)
    with pytest.raises(RuntimeError, match="is_grads_batched=True with create_graph=True"):
        torch.autograd.grad(w, lam, torch.eye(p.d, dtype=DT, device=device),
                            is_grads_batched=True, create_graph=True)


def test_functional_call_backward_after_the_call_uses_the_swapped_parameters(device):
    """The backward runs after functional_call has put the module's own parameters back; the
    gradient still belongs to (and is computed at) the parameters the call used."""
    lin = torch.nn.Linear(3, 3).double().to(device)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = randn_factory(5, device)(3)
    params = {k: leaf(v) for k, v in lin.named_parameters()}
    z = il.fixed_point(lambda z: torch.tanh(functional_call(lin, params, (z,)) + x),
                       torch.zeros(3, dtype=DT, device=device))
    # create_graph: the differentiable path, which calls the function again after it returned
    got_W, got_b = torch.autograd.grad(z.square().sum(), (params["weight"], params["bias"]),
                                       create_graph=True)
    W, b = leaf(params["weight"]), leaf(params["bias"])
    zr = torch.zeros(3, dtype=DT, device=device)
    for _ in range(200):
        zr = torch.tanh(zr @ W.T + b + x)
    gW, gb = torch.autograd.grad(zr.square().sum(), (W, b))
    assert rel(got_W, gW) < 1e-8 and rel(got_b, gb) < 1e-8
    assert got_W.requires_grad


def test_a_function_that_uses_new_tensors_in_the_backward_is_refused(device):
    """A deferred call that meets a tensor carrying derivatives which no captured tensor can
    stand for raises instead of dropping its derivative."""
    a = leaf(torch.tensor(0.5, dtype=DT, device=device))
    state = {"scale": a}
    z = il.fixed_point(lambda z: 0.5 * torch.cos(z) * state["scale"],
                       torch.zeros(2, dtype=DT, device=device))
    state["scale"] = leaf(torch.ones(2, 2, dtype=DT, device=device))[0]  # another shape
    with pytest.raises(RuntimeError, match="did not use when the layer was called"):
        torch.autograd.grad(z.sum(), a, create_graph=True)
