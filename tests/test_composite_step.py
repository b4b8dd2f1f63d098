"""The composite argmin's gradient does not depend on a step size: neither on the forward
solver's (ProximalGradient(step_size=...)) nor on the step η of the proximal-gradient residual
``w - prox(w - η ∇fun(w), η)`` that the backward differentiates. Checked against central
differences of tight solves, for a prox with a 0/1 Jacobian (l1), one whose Jacobian depends on
η (elastic net) and a projection whose Jacobian is not diagonal (simplex)."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from implicit_layers import _composite

D = torch.float64
G = torch.Generator().manual_seed(0)
X = torch.randn(30, 8, generator=G, dtype=D)
Y = X @ torch.randn(8, generator=G, dtype=D) + 0.3 * torch.randn(30, generator=G, dtype=D)
C = torch.randn(8, generator=G, dtype=D)
# 1 / the Lipschitz constant of the smooth part's gradient.
STEP = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / 30).max())

PENALTIES = {
    "l1": lambda lam: {"prox": lambda w, step: il.prox.l1(w, lam, step)},
    "elastic net": lambda lam: {"prox": lambda w, step: il.prox.elastic_net(w, lam, 0.5, step)},
    "simplex": lambda lam: {"constraint": lambda w: il.projection.simplex(w, 1.0 + lam)},
}


def _loss(penalty: str, lam: torch.Tensor, y: torch.Tensor, step_size: float) -> torch.Tensor:
    solver = il.solvers.ProximalGradient(step_size, rtol=1e-14, max_steps=20000, on_failure="ignore")
    w = il.argmin(lambda w, y: 0.5 * (X @ w - y).square().mean(), torch.zeros(8, dtype=D), y,
                  solver=solver, **PENALTIES[penalty](lam))
    return C @ w


def _grads(penalty: str, step_size: float) -> torch.Tensor:
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    y = Y.clone().requires_grad_()
    g_lam, g_y = torch.autograd.grad(_loss(penalty, lam, y, step_size), (lam, y))
    return torch.cat([g_lam.reshape(1), g_y])


def _central_differences(penalty: str, h: float = 1e-6) -> torch.Tensor:
    def value(dlam: float, dy: torch.Tensor) -> float:
        with torch.no_grad():
            return float(_loss(penalty, torch.tensor(0.3 + dlam, dtype=D), Y + dy, STEP))

    out = [(value(h, 0 * Y) - value(-h, 0 * Y)) / (2 * h)]
    for i in range(Y.numel()):
        e = torch.zeros_like(Y)
        e[i] = h
        out.append((value(0.0, e) - value(0.0, -e)) / (2 * h))
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_gradient_is_the_same_for_every_step_and_matches_central_differences(penalty, monkeypatch):
    reference = _grads(penalty, STEP)
    # The solution is sparse (else the test says nothing about the free coordinates).
    with torch.no_grad():
        lam = torch.tensor(0.3, dtype=D)
        solver = il.solvers.ProximalGradient(STEP, rtol=1e-14, max_steps=20000)
        w = il.argmin(lambda w: 0.5 * (X @ w - Y).square().mean(), torch.zeros(8, dtype=D),
                      solver=solver, **PENALTIES[penalty](lam))
    assert 0 < int((w != 0).sum()) < 8, w
    # The forward's step: a tenth of 1/L.
    torch.testing.assert_close(_grads(penalty, 0.1 * STEP), reference, rtol=1e-9, atol=1e-11)
    # The backward residual's step η, far from 1 both ways.
    for eta in (0.05, 20.0):
        monkeypatch.setattr(_composite, "RESIDUAL_STEP", eta)
        torch.testing.assert_close(_grads(penalty, STEP), reference, rtol=1e-9, atol=1e-11)
    monkeypatch.undo()
    fd = _central_differences(penalty)
    torch.testing.assert_close(reference, fd, rtol=1e-6, atol=1e-7)
