"""The measured default adjoint solver of mid-sized symmetric problems (DenseOrCG)."""

from __future__ import annotations

import functools

import pytest
import torch

import implicit_layers as il
from implicit_layers._problem import MinimiseProblem
from implicit_layers.linear import timed
from implicit_layers.linear.timed import DenseOrCG, prefer_dense, probe_columns, problem_key

F64 = torch.float64
D = 160  # above the static Dense limit (128), inside the measured band


@pytest.fixture(autouse=True)
def _fresh_choices():
    timed.timed_choices.clear()
    yield
    timed.timed_choices.clear()


def _ridge(d: int = D):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * d, d, generator=g, dtype=F64)
    y = torch.randn(2 * d, generator=g, dtype=F64)
    G, Xty = X.T @ X / (2 * d), X.T @ y / (2 * d)
    theta0 = torch.randn(d, generator=g, dtype=F64) * 0.1 - 2.0
    cot = torch.randn(d, generator=g, dtype=F64)

    def fun(w, theta):
        return 0.5 * w @ G @ w - Xty @ w + 0.5 * (theta.exp() * w * w).sum()

    def layer(theta):
        return il.argmin(fun, torch.zeros(d, dtype=F64), theta,
                         solver=il.solvers.Newton(rtol=1e-12), return_info=True)

    def reference():
        theta = theta0.clone().requires_grad_(True)
        w = torch.linalg.solve(G + torch.diag(theta.exp()), Xty)
        return torch.autograd.grad((w * cot).sum(), theta)[0]

    return layer, theta0, cot, reference()


def _grad(layer, theta0, cot, create_graph=False):
    theta = theta0.clone().requires_grad_(True)
    w, info = layer(theta)
    (g,) = torch.autograd.grad((w * cot).sum(), theta, create_graph=create_graph)
    return g, info


def test_prefer_dense_scales_the_probe_to_n_columns_and_adds_the_solve():
    # 32 columns in 0.4 ms: 200 columns in 2.5 ms, plus a 0.2 ms solve.
    assert prefer_dense(200, 2.71e-3, 0.4e-3, 0.2e-3, columns=32)
    assert not prefer_dense(200, 2.69e-3, 0.4e-3, 0.2e-3, columns=32)


def test_probe_columns_stay_between_16_and_64_and_a_quarter_of_n():
    assert [probe_columns(n) for n in (20, 64, 129, 200, 256, 1000)] == [16, 16, 32, 50, 64, 64]


@pytest.mark.parametrize("dense_wins", [True, False])
def test_first_backward_measures_then_the_choice_is_reused(monkeypatch, dense_wins):
    monkeypatch.setattr(timed, "prefer_dense", lambda *a, **k: dense_wins)
    layer, theta0, cot, ref = _ridge()
    solvers = []
    for _ in range(3):  # each call makes a new closure of the same code: the same problem
        g, info = _grad(layer, theta0, cot)
        solvers.append(info.backward.solver)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    # The first two backwards run CG and time it; the second decides.
    assert solvers == ["CG", "CG", "Dense" if dense_wins else "CG"]
    assert list(timed.timed_choices.choices.values()) == ["Dense" if dense_wins else "CG"]


def test_after_the_measurement_the_default_is_the_plain_choice(monkeypatch):
    monkeypatch.setattr(timed, "prefer_dense", lambda *a, **k: True)
    layer, theta0, cot, _ = _ridge()
    seen = []
    real = MinimiseProblem.default_adjoint_solver

    def spy(problem):
        seen.append(real(problem))
        return seen[-1]

    monkeypatch.setattr(MinimiseProblem, "default_adjoint_solver", spy)
    for _ in range(3):
        _grad(layer, theta0, cot)
    assert [type(s).__name__ for s in seen] == ["DenseOrCG", "DenseOrCG", "Dense"]


def test_a_real_measurement_gives_the_exact_gradient_either_way():
    layer, theta0, cot, ref = _ridge()
    for _ in range(3):
        g, info = _grad(layer, theta0, cot)
        assert info.backward.solver in ("CG", "Dense")
        assert bool(info.backward.converged)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    assert len(timed.timed_choices.choices) == 1


def test_under_torch_func_nothing_is_measured():
    layer, theta0, cot, ref = _ridge()
    g = torch.func.grad(lambda t: (layer(t)[0] * cot).sum())(theta0)
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    assert timed.timed_choices.choices == {}


def test_a_graph_of_the_backward_is_exact():
    layer, theta0, cot, ref = _ridge()
    g, _ = _grad(layer, theta0, cot, create_graph=True)
    torch.testing.assert_close(g.detach(), ref, rtol=1e-8, atol=1e-12)
    # A second-order product matches central finite differences of the gradient.
    theta = theta0.clone().requires_grad_(True)
    w, _ = layer(theta)
    (g,) = torch.autograd.grad((w * cot).sum(), theta, create_graph=True)
    v = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(3))
    (hv,) = torch.autograd.grad(g, theta, v)
    eps = 1e-5

    def grad_at(t):
        return _grad(layer, t, cot)[0]

    fd = (grad_at(theta0 + eps * v) - grad_at(theta0 - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-9)


def test_problem_key_sees_through_closures_partials_and_methods():
    def make(c):
        return lambda w: c * w

    assert problem_key(make(1.0)) == problem_key(make(2.0))
    assert problem_key(make(1.0)) != problem_key(lambda w: w)

    def f(w, c):
        return c * w

    assert problem_key(functools.partial(f, c=1.0)) == problem_key(f)

    class Model:
        def residual(self, w):
            return w

    assert problem_key(Model().residual) == problem_key(Model.residual)


def test_replace_keeps_the_key():
    solver = DenseOrCG().keyed("k")
    assert solver.replace(rtol=1e-6)._key == "k"
    assert solver.replace(rtol=1e-6).rtol == 1e-6


def _root(n: int = 130):
    g = torch.Generator().manual_seed(1)
    M = 2 * torch.eye(n, dtype=F64) + 0.8 * torch.randn(n, n, generator=g, dtype=F64) / n**0.5
    theta0 = torch.randn(n, generator=g, dtype=F64)
    cot = torch.randn(n, generator=g, dtype=F64)

    def F(z, theta):
        return M @ z + torch.tanh(z) - theta

    def layer(theta):
        return il.root(F, torch.zeros(n, dtype=F64), theta,
                       solver=il.solvers.Broyden(rtol=1e-12, max_steps=300), return_info=True)

    with torch.no_grad():
        z = layer(theta0)[0]
    # ∂F/∂θ = -I, so the gradient of ⟨cot, z*⟩ is (∂F/∂z)⁻ᵀ cot.
    J = M + torch.diag(1 - torch.tanh(z) ** 2)
    return layer, theta0, cot, torch.linalg.solve(J.T, cot)


@pytest.mark.parametrize("dense_wins", [True, False])
def test_a_mid_sized_root_measures_gmres_against_dense(monkeypatch, dense_wins):
    monkeypatch.setattr(timed, "prefer_dense", lambda *a, **k: dense_wins)
    layer, theta0, cot, ref = _root()
    solvers = []
    for _ in range(3):
        g, info = _grad(layer, theta0, cot)
        solvers.append(info.backward.solver)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    assert solvers == ["GMRES", "GMRES", "Dense" if dense_wins else "GMRES"]


def test_a_root_whose_gmres_fails_keeps_gmres_and_its_warning(monkeypatch):
    # F(z, a) = (z - 1)³ + a has triple roots at a = 0: ∂F/∂z = 0 there. Dense would raise.
    monkeypatch.setattr(timed, "prefer_dense", lambda *a, **k: True)
    for _ in range(2):
        a = torch.zeros(130, dtype=F64, requires_grad=True)
        z = il.root(lambda z, a: (z - 1) ** 3 + a, torch.ones(130, dtype=F64), a)
        with pytest.warns(il.ConvergenceWarning, match="GMRES.*backward"):
            (g,) = torch.autograd.grad(z.sum(), a)
        assert bool(torch.isfinite(g).all())
    assert list(timed.timed_choices.choices.values()) == ["GMRES"]


def test_small_roots_take_dense_without_measuring():
    # Below n = 128 a root takes Dense (GMRES only where the Jacobian is singular): fixed, so a
    # gradcheck sees the same values on every call.
    layer, theta0, cot, ref = _root(40)
    for _ in range(3):
        g, info = _grad(layer, theta0, cot)
        assert info.backward.solver == "Dense"
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    assert timed.timed_choices.choices == {}


def test_deterministic_mode_measures_nothing_and_keeps_the_iterative_solver(monkeypatch):
    # A choice made by timing may differ between runs; deterministic mode must not depend on it.
    monkeypatch.setattr(timed, "prefer_dense", lambda *a, **k: True)
    layer, theta0, cot, ref = _ridge()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        solvers = []
        for _ in range(3):
            g, info = _grad(layer, theta0, cot)
            solvers.append(info.backward.solver)
            torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    finally:
        torch.use_deterministic_algorithms(before)
    assert solvers == ["CG", "CG", "CG"]
    assert not timed.timed_choices.choices
