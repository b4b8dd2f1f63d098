"""``custom_root`` / ``custom_fixed_point`` around black-box solvers, gradients reaching closed-
over ``nn.Module`` parameters and ``*args``, and no graph under ``torch.no_grad()``."""

import warnings

import pytest
import torch
from torch import nn

import implicit_layers as il

DT = torch.float64


def randn_factory(seed, device):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    return randn


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class Logistic:
    """L2-regularised logistic regression; hyperparameter ``loglam`` (one per feature)."""

    def __init__(self, device, m=60, d=5):
        randn = randn_factory(0, device)
        self.X = randn(m, d)
        self.y = torch.sign(self.X @ randn(d) + 0.5 * randn(m))
        self.X_val, self.y_val = randn(20, d), torch.sign(randn(20))
        self.loglam = randn(d) - 2.0
        self.d = d

    def fun(self, w, loglam):
        margins = self.y * (self.X @ w)
        return nn.functional.softplus(-margins).mean() + 0.5 * (loglam.exp() * w**2).sum()

    def grad_w(self, w, loglam):
        """The optimality condition: ∇_w fun, differentiable in ``w`` and ``loglam``."""
        with torch.enable_grad():
            w = w if w.requires_grad else w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fun(w, loglam), w, create_graph=True)
        return g

    def outer(self, w):
        return nn.functional.softplus(-self.y_val * (self.X_val @ w)).mean()


def test_custom_root_around_torch_optim_lbfgs_matches_argmin(device):
    problem = Logistic(device)

    @il.custom_root(problem.grad_w, symmetric=True)
    def fit(w0, loglam):
        # A black box: torch.optim on a detached copy; the decorator never looks inside.
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = problem.fun(w, loglam)
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    w0 = torch.zeros(problem.d, dtype=DT, device=device)
    hypergrads = []
    for solve in (
        lambda lam: fit(w0, lam),
        lambda lam: il.argmin(problem.fun, w0, lam),
    ):
        loglam = problem.loglam.clone().requires_grad_(True)
        w = solve(loglam)
        assert w.requires_grad
        (g,) = torch.autograd.grad(problem.outer(w), loglam)
        hypergrads.append(g)
    assert rel(hypergrads[0], hypergrads[1]) < 1e-6


def test_custom_root_gradient_matches_closed_form_ridge(device):
    """``custom_root`` around a direct solve: the example from its docstring."""
    randn = randn_factory(1, device)
    X, y = randn(30, 4), randn(30)
    eye = torch.eye(4, dtype=DT, device=device)

    @il.custom_root(lambda w, lam: X.T @ (X @ w - y) + lam * w, symmetric=True)
    def ridge(w0, lam):
        return torch.linalg.solve(X.T @ X + lam * eye, X.T @ y)

    lam = torch.tensor(0.7, dtype=DT, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(ridge(torch.zeros(4, dtype=DT, device=device), lam).sum(), lam)
    lam_ref = lam.detach().clone().requires_grad_(True)
    w_ref = torch.linalg.solve(X.T @ X + lam_ref * eye, X.T @ y)
    (g_ref,) = torch.autograd.grad(w_ref.sum(), lam_ref)
    assert rel(g, g_ref) < 1e-8


def test_custom_fixed_point_matches_fixed_point(device):
    randn = randn_factory(2, device)
    W = randn(6, 6)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    U, x0 = randn(6, 3), randn(3)

    def f(z, x, W):
        return torch.tanh(W @ z + U @ x)

    @il.custom_fixed_point(f)
    def plain_loop(z0, x, W):
        z = z0
        for _ in range(300):
            z = f(z, x, W)
        return z

    z0 = torch.zeros(6, dtype=DT, device=device)
    cot = randn(6)
    grads = []
    for solve in (plain_loop, lambda z0, x, W: il.fixed_point(f, z0, x, W)):
        x, Wl = x0.clone().requires_grad_(True), W.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(solve(z0, x, Wl), (x, Wl), cot))
    for got, ref in zip(*grads, strict=True):
        assert rel(got, ref) < 1e-8


def test_module_parameters_closed_over_receive_gradients(device):
    """An ``nn.Linear`` inside ``f`` (not passed as an argument) gets the implicit gradient,
    equal to the gradient unrolled through 300 Picard steps."""
    torch.manual_seed(0)
    n, B = 5, 3
    lin = nn.Linear(n, n).to(device, DT)
    with torch.no_grad():
        lin.weight.mul_(0.6 / torch.linalg.matrix_norm(lin.weight, 2))
    x = randn_factory(3, device)(B, n)

    def f(z, x):
        return torch.tanh(lin(z) + x)

    def grads(backward, solver):
        lin.zero_grad()
        xx = x.clone().requires_grad_(True)
        z = il.fixed_point(f, torch.zeros(B, n, dtype=DT, device=device), xx,
                           solver=solver, backward=backward, batched=True)
        (z**2).sum().backward()
        return lin.weight.grad.clone(), lin.bias.grad.clone(), xx.grad.clone()

    implicit = grads(None, None)
    unrolled = grads(il.backward.Unrolled(), il.solvers.Picard(max_steps=300))
    for got, ref in zip(implicit, unrolled, strict=True):
        assert got.abs().sum() > 0
        assert rel(got, ref) < 1e-8


def test_closure_tensor_and_non_tensor_args(device):
    """Gradients reach a tensor the objective closes over and tensors in ``*args``;
    non-tensor ``*args`` pass through untouched."""
    randn = randn_factory(4, device)
    A0, b0 = randn(4, 4), randn(4)
    A_closed = (A0 @ A0.T / 4 + torch.eye(4, dtype=DT, device=device)).requires_grad_(True)
    b = b0.clone().requires_grad_(True)

    def fun(w, b, power):
        return 0.5 * w @ A_closed @ w - b @ w + (w**power).sum() / power

    w = il.argmin(fun, torch.zeros(4, dtype=DT, device=device), b, 4)
    gA, gb = torch.autograd.grad(w.sum(), (A_closed, b))

    # Reference: Dense IFT by hand. ∇²L = A + 3 diag(w²); ∂∇L/∂b = -I; ∂∇L/∂A = w ⊗ w / 2
    # symmetrised (A enters 0.5 wᵀAw).
    w_ref = w.detach()
    H = A_closed.detach() + torch.diag(3 * w_ref**2)
    u = torch.linalg.solve(H, torch.ones(4, dtype=DT, device=device))
    assert rel(gb, u) < 1e-8
    assert rel(gA, -0.5 * (torch.outer(u, w_ref) + torch.outer(w_ref, u))) < 1e-8


@pytest.mark.parametrize("kind", ["fixed_point", "root", "argmin", "custom_root"])
def test_no_graph_under_no_grad(kind, device):
    x = torch.linspace(-1, 1, 4, dtype=DT, device=device).requires_grad_(True)
    z0 = torch.zeros(4, dtype=DT, device=device)
    calls = {
        "fixed_point": lambda: il.fixed_point(lambda z, x: torch.tanh(0.5 * z + x), z0, x),
        "root": lambda: il.root(lambda z, x: 2 * z + torch.tanh(z) - x, z0, x),
        "argmin": lambda: il.argmin(lambda w, x: ((w - x) ** 2).sum() + (w**4).sum(), z0, x),
        "custom_root": lambda: il.custom_root(lambda z, x: z - x)(lambda z0, x: x.clone())(z0, x),
    }
    with torch.no_grad():
        z = calls[kind]()
    assert not z.requires_grad
    assert z.grad_fn is None
    # With grad enabled the same call does build a graph.
    assert calls[kind]().requires_grad


def test_no_parameters_requiring_grad_gives_plain_tensor(device):
    x = torch.linspace(-1, 1, 4, dtype=DT, device=device)
    z = il.fixed_point(lambda z, x: torch.tanh(0.5 * z + x), torch.zeros_like(x), x)
    assert not z.requires_grad


def test_cg_backward_on_an_undeclared_custom_root_is_the_declaration(device):
    """Choosing CG for a custom_root that was not declared symmetric treats its Jacobian as
    symmetric positive definite (as scipy, jaxopt and torchopt do): no error, the exact
    hypergradient, and no warning when it is indeed symmetric."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(20, 4, generator=gen, dtype=DT).to(device)
    y = torch.randn(20, generator=gen, dtype=DT).to(device)
    eye = torch.eye(4, dtype=DT, device=device)

    @il.custom_root(lambda w, lam: X.T @ (X @ w - y) + lam * w, backward=il.linear.CG())
    def ridge(w0, lam):
        return torch.linalg.solve(X.T @ X + lam * eye, X.T @ y)

    lam = torch.tensor(0.3, dtype=DT, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = torch.autograd.grad(ridge(torch.zeros(4, dtype=DT, device=device), lam).sum(), lam)
    ref = torch.func.grad(lambda t: torch.linalg.solve(X.T @ X + t * eye, X.T @ y).sum())(lam.detach())
    assert abs(float(got - ref)) < 1e-9 * abs(float(ref))
