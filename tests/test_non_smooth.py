"""Never a confident wrong number: a non-smooth objective is named, an unconverged solve's
backward warns on its own."""

from __future__ import annotations

import warnings

import pytest
import torch

import implicit_layers as il

D = torch.float64


def _lasso_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 8, dtype=D, generator=gen)
    y = X[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=D) + 0.1 * torch.randn(40, dtype=D, generator=gen)
    return X, y


def test_l1_objective_is_named_non_smooth_and_pointed_to_prox() -> None:
    X, y = _lasso_data()
    lam = torch.tensor(5.0, dtype=D, requires_grad=True)
    with pytest.warns(il.ConvergenceWarning) as record:
        w = il.argmin(lambda w: 0.5 * (X @ w - y).square().sum() + lam * w.abs().sum(),
                      torch.zeros(8, dtype=D), solver=il.solvers.LBFGS(max_steps=200))
        w.sum().backward()
    messages = [str(r.message) for r in record]
    assert any("looks non-smooth" in m and "prox=" in m for m in messages)
    assert any(m.startswith("backward of the argmin solve that did not converge") for m in messages)
    # The composite form of the same problem converges, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        il.argmin(lambda w: 0.5 * (X @ w - y).square().sum(), torch.zeros(8, dtype=D),
                  prox=il.prox.bind(il.prox.l1, lam))


def test_smooth_objective_is_not_called_non_smooth() -> None:
    X, y = _lasso_data()
    with pytest.warns(il.ConvergenceWarning) as record:
        il.argmin(lambda w: 0.5 * (X @ w - y).square().sum() + torch.cosh(w).sum(),
                  torch.zeros(8, dtype=D), solver=il.solvers.LBFGS(max_steps=2))
    assert all("non-smooth" not in str(r.message) for r in record)
    with pytest.warns(il.ConvergenceWarning) as record:
        il.argmin(lambda w: (w - 1).square().sum().float().square(), torch.zeros(8),
                  solver=il.solvers.GradientDescent(1e-3, max_steps=2))
    assert all("non-smooth" not in str(r.message) for r in record)


def test_backward_of_an_unconverged_sample_warns_per_sample() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=D, requires_grad=True)
    # Sample 1 starts far and gets one step; samples 0 and 2 start at their solutions.
    w0 = target.detach().clone()
    w0[1] = torch.tensor([100.0, 100.0], dtype=D)

    def fun(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((w - t) ** 2).sum(-1)

    with pytest.warns(il.ConvergenceWarning, match="did not converge in the forward"):
        w = il.argmin(fun, w0, target, batched=True,
                      solver=il.solvers.GradientDescent(1e-6, max_steps=1))
    with pytest.warns(il.ConvergenceWarning, match=r"backward of the argmin solve .*sample\(s\) 1 of 3"):
        w.sum().backward()
    # Accepted explicitly: no warning at either end.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = il.argmin(fun, w0, target, batched=True,
                      solver=il.solvers.GradientDescent(1e-6, max_steps=1, on_failure="ignore"))
        w.sum().backward()
