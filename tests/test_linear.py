"""Tests of the linear solvers in ``implicit_layers.linear``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit_layers as il
from implicit_layers import ConvergenceError, ConvergenceWarning, NonFiniteError
from implicit_layers._config import default_rtol
from implicit_layers.linear import (
    CG,
    GMRES,
    MINRES,
    BiCGStab,
    Broyden,
    FunctionOperator,
    LiSSA,
    MatrixOperator,
)
from tests import registry

F64, F32 = torch.float64, torch.float32


pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------------
# Problem generators. Every spectrum is kept in a known range so that the error of a solution
# whose residual meets rtol is bounded by cond * rtol.


def _orth(g: torch.Generator, batch: int, n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=F64, generator=g))
    return q


def _sym_from_eigs(g: torch.Generator, eigs: torch.Tensor) -> torch.Tensor:
    q = _orth(g, eigs.shape[0], eigs.shape[1])
    a = q @ torch.diag_embed(eigs) @ q.mT
    return (a + a.mT) / 2


def make_problem(kind: str, batch: int, n: int, seed: int, dtype: torch.dtype):
    """Return ``(A, b)`` with ``A`` of shape (B, n, n) of the given kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "spd":  # eigenvalues in [1, 5]
        a = _sym_from_eigs(g, 1 + 4 * torch.rand(batch, n, dtype=F64, generator=g))
    elif kind == "indef":  # eigenvalues in ±[1, 4], both signs present
        mag = 1 + 3 * torch.rand(batch, n, dtype=F64, generator=g)
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)
        a = _sym_from_eigs(g, mag * sign)
    elif kind == "nonsym":  # 3 I + Gaussian / sqrt(n): eigenvalues in a disc around 3
        a = 3 * torch.eye(n, dtype=F64) + torch.randn(batch, n, n, dtype=F64, generator=g) / n**0.5
    elif kind == "contract":  # I - M with ||M||_2 = 0.6 (a contractive fixed point)
        m = torch.randn(batch, n, n, dtype=F64, generator=g)
        m = 0.6 * m / torch.linalg.matrix_norm(m, ord=2).reshape(batch, 1, 1)
        a = torch.eye(n, dtype=F64) - m
    else:
        raise AssertionError(kind)
    b = torch.randn(batch, n, dtype=F64, generator=g)
    return a.to(dtype), b.to(dtype)


def rel_err(x: torch.Tensor, x_ref: torch.Tensor) -> float:
    return float((torch.linalg.vector_norm(x - x_ref, dim=-1)
                  / torch.linalg.vector_norm(x_ref, dim=-1)).max())


# ----------------------------------------------------------------------------------------------
# Conformance: every linear solver of the registry on every kind of system it handles.

#: Settings the conformance problems need beyond the registry's.
CONFORMANCE_SETTINGS = {"Neumann": {"max_steps": 2000}, "LiSSA": {"max_steps": 3000}}


def conformance_solver(case: registry.SolverCase, dtype: torch.dtype):
    extra = dict(CONFORMANCE_SETTINGS.get(case.name, {}))
    if case.estimator:  # LiSSA's own default rtol is loose (1e-2)
        extra["rtol"] = default_rtol(dtype)
    return case.make(**extra)


CASES = [
    pytest.param(case, kind, dt, id=f"{case.name}-{kind}-{str(dt)[6:]}")
    for case in registry.linear(variants=True)
    for kind in case.handles
    for dt in (F64, F32)
]
TOL = {F64: 1e-8, F32: 1e-4}


@pytest.mark.parametrize("case,kind,dtype", CASES)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), n=st.integers(1, 24))
def test_conformance_against_torch_solve(case, kind, dtype, seed, batch, n):
    solver = conformance_solver(case, dtype)
    a, b = make_problem(kind, batch, n, seed, dtype)
    x, info = il.linear.solve(a, b, solver)
    x_ref = torch.linalg.solve(a.double(), b.double())
    assert x.shape == b.shape and x.dtype == dtype
    assert info.converged.shape == (batch,) and bool(info.converged.all())
    assert info.solver == solver.name
    assert rel_err(x.double(), x_ref) < TOL[dtype]
    # The reported residual is the true residual of the returned solution.
    true_res = torch.linalg.vector_norm(b - (a @ x.unsqueeze(-1)).squeeze(-1), dim=-1)
    torch.testing.assert_close(info.residual, true_res, rtol=1e-2, atol=10 * float(info.tolerance.max()))
    assert bool((info.residual <= info.tolerance * (1 if case.iterative else 1e3)).all())


@pytest.mark.parametrize("case", registry.params(registry.linear(iterative=True, estimator=False)))
def test_warm_start_at_solution_takes_no_steps(case):
    kind = "nonsym" if "nonsym" in case.handles else "spd"
    a, b = make_problem(kind, 3, 10, 0, F64)
    x_ref = torch.linalg.solve(a, b)
    x, info = il.linear.solve(a, b, conformance_solver(case, F64), x0=x_ref)
    assert bool(info.converged.all()) and int(info.steps.max()) == 0
    assert rel_err(x, x_ref) < 1e-12


def test_zero_rhs_gives_zero():
    a, _ = make_problem("nonsym", 2, 5, 1, F64)
    for solver in (GMRES(), BiCGStab(), Broyden(), MINRES(), CG()):
        mat = (a + a.mT) if solver.needs_symmetric else a
        x, info = il.linear.solve(mat, torch.zeros(2, 5, dtype=F64), solver)
        assert bool((x == 0).all()) and bool(info.converged.all())


# ----------------------------------------------------------------------------------------------
# Agreement with scipy.sparse.linalg.


def _wishart(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, dtype=F64, generator=g)
    return m @ m.T / n + 0.5 * torch.eye(n, dtype=F64), torch.randn(n, dtype=F64, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rtol", [1e-3, 1e-6, 1e-10])
def test_cg_iteration_count_matches_scipy(seed, rtol):
    a, b = _wishart(seed, 100)
    count = [0]

    def callback(_xk):
        count[0] += 1

    x_sp, flag = sla.cg(a.numpy(), b.numpy(), rtol=rtol, atol=0.0, maxiter=1000, callback=callback)
    assert flag == 0
    x, info = il.linear.solve(a, b, CG(rtol=rtol), positive_definite=True)
    assert abs(int(info.steps) - count[0]) <= 1
    assert np.linalg.norm(x.numpy() - x_sp) <= 10 * rtol * np.linalg.norm(x_sp) * 10


@pytest.mark.parametrize(
    "scipy_fn,solver,kind",
    [
        (sla.cg, CG(), "spd"),
        (sla.minres, MINRES(), "indef"),
        (sla.gmres, GMRES(), "nonsym"),
        (sla.gmres, GMRES(), "indef"),
        (sla.bicgstab, BiCGStab(), "nonsym"),
    ],
    ids=["cg", "minres", "gmres-nonsym", "gmres-indef", "bicgstab"],
)
def test_solutions_agree_with_scipy(scipy_fn, solver, kind):
    a, b = make_problem(kind, 1, 60, 7, F64)
    x_sp, flag = scipy_fn(a[0].numpy(), b[0].numpy(), rtol=1e-10, maxiter=2000)
    assert flag == 0
    x, info = il.linear.solve(a[0], b[0], solver)
    assert bool(info.converged)
    assert np.linalg.norm(x.numpy() - x_sp) <= 1e-8 * np.linalg.norm(x_sp)


# ----------------------------------------------------------------------------------------------
# Per-sample convergence: one hard system does not change the others.

#: Step budgets (and a step size for the series) that let the hard system converge.
PER_SAMPLE_SETTINGS = {
    "Neumann": {"max_steps": 20000, "alpha": 0.5},
    "LiSSA": {"rtol": 1e-10, "scale": 2.0, "max_steps": 20000},
}


@pytest.mark.parametrize("case", registry.params(registry.linear(iterative=True)))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_per_sample_convergence(case, dtype):
    name = case.name
    n = 30
    g = torch.Generator().manual_seed(3)
    easy = 1 + 0.5 * torch.rand(3, n, dtype=F64, generator=g)  # eigenvalues in [1, 1.5]
    hard = torch.logspace(-1.7, 0, n, dtype=F64).unsqueeze(0)  # cond 50, eigenvalues <= 1
    eigs = torch.cat([easy[:1], hard, easy[1:]])
    a = _sym_from_eigs(g, eigs).to(dtype)
    b = torch.randn(4, n, dtype=F64, generator=g).to(dtype)
    if dtype == F32 and name in ("Neumann", "LiSSA"):
        pytest.skip("the slow series does not reach float32 rtol on the hard system")
    solver = case.make(**PER_SAMPLE_SETTINGS.get(name, {"max_steps": 3000}))
    x, info = il.linear.solve(a, b, solver, positive_definite=True)
    assert bool(info.converged.all())
    hard_steps = int(info.steps[1])
    for i in (0, 2, 3):
        assert int(info.steps[i]) < hard_steps
        for check_every in (1, 7):
            xi, infoi = il.linear.solve(
                a[i], b[i], solver.replace(check_every=check_every), positive_definite=True
            )
            assert int(infoi.steps) == int(info.steps[i])
            torch.testing.assert_close(xi, x[i], rtol=1e-12 if dtype == F64 else 1e-5, atol=0.0)
    # The result does not depend on how often the loop synchronises (check_every).
    x5, info5 = il.linear.solve(a, b, solver.replace(check_every=5), positive_definite=True)
    assert torch.equal(info5.steps, info.steps)
    torch.testing.assert_close(x5, x, rtol=1e-12 if dtype == F64 else 1e-5, atol=0.0)


# ----------------------------------------------------------------------------------------------
# Failure reporting.

@pytest.mark.parametrize("case", registry.params(registry.linear(iterative=True)))
def test_non_convergence_is_reported(case):
    name = case.name
    a, b = make_problem("spd", 3, 30, 5, F64)
    make = case.make
    with pytest.warns(ConvergenceWarning, match=f"{name} did not converge"):
        x, info = il.linear.solve(a, b, make(max_steps=2), positive_definite=True)
    assert not bool(info.converged.any())
    assert bool((info.steps <= 2).all()) and bool((info.residual > info.tolerance).all())
    with pytest.raises(ConvergenceError, match="max_steps"):
        il.linear.solve(a, b, make(max_steps=2, on_failure="raise"), positive_definite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = il.linear.solve(
            a, b, make(max_steps=2, on_failure="ignore"), positive_definite=True
        )
    assert not bool(info.converged.any())


@pytest.mark.parametrize("dtype", [F64, F32])
def test_gmres_happy_breakdown(dtype):
    # Two distinct eigenvalues: the Krylov space is invariant after 2 steps, so GMRES is exact
    # there (h_{3,2} = 0) and must stop without dividing by zero.
    g = torch.Generator().manual_seed(0)
    eigs = torch.tensor([1.0] * 6 + [3.0] * 6, dtype=F64).expand(2, 12)
    a = _sym_from_eigs(g, eigs)
    a[1] = a[1] + 0.5 * torch.eye(12, dtype=F64)  # second sample: eigenvalues 1.5 and 3.5
    b = torch.randn(2, 12, dtype=F64, generator=g)
    a, b = a.to(dtype), b.to(dtype)
    x, info = il.linear.solve(a, b, GMRES())
    assert bool(info.converged.all()) and info.steps.tolist() == [2, 2]
    assert rel_err(x.double(), torch.linalg.solve(a.double(), b.double())) < TOL[dtype]
    a_id = torch.eye(5, dtype=dtype)
    x, info = il.linear.solve(a_id, torch.ones(5, dtype=dtype), GMRES())
    assert int(info.steps) == 1 and bool(info.converged)
    assert bool((x == 1).all())


def test_gmres_stagnation_is_reported_not_looped():
    # A singular operator with b outside its range: GMRES cannot converge and must say so.
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    b = torch.ones(3, dtype=F64)
    with pytest.warns(ConvergenceWarning):
        x, info = il.linear.solve(a, b, GMRES(max_steps=1000))
    assert not bool(info.converged) and int(info.steps) < 1000
    torch.testing.assert_close(x[:2], torch.tensor([1.0, 0.5], dtype=F64))


@pytest.mark.parametrize("case", registry.params(registry.linear()))
@pytest.mark.parametrize("where", ["b", "operator"])
def test_nan_raises_non_finite_error(case, where):
    a, b = make_problem("spd", 2, 8, 2, F64)
    if where == "b":
        b[1, 3] = float("nan")
        with pytest.raises(NonFiniteError):
            il.linear.solve(a, b, case.make(), positive_definite=True)
    else:
        def mv(v):
            out = (a @ v.unsqueeze(-1)).squeeze(-1)
            return out * float("nan")

        op = FunctionOperator(mv, 2, 8, F64, "cpu", symmetric=True, positive_definite=True)
        with pytest.raises(NonFiniteError):
            il.linear.solve(op, b, case.make())


def test_dense_names_a_non_finite_right_hand_side_not_the_matrix():
    a, b = make_problem("spd", 2, 8, 2, F64)
    b[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="right-hand side holds NaN/Inf.*not the cause"):
        il.linear.solve(a, b, il.linear.Dense())
    singular = torch.zeros(2, 8, 8, dtype=F64)
    with pytest.raises(NonFiniteError, match="matrix is singular"):
        il.linear.solve(singular, torch.ones(2, 8, dtype=F64), il.linear.Dense())


# ----------------------------------------------------------------------------------------------
# Error paths.


def test_choosing_cg_declares_an_untagged_operator_symmetric():
    a, b = make_problem("spd", 1, 5, 0, F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a symmetric operator passes the probe silently
        x, info = il.linear.solve(lambda v: a[0] @ v, b[0], CG())
    assert bool(info.converged) and info.solver == "CG"
    assert rel_err(x.unsqueeze(0), torch.linalg.solve(a, b)) < 1e-8
    d = torch.linspace(1.0, 3.0, 7, dtype=F64)
    x, info = il.linear.solve(lambda v: d * v, torch.ones(7, dtype=F64), solver=CG())
    torch.testing.assert_close(x, 1 / d)


def test_cg_rejects_operator_tagged_non_symmetric():
    a, b = make_problem("spd", 1, 5, 0, F64)
    with pytest.raises(ValueError, match=r"CG needs a symmetric operator.*symmetric=False.*GMRES"):
        il.linear.solve(lambda v: a[0] @ v, b[0], CG(), symmetric=False)
    op = FunctionOperator(lambda v: v @ a[0], 1, 5, F64, "cpu", symmetric=False)
    with pytest.raises(ValueError, match="MINRES needs a symmetric operator"):
        il.linear.solve(op, b, MINRES())


def test_cg_probe_warns_on_a_clearly_non_symmetric_operator():
    a, b = make_problem("nonsym", 1, 8, 0, F64)
    with pytest.warns(il.StructureWarning, match=r"CG assumes a symmetric operator.*GMRES") as rec:
        il.linear.solve(lambda v: a[0] @ v, b[0], CG(on_failure="ignore"))
    assert [w.filename for w in rec] == [__file__]  # the caller's line, not the library's
    # The probe draws from its own generator: the global random state is left alone.
    state = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        il.linear.solve(lambda v: a[0] @ v, b[0], CG(on_failure="ignore"))
    assert torch.equal(state, torch.random.get_rng_state())


def test_cg_rejects_indefinite_tag():
    a, b = make_problem("spd", 1, 5, 0, F64)
    with pytest.raises(ValueError, match=r"CG needs a positive-definite.*MINRES"):
        il.linear.solve(a[0], b[0], CG(), positive_definite=False)


def test_minres_rejects_non_symmetric():
    a, b = make_problem("nonsym", 1, 5, 0, F64)
    with pytest.raises(ValueError, match=r"MINRES needs a symmetric operator"):
        il.linear.solve(a[0], b[0], MINRES())


def test_bad_b():
    a = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match=r"b must have shape \(n,\) or \(B, n\)"):
        il.linear.solve(a, torch.ones(1, 3, 1, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        il.linear.solve(a, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="acts on vectors of size 3"):
        il.linear.solve(a, torch.ones(4, dtype=F64))


def test_callable_with_wrong_shape():
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"callable\) must return a tensor shaped like its input"):
        il.linear.solve(lambda v: v[:2], b, GMRES())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: GMRES(max_steps=0), ValueError, "max_steps must be >= 1, got 0"),
        (lambda: CG(rtol=-1), ValueError, "rtol must be >= 0, got -1"),
        (lambda: MINRES(atol=-1.0), ValueError, "atol must be >= 0"),
        (lambda: GMRES(restart=0), ValueError, "restart must be >= 1, got 0"),
        (lambda: GMRES(restart=2.5), TypeError, "restart must be an int, got float 2.5"),
        (lambda: BiCGStab(check_every=0), ValueError, "check_every must be >= 1"),
        (lambda: Broyden(memory=0), ValueError, "memory must be >= 1, got 0"),
        (lambda: Broyden(line_search="yes"), TypeError, "line_search must be True or False"),
        (lambda: LiSSA(scale=0.0), ValueError, "scale must be > 0"),
        (lambda: LiSSA(scale=-1.0), ValueError, "scale must be >= 0"),
        (lambda: LiSSA(damping=1.5), ValueError, r"damping must be in \[0, 1\), got 1.5"),
        (lambda: LiSSA(repeats=0), ValueError, "repeats must be >= 1, got 0"),
        (lambda: LiSSA(depth=0), ValueError, "depth must be >= 1, got 0"),
        (lambda: LiSSA(depth=10, max_steps=20), ValueError, "give only one of them"),
        (lambda: CG(on_failure="loud"), ValueError, "on_failure must be one of"),
    ],
)
def test_bad_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ----------------------------------------------------------------------------------------------
# LiSSA.


def test_lissa_deterministic_solves_documented_system():
    a, b = make_problem("spd", 3, 20, 11, F64)
    for damping in (0.0, 0.05):
        scale = 6.0
        solver = LiSSA(rtol=1e-10, scale=scale, damping=damping, depth=5000)
        y, info = il.linear.solve(a, b, solver)
        shifted = a + damping * scale * torch.eye(20, dtype=F64)
        assert bool(info.converged.all())
        assert rel_err(y, torch.linalg.solve(shifted, b)) < 1e-8


def test_lissa_default_rtol_and_scale():
    assert LiSSA().rtol == 1e-2
    assert LiSSA().rtol is not None  # so a backward solve does not inherit the forward's
    assert LiSSA(depth=7).max_steps == 7 == LiSSA(max_steps=7).depth
    a, b = make_problem("spd", 2, 15, 4, F64)
    y, info = il.linear.solve(a, b, LiSSA(rtol=1e-6))  # scale estimated by power iteration
    assert bool(info.converged.all())
    assert rel_err(y, torch.linalg.solve(a, b)) < 1e-5


def test_lissa_stochastic_operator():
    # A = mean of rank-one PSD terms a_i a_iᵀ over a data set + ridge; each product uses a
    # fresh random minibatch. The average over repeats estimates A⁻¹ b.
    n_data, n, minibatch, ridge = 2000, 10, 50, 0.1
    g = torch.Generator().manual_seed(0)
    data = torch.randn(n_data, n, dtype=F64, generator=g) * torch.linspace(0.5, 2.0, n, dtype=F64)
    a_full = data.T @ data / n_data + ridge * torch.eye(n, dtype=F64)
    b = torch.randn(1, n, dtype=F64, generator=g)

    def minibatch_hvp(v):
        rows = data[torch.randint(0, n_data, (minibatch,), generator=g)]
        return (v @ rows.T) @ rows / minibatch + ridge * v

    op = FunctionOperator(minibatch_hvp, 1, n, F64, "cpu", symmetric=True)
    solver = LiSSA(scale=20.0, depth=500, repeats=10, on_failure="ignore")
    y, info = solver.solve(op, b)
    assert rel_err(y, torch.linalg.solve(a_full, b[0]).unsqueeze(0)) < 0.1
    assert int(info.steps) == 500 * 10


# ----------------------------------------------------------------------------------------------
# The functional entry point.


def test_solve_unbatched_matrix():
    a, b = make_problem("nonsym", 1, 6, 9, F64)
    x, info = il.linear.solve(a[0], b[0])
    assert x.shape == (6,) and info.converged.shape == () and info.solver == "GMRES"
    assert rel_err(x, torch.linalg.solve(a[0], b[0])) < 1e-8


def test_solve_shared_matrix_with_batched_b():
    a, b = make_problem("nonsym", 3, 6, 9, F64)
    x, info = il.linear.solve(a[0], b)
    assert x.shape == (3, 6) and info.steps.shape == (3,)
    assert rel_err(x, torch.linalg.solve(a[0].expand(3, 6, 6), b)) < 1e-8


def test_solve_batched_matrices():
    a, b = make_problem("indef", 4, 7, 9, F64)
    x, info = il.linear.solve(a, b, MINRES())
    assert x.shape == (4, 7) and info.converged.shape == (4,)
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8


def test_solve_callable():
    a, b = make_problem("spd", 1, 6, 9, F64)
    x, info = il.linear.solve(lambda v: a[0] @ v, b[0])
    assert info.solver == "GMRES" and x.shape == (6,)
    x2, info2 = il.linear.solve(
        lambda v: a[0] @ v, b[0], symmetric=True, positive_definite=True
    )
    assert info2.solver == "CG"
    assert rel_err(x, torch.linalg.solve(a[0], b[0])) < 1e-8
    assert rel_err(x2, torch.linalg.solve(a[0], b[0])) < 1e-8


def test_callable_on_a_tensor_is_one_system():
    # A (5, 3) unknown of a callable operator is one system of 15 unknowns (as in jaxopt), not
    # 5 systems: the operator mixes the rows.
    g = torch.Generator().manual_seed(0)
    m = torch.randn(15, 15, dtype=F64, generator=g) / 15**0.5 + 3 * torch.eye(15, dtype=F64)
    b = torch.randn(5, 3, dtype=F64, generator=g)
    x, info = il.linear.solve(lambda v: (m @ v.reshape(15)).reshape(5, 3), b)
    assert x.shape == (5, 3) and info.converged.shape == ()
    x_ref = scipy.linalg.solve(m.numpy(), b.reshape(15).numpy())
    assert np.linalg.norm(x.reshape(15).numpy() - x_ref) <= 1e-8 * np.linalg.norm(x_ref)


def test_callable_batched_leading_dimension_indexes_systems():
    g = torch.Generator().manual_seed(1)
    a = _sym_from_eigs(g, 1 + 4 * torch.rand(4, 6, dtype=F64, generator=g))  # (4, 6, 6) SPD
    b = torch.randn(4, 2, 3, dtype=F64, generator=g)

    def mv(v):  # v: (4, 2, 3), one 6-vector per system
        return (a @ v.reshape(4, 6, 1)).reshape(4, 2, 3)

    x, info = il.linear.solve(mv, b, CG(), batched=True)
    assert x.shape == (4, 2, 3) and info.steps.shape == (4,) and bool(info.converged.all())
    x_ref = torch.linalg.solve(a, b.reshape(4, 6))
    assert rel_err(x.reshape(4, 6), x_ref) < 1e-8
    x0 = torch.zeros_like(b)
    x2, _ = il.linear.solve(mv, b, CG(), batched=True, x0=x0)
    torch.testing.assert_close(x2, x)


def test_batched_flag_is_checked():
    a = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="batched=True disagrees with b of shape"):
        il.linear.solve(a, torch.ones(3, dtype=F64), batched=True)
    with pytest.raises(TypeError, match="batched must be True, False or None"):
        il.linear.solve(a, torch.ones(3, dtype=F64), batched="yes")
    with pytest.raises(ValueError, match="batched=True needs b with a leading batch dimension"):
        il.linear.solve(lambda v: v, torch.tensor(1.0, dtype=F64), batched=True)


def test_solve_default_solver_choice():
    a, b = make_problem("spd", 2, 6, 9, F64)
    assert il.linear.solve(a, b, positive_definite=True)[1].solver == "CG"
    assert il.linear.solve(a, b)[1].solver == "GMRES"  # positive definiteness unknown
    op = MatrixOperator(a, symmetric=True, positive_definite=True)
    assert il.linear.solve(op, b)[1].solver == "CG"


def test_gmres_restart_is_clamped_and_max_steps_counts_inner_steps():
    a, b = make_problem("nonsym", 2, 5, 1, F64)
    x, info = il.linear.solve(a, b, GMRES(restart=100))
    assert bool(info.converged.all()) and int(info.steps.max()) <= 5
    with pytest.warns(ConvergenceWarning):
        _, info = il.linear.solve(a, b, GMRES(restart=2, max_steps=3))
    assert int(info.steps.max()) <= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", registry.params(registry.linear(iterative=True, estimator=False)))
def test_cuda(case):
    kind = "spd"
    a, b = make_problem(kind, 3, 40, 0, F32)
    a, b = a.cuda(), b.cuda()
    x, info = il.linear.solve(a, b, conformance_solver(case, F32), positive_definite=True)
    assert x.device.type == "cuda" and info.steps.device.type == "cuda"
    assert bool(info.converged.all())
    assert rel_err(x.double().cpu(), torch.linalg.solve(a.double(), b.double()).cpu()) < 1e-4


def test_solve_refuses_structure_tags_for_an_operator_that_has_its_own():
    op = il.linear.MatrixOperator(torch.eye(3, dtype=torch.float64) * 2)
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="carries its own tags"):
        il.linear.solve(op, b, il.linear.CG(), symmetric=True)


def test_implicit_takes_only_the_linear_solver_positionally():
    with pytest.raises(TypeError, match="positionally"):
        il.backward.Implicit(il.linear.GMRES(), il.backward.Phantom())  # type: ignore[misc]
    mode = il.backward.Implicit(il.linear.GMRES(), fallback=il.backward.Phantom())
    assert mode.fallback == il.backward.Phantom()


@pytest.mark.parametrize("vmapped", ["b", "A"])
def test_solve_under_vmap_names_the_batch_form_to_use(vmapped):
    A = 2 * torch.eye(3, dtype=torch.float64)
    bs = torch.ones(4, 3, dtype=torch.float64)
    if vmapped == "b":
        fn, arg = (lambda b: il.linear.solve(A, b)[0]), bs
    else:
        fn, arg = (lambda M: il.linear.solve(M, bs[0])[0]), A.expand(4, 3, 3)
    message = rf"torch.func.vmap \({vmapped} is a vmapped tensor\).*b of shape \(B, n\)"
    with pytest.raises(TypeError, match=message):
        torch.func.vmap(fn)(arg)
    # the batch form it names gives each system's solution
    x, _ = il.linear.solve(A.expand(4, 3, 3), bs)
    torch.testing.assert_close(x, bs / 2)
