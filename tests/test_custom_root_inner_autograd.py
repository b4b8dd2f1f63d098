"""custom_root around inner loops that differentiate with respect to their own variables.

The loop below follows the shape of torchopt's implicit-differentiation tutorial: the inner
parameters, a tuple of tensors, are fitted by a hand-written gradient-descent loop that calls
``torch.autograd.grad(loss, params)`` on its own iterates, regularised towards meta-parameters;
the decorated solver is then differentiated with respect to the meta-parameters through the
stationarity condition. Reference: the closed-form ridge solution, differentiated through
``torch.linalg.solve``.
"""

import pytest
import torch

import implicit_layers as il

DT = torch.float64
LAM = 2.0


def inner_loss(params, meta_params, x, y):
    w, b = params
    mw, mb = meta_params
    fit = ((x @ w + b - y) ** 2).mean()
    return fit + LAM / 2 * (((w - mw) ** 2).sum() + (b - mb) ** 2)


def stationary(params, meta_params, data):
    x, y = data
    with torch.enable_grad():
        params = tuple(p if p.requires_grad else p.detach().requires_grad_(True) for p in params)
        return torch.autograd.grad(inner_loss(params, meta_params, x, y), params, create_graph=True)


@il.custom_root(stationary, symmetric=True)
def solve(params, meta_params, data):
    x, y = data
    for _ in range(400):
        loss = inner_loss(params, meta_params, x, y)
        grads = torch.autograd.grad(loss, params)
        params = tuple(p - 0.1 * g for p, g in zip(params, grads, strict=True))
    return params


def closed_form(meta_params, x, y):
    """``argmin`` of the inner loss: ``(2/n XaᵀXa + λ I) θ = 2/n Xaᵀ y + λ m``, ``Xa = [x, 1]``."""
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=DT)], dim=1)
    m = torch.cat([meta_params[0], meta_params[1].reshape(1)])
    H = 2 / x.shape[0] * xa.T @ xa + LAM * torch.eye(xa.shape[1], dtype=DT)
    theta = torch.linalg.solve(H, 2 / x.shape[0] * xa.T @ y + LAM * m)
    return theta[:-1], theta[-1]


def test_torchopt_style_inner_loop_meta_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen, dtype=DT), torch.randn(40, generator=gen, dtype=DT)
    x_val, y_val = torch.randn(20, 3, generator=gen, dtype=DT), torch.randn(20, generator=gen, dtype=DT)
    meta = (torch.randn(3, generator=gen, dtype=DT).requires_grad_(True),
            torch.tensor(0.3, dtype=DT, requires_grad=True))
    init = (torch.zeros(3, dtype=DT), torch.zeros((), dtype=DT))

    def outer(params):
        return ((x_val @ params[0] + params[1] - y_val) ** 2).mean()

    params = solve(init, meta, (x, y))
    grads = torch.autograd.grad(outer(params), meta)
    ref_params = closed_form(meta, x, y)
    ref_grads = torch.autograd.grad(outer(ref_params), meta)
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-11)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)


def test_inner_loop_on_a_detached_argument_gets_our_message():
    t = torch.ones(2, dtype=DT, requires_grad=True)

    @il.custom_root(lambda z, t: z - t)
    def fit(z0, t):
        torch.autograd.grad((t**2).sum(), t)  # differentiates an argument, not its own variable
        return t

    with pytest.raises(RuntimeError, match="args, kwargs"):
        fit(torch.zeros(2, dtype=DT), t)


def test_clone_into_own_leaf_keeps_working_without_a_retry():
    target = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    seen = []

    @il.custom_root(lambda z, t: z - t, symmetric=True)
    def fit(z0, t):
        seen.append(z0.requires_grad)
        z = z0.clone().requires_grad_(True)  # torch.optim needs its own leaf
        opt = torch.optim.SGD([z], lr=0.5)
        for _ in range(100):
            opt.zero_grad()
            ((z - t) ** 2).sum().mul(0.5).backward()
            opt.step()
        return z.detach()

    z = fit(torch.zeros(2, dtype=DT), target)
    torch.testing.assert_close(z, target.detach(), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(z.sum(), target)
    torch.testing.assert_close(g, torch.ones(2, dtype=DT))
    assert seen == [False]  # one run on the detached z0: no retry was needed
