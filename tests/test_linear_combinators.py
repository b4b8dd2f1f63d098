"""Linear solvers made of solvers (il.linear.combinators, il.linear.timed) and the split
between the implicit core (mechanism) and the backward modes (which solver to use)."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import implicit_layers as il
from implicit_layers import _choose_linear, _folded, _implicit
from implicit_layers._problem import FixedPointProblem, MinimiseProblem, Problem, RootProblem

F64 = torch.float64


def _contraction(B: int = 3, n: int = 5, seed: int = 0, norm: float = 0.5) -> torch.Tensor:
    """``A = I - M`` with ``‖M‖ = norm``, batched ``(B, n, n)``."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=F64)
    M = norm * M / torch.linalg.matrix_norm(M, ord=2).reshape(B, 1, 1)
    return torch.eye(n, dtype=F64) - M


def test_dense_then_gmres_falls_back_on_a_singular_sample():
    A = _contraction()
    A[0] = 0.0  # singular: Dense raises for the batch, GMRES solves each sample it can
    b = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    x, info = il.linear.DenseThenGMRES(rtol=1e-12, on_failure="ignore").solve(
        il.linear.MatrixOperator(A), b)
    assert info.solver == "GMRES"
    assert info.converged.tolist() == [False, True, True]
    torch.testing.assert_close(x[1:], torch.linalg.solve(A[1:], b[1:]), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(x).all()


def test_dense_then_gmres_is_dense_when_it_can():
    A = _contraction()
    b = torch.ones(3, 5, dtype=F64)
    x, info = il.linear.DenseThenGMRES().solve(il.linear.MatrixOperator(A), b)
    assert info.solver == "Dense"
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def _neumann_sum(A: torch.Tensor, b: torch.Tensor, steps: int, eta: torch.Tensor) -> torch.Tensor:
    """``u_{k+1} = u_k + η (b - A u_k)`` from zero, by hand."""
    u = torch.zeros_like(b)
    for _ in range(steps):
        u = u + eta * (b - (A @ u.unsqueeze(-1)).squeeze(-1))
    return u


@pytest.mark.parametrize("eta", [0.7, torch.tensor([0.3, 0.6, 0.9], dtype=F64)])
def test_steps_on_failure_replaces_only_the_failed_samples(eta):
    n = 30
    A = _contraction(3, n, norm=0.05)
    A[2] = _contraction(1, n, seed=3, norm=0.99)[0]  # slow: 12 GMRES steps cannot finish it
    b = torch.randn(3, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    inner = il.linear.GMRES(n, rtol=1e-10, max_steps=12)
    solver = il.linear.StepsOnFailure(inner, steps=4, step_size=lambda: eta, label="Phantom")
    exact, exact_info = inner.replace(on_failure="ignore").solve(il.linear.MatrixOperator(A), b)
    assert exact_info.converged.tolist() == [True, True, False]  # the premise
    with pytest.warns(il.ConvergenceWarning, match=r"for 1 of 3 sample\(s\).*Phantom gradient"):
        x, info = solver.solve(il.linear.MatrixOperator(A), b)
    eta_b = eta.reshape(-1, 1) if isinstance(eta, torch.Tensor) else torch.tensor(eta, dtype=F64)
    torch.testing.assert_close(x[:2], exact[:2])
    torch.testing.assert_close(x[2], _neumann_sum(A, b, 4, eta_b)[2])
    assert info.converged.tolist() == [True, True, False]


def test_steps_on_failure_asks_for_the_step_size_only_on_failure():
    def no_step():
        raise ValueError("no step size")

    solver = il.linear.StepsOnFailure(il.linear.Dense(), steps=2, step_size=no_step)
    A = _contraction()
    x, _ = solver.solve(il.linear.MatrixOperator(A), torch.ones(3, 5, dtype=F64))
    torch.testing.assert_close(x, torch.linalg.solve(A, torch.ones(3, 5, dtype=F64)))
    assert not solver.uses_initial_guess  # Dense inside: no start point is asked for


def test_steps_on_failure_bad_arguments():
    with pytest.raises(TypeError, match="solver must be an il.linear solver.*got str"):
        il.linear.StepsOnFailure("GMRES", steps=2, step_size=lambda: 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step_size must be a callable.*got float"):
        il.linear.StepsOnFailure(il.linear.GMRES(), steps=2, step_size=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        il.linear.StepsOnFailure(il.linear.GMRES(), steps=0, step_size=lambda: 1.0)


def test_the_timed_choices_are_inspectable_and_clearable():
    cache = il.linear.timed_choices
    cache.clear()
    d = 160  # above the static Dense limit: the default measures
    G = torch.eye(d, dtype=F64) * 2.0
    theta = torch.ones(d, dtype=F64, requires_grad=True)
    for _ in range(2):
        w = il.argmin(lambda w, t: 0.5 * (w * (G @ w)).sum() - (t * w).sum(),
                      torch.zeros(d, dtype=F64), theta)
        (g,) = torch.autograd.grad(w.sum(), theta)
        torch.testing.assert_close(g, torch.full((d,), 0.5, dtype=F64))
    assert len(cache) == 1 and list(cache.choices.values())[0] in ("Dense", "CG")
    assert il.linear.DenseOrCG.cache is cache and "1 choices" in repr(cache)
    cache.clear()
    assert len(cache) == 0 and _choose_linear._choices == {}


def test_moved_names_keep_working():
    assert il.solvers.adaptive.NeumannThenGMRES is il.linear.NeumannThenGMRES
    assert _choose_linear.DenseElseGMRES is il.linear.DenseThenGMRES
    assert _choose_linear.DenseOrCG is il.linear.DenseOrCG


def test_the_core_does_not_import_the_backward_modes():
    tree = ast.parse(inspect.getsource(_implicit))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "backward" not in imported and not any("backward" in (m or "") for m in imported)


def test_problem_classes_own_their_default_solvers():
    z0 = torch.zeros(4, dtype=F64)
    fp = Problem("fixed_point", lambda z: z, (), z0, batched=False, name="f")
    root = Problem("root", lambda z: z, (), z0, batched=False, name="F")
    mini = Problem("argmin", lambda w: (w**2).sum(), (), z0, batched=False, name="fun")
    assert type(fp.default_adjoint_solver()) is il.linear.GMRES
    assert type(root.default_adjoint_solver()) is il.linear.DenseThenGMRES
    assert type(mini.default_adjoint_solver()) is il.linear.Dense
    assert type(FixedPointProblem.default_forward_solver()) is il.solvers.Adaptive
    assert type(RootProblem.default_forward_solver()) is il.solvers.Broyden
    assert type(MinimiseProblem.default_forward_solver()) is il.solvers.LBFGS


def test_a_folded_problem_answers_new_policy_of_its_kind():
    class Tagged(RootProblem):
        custom_policy = "from the kind"

    base = Tagged("root", lambda z, s: z * s, (), torch.zeros(2, 3, dtype=F64), batched=True,
                  name="F")
    folded = _folded.FoldedProblem(base, 4, [0], [torch.ones(4, 1, dtype=F64)])
    assert folded.custom_policy == "from the kind"
    assert folded.batch == 8 and folded.kind == "root" and folded.fn is base.fn
    assert folded.adjoint_structure() == base.adjoint_structure()


@pytest.mark.parametrize("accelerated, expected", [(False, "NeumannThenGMRES"), (True, "GMRES")])
def test_adaptive_backward_follows_what_the_forward_did_not_its_name(accelerated, expected):
    info = il.SolveInfo(converged=torch.tensor([True]), steps=torch.tensor([30]),
                        residual=torch.tensor([1e-12], dtype=F64), solver="renamed",
                        contraction=torch.tensor([0.5], dtype=F64), accelerated=accelerated)
    chosen = il.solvers.Adaptive().adjoint_solver(info)
    assert type(chosen).__name__ == expected


def test_the_fallback_under_torch_func_grad_and_vmap():
    g = torch.Generator().manual_seed(4)
    W = 0.6 * torch.randn(6, 6, generator=g, dtype=F64) / 6**0.5
    xs = torch.randn(3, 6, generator=g, dtype=F64)
    starved = il.backward.Implicit(il.linear.GMRES(1, rtol=1e-12, max_steps=1),
                                   fallback=il.backward.JacobianFree())

    def loss(x, backward):
        z = il.fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(6, dtype=F64), x,
                           backward=backward)
        return (z**2).sum()

    with pytest.warns(il.ConvergenceWarning, match="JacobianFree gradient"):
        got = torch.func.vmap(torch.func.grad(lambda x: loss(x, starved)))(xs)
    want = torch.stack([torch.func.grad(lambda x: loss(x, il.backward.JacobianFree()))(x)
                        for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    exact = torch.func.vmap(torch.func.grad(lambda x: loss(x, il.linear.Dense())))(xs)
    assert float((exact - got).abs().max()) > 1e-3  # the fallback really replaced the solve
