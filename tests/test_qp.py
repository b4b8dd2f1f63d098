"""il.qp / il.nn.QPLayer against independent references: proxsuite (tight), scipy's HiGHS for
LPs, closed forms for equality-only QPs, central differences of the reference, gradcheck."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

import implicit_layers as il
from tests.helpers import DT, leaf, rel

proxsuite = pytest.importorskip("proxsuite")


def random_qp(seed: int, B: int, n: int, m: int, p: int, dtype: torch.dtype = DT, active: float = 0.3):
    """A feasible, strictly convex QP batch; a fraction ``active`` of the inequalities (at most
    ``n - p``, so that the vertex is not degenerate) are tight at a point z0."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = M @ M.mT / n + 0.1 * torch.eye(n, dtype=DT)
    q = torch.randn(B, n, generator=g, dtype=DT)
    G = torch.randn(B, m, n, generator=g, dtype=DT)
    z0 = torch.randn(B, n, generator=g, dtype=DT)
    tight = min(round(active * m), n - p)
    slack = torch.rand(B, m, generator=g, dtype=DT) * (torch.arange(m) >= tight)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + slack
    A = torch.randn(B, p, n, generator=g, dtype=DT)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return tuple(t.to(dtype) for t in (Q, q, G, h, A, b))


def reference(Q, q, G, h, A, b) -> torch.Tensor:
    """ProxQP at 1e-14 on every sample (float64)."""
    out = []
    for i in range(q.shape[0]):
        solver = proxsuite.proxqp.dense.QP(q.shape[1], b.shape[1], h.shape[1])
        solver.settings.eps_abs, solver.settings.eps_rel, solver.settings.max_iter = 1e-14, 0.0, 100000
        arr = [t[i].detach().double().numpy() for t in (Q, q, A, b, G)]
        solver.init(arr[0], arr[1], arr[2], arr[3], arr[4], None, h[i].detach().double().numpy())
        solver.solve()
        out.append(solver.results.x.copy())
    return torch.tensor(np.array(out), dtype=DT)


def test_matches_proxsuite_batched():
    data = random_qp(0, 16, 20, 20, 4)
    z, lam, nu, info = il.qp(*data, return_duals=True, return_info=True)
    assert info.status.tolist() == [0] * 16
    assert rel(z, reference(*data)) < 1e-10
    Q, q, G, h, A, b = data
    # KKT at the returned point: stationarity, λ >= 0, complementarity.
    stat = (Q @ z[..., None]).squeeze(-1) + q + (lam[:, None] @ G).squeeze(1) + (nu[:, None] @ A).squeeze(1)
    assert stat.abs().max() < 1e-9 and lam.min() >= 0
    assert (lam * (h - (G @ z[..., None]).squeeze(-1))).abs().max() < 1e-9


def test_equality_only_closed_form():
    Q, q, _, _, A, b = random_qp(1, 3, 6, 0, 2)
    K = torch.cat([torch.cat([Q, A.mT], -1), torch.cat([A, torch.zeros(3, 2, 2, dtype=DT)], -1)], -2)
    sol = torch.linalg.solve(K, torch.cat([-q, b], -1))
    z, _, nu = il.qp(Q, q, A=A, b=b, return_duals=True)
    assert rel(z, sol[:, :6]) < 1e-12 and rel(nu, sol[:, 6:]) < 1e-10
    # unconstrained: -Q⁻¹q
    assert rel(il.qp(Q, q), torch.linalg.solve(Q, -q)) < 1e-12


def test_gradients_match_central_differences_of_reference():
    # A few tight rows, so that the active constraints stay independent (a unique multiplier).
    data = random_qp(2, 3, 6, 8, 2, active=0.3)
    args = [leaf(t) for t in data]
    w = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(3))
    (il.qp(*args) * w).sum().backward()
    g = torch.Generator().manual_seed(4)
    for k in range(6):
        D = torch.randn(data[k].shape, dtype=DT, generator=g)
        if k == 0:
            D = D + D.mT  # Q is symmetric: perturb within symmetric matrices
        e = 1e-6
        plus = [t + e * D if i == k else t for i, t in enumerate(data)]
        minus = [t - e * D if i == k else t for i, t in enumerate(data)]
        fd = ((reference(*plus) - reference(*minus)) * w).sum() / (2 * e)
        assert abs(float((args[k].grad * D).sum() - fd)) <= 1e-6 * max(1.0, abs(float(fd))), "QqGhAb"[k]


def test_shared_parameters_gradients_are_summed_over_the_batch():
    Q, _, G, h, A, b = (t[0] for t in random_qp(5, 1, 5, 6, 1))
    q = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(6))
    hl = leaf(h)
    il.qp(Q, q, G, hl, A, b).sum().backward()
    D = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(7))
    e = 1e-6
    def ref(hh):
        return reference(Q.expand(4, 5, 5), q, G.expand(4, 6, 5), hh.expand(4, 6), A.expand(4, 1, 5),
                         b.expand(4, 1)).sum()

    fd = (ref(h + e * D) - ref(h - e * D)) / (2 * e)
    assert abs(float((hl.grad * D).sum() - fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_gradcheck_and_double_backward():
    Q, q, G, h, A, b = (t[0] for t in random_qp(8, 1, 4, 5, 1))
    ql, hl = leaf(q), leaf(h)
    assert torch.autograd.gradcheck(lambda q_, h_: il.qp(Q, q_, G, h_, A, b), (ql, hl))
    assert torch.autograd.gradgradcheck(lambda q_, h_: il.qp(Q, q_, G, h_, A, b), (ql, hl))


def test_torch_func_grad_and_jacrev():
    Q, q, G, h, A, b = (t[0] for t in random_qp(9, 1, 4, 5, 1))
    def loss(q_):
        return il.qp(Q, q_, G, h, A, b).square().sum()

    g = torch.func.grad(loss)(q)
    ql = leaf(q)
    loss(ql).backward()
    assert rel(g, ql.grad) < 1e-10
    J = torch.func.jacrev(lambda q_: il.qp(Q, q_, G, h, A, b))(q)
    e = 1e-6
    def solo(qq):
        return reference(Q[None], qq[None], G[None], h[None], A[None], b[None])[0]

    fd = torch.stack([(solo(q + e * d) - solo(q - e * d)) / (2 * e) for d in torch.eye(4, dtype=DT)], -1)
    assert rel(J, fd) < 1e-6


def test_lp_matches_highs():
    g = torch.Generator().manual_seed(10)
    n, m = 6, 14
    G = torch.randn(m, n, dtype=DT, generator=g)
    h = G @ torch.randn(n, dtype=DT, generator=g) + torch.rand(m, dtype=DT, generator=g)
    G = torch.cat([G, torch.eye(n, dtype=DT), -torch.eye(n, dtype=DT)])  # and a box |z| <= 3
    h = torch.cat([h, 3 * torch.ones(2 * n, dtype=DT)])
    q = torch.randn(n, dtype=DT, generator=g)
    res = linprog(q.numpy(), A_ub=G.numpy(), b_ub=h.numpy(), bounds=(None, None), method="highs")
    z = il.qp(torch.zeros(n, n, dtype=DT), q, G, h)
    assert rel(z, torch.tensor(res.x)) < 1e-9


def test_degenerate_rows_converge_with_finite_gradients():
    G = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [1, 0]], dtype=DT)  # last row duplicated
    h = torch.tensor([1.0, 2, 0, 0, 1], dtype=DT)
    q = leaf(torch.tensor([-1.0, -1], dtype=DT))
    z = il.qp(0.1 * torch.eye(2, dtype=DT), q, G, h)
    assert rel(z, torch.tensor([1.0, 2.0], dtype=DT)) < 1e-12
    z.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().max() < 1e-8  # z stays at the vertex
    A = torch.tensor([[1.0, 1], [1, 1]], dtype=DT)  # a duplicated equality row
    q2 = leaf(torch.tensor([-1.0, 0], dtype=DT))
    z = il.qp(torch.eye(2, dtype=DT), q2, A=A, b=torch.ones(2, dtype=DT))
    assert rel(z, torch.tensor([1.0, 0.0], dtype=DT)) < 1e-12
    (z * torch.tensor([1.0, 0.0], dtype=DT)).sum().backward()
    # z = (I - aaᵀ/2)(-q) + a/2 along a = (1, 1): dz1/dq = -(1/2, -1/2)
    assert rel(q2.grad, torch.tensor([-0.5, 0.5], dtype=DT)) < 1e-10


def test_weakly_active_constraint_gives_a_finite_gradient():
    # min ½‖z‖² - z1 s.t. z1 <= 1: the constraint is active with λ = 0 (weakly active), so the KKT
    # matrix has a zero row; the gradient is the minimum-norm adjoint's, finite.
    q = leaf(torch.tensor([[-1.0, 0.5], [-0.5, 0.5]], dtype=DT))
    G, h = torch.tensor([[1.0, 0.0]], dtype=DT), torch.ones(1, dtype=DT)
    z = il.qp(torch.eye(2, dtype=DT), q, G, h)
    assert rel(z, torch.tensor([[1.0, -0.5], [0.5, -0.5]], dtype=DT)) < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)  # the adjoint system is inconsistent
        z.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert rel(q.grad[1], torch.tensor([-1.0, -1.0], dtype=DT)) < 1e-10  # the sample beside it is exact


def test_infeasible_sample_flagged_neighbours_exact():
    data = list(random_qp(11, 6, 5, 6, 1))
    data[3] = data[3].clone()
    data[2] = data[2].clone()
    data[2][2, 0], data[2][2, 1] = data[2][2, 1].clone(), -data[2][2, 1]  # rows 0, 1: g and -g ...
    data[2][2, :2] = torch.stack([torch.ones(5, dtype=DT), -torch.ones(5, dtype=DT)])
    data[3][2, :2] = torch.tensor([-1.0, -1.0], dtype=DT)  # ... with g·z <= -1 and g·z >= 1
    with pytest.warns(il.ConvergenceWarning, match=r"batch sample\(s\) 2 \(primal infeasible\)"):
        z, info = il.qp(*data, return_info=True)
    assert info.status_names[2] == "primal infeasible" and info.status.tolist().count(0) == 5
    for i in (0, 1, 3, 4, 5):
        solo = il.qp(*(t[i] for t in data))
        assert rel(z[i], solo) < 1e-12 and rel(z[i], reference(*(t[i:i + 1] for t in data))[0]) < 1e-9
    with pytest.raises(il.ConvergenceError, match="primal infeasible"):
        il.qp(*data, solver=il.InteriorPoint(on_failure="raise"))


def test_unbounded_flagged():
    with pytest.warns(il.ConvergenceWarning, match="dual infeasible"):
        _, info = il.qp(torch.zeros(2, 2, dtype=DT), torch.tensor([-1.0, 0.0], dtype=DT),
                        torch.tensor([[0.0, 1.0]], dtype=DT), torch.ones(1, dtype=DT), return_info=True)
    assert int(info.status) == 2


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 8), m=st.integers(0, 10),
       p=st.integers(0, 2), active=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_random_feasible_qps(seed, B, n, m, p, active, dtype):
    p = min(p, n)
    data = random_qp(seed, B, n, m, p, dtype, active)
    z, lam, nu, info = il.qp(*data, return_duals=True, return_info=True)
    assert z.dtype == dtype and info.status.tolist() == [0] * B
    # The KKT conditions certify the solution of a convex QP.
    Q, q, G, h, A, b = (t.double() for t in data)
    z, lam, nu = z.double(), lam.double(), nu.double()
    tol = 1e-8 if dtype == DT else 1e-3
    scale = 1 + max(float(t.abs().max()) if t.numel() else 0.0 for t in (q, h, b, lam, nu))
    stat = (Q @ z[..., None]).squeeze(-1) + q + (lam[:, None] @ G).squeeze(1) + (nu[:, None] @ A).squeeze(1)
    slack = h - (G @ z[..., None]).squeeze(-1)
    assert _max(stat.abs()) <= tol * scale and _max(-lam) <= 0
    assert _max(-slack) <= tol * scale and _max(((A @ z[..., None]).squeeze(-1) - b).abs()) <= tol * scale
    assert _max((lam * slack).abs()) <= tol * scale**2


def test_float32_gradients_and_layer():
    layer = il.nn.QPLayer(4, n_ineq=6, n_eq=1)
    q = torch.randn(8, 4)
    z = layer(q)
    z.square().sum().backward()
    assert z.dtype == torch.float32 and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    with torch.inference_mode():
        assert torch.allclose(layer(q), z.detach(), atol=1e-5)
    # Under autocast the layer keeps float32 (its solve is in float64) and its gradient.
    ql = leaf(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za = layer(ql)
    za.square().sum().backward()
    qr = leaf(q)
    layer(qr).square().sum().backward()
    assert za.dtype == torch.float32 and torch.allclose(za, z.detach(), atol=1e-5)
    assert torch.allclose(ql.grad, qr.grad, rtol=1e-3, atol=1e-4)


def test_bad_inputs():
    Q, q = torch.eye(3, dtype=DT), torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match="Q must be"):
        il.qp(torch.eye(2, dtype=DT), q)
    with pytest.raises(ValueError, match="G and h go together"):
        il.qp(Q, q, G=torch.zeros(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="G must be"):
        il.qp(Q, q, torch.zeros(2, 4, dtype=DT), torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match="batch sizes"):
        il.qp(Q.expand(2, 3, 3), torch.zeros(3, 3, dtype=DT))
    assert il.qp(Q, q.float()).dtype == DT  # mixed dtypes promote
    with pytest.raises(TypeError, match="floating-point"):
        il.qp(Q, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        il.qp(Q, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="infeasible"):
        il.InteriorPoint(infeasible="drop")
    with pytest.raises(TypeError, match="leading dimension"):
        torch.func.vmap(lambda q_: il.qp(Q, q_))(torch.zeros(2, 3, dtype=DT))


def test_qp_layer_bad_arguments_and_unbatched_input():
    with pytest.raises(ValueError, match="n_ineq must be"):
        il.nn.QPLayer(3, n_ineq=-1)
    with pytest.raises(ValueError, match="n_eq must be at most"):
        il.nn.QPLayer(3, n_eq=5)
    layer = il.nn.QPLayer(3, n_ineq=4, dtype=DT)
    q = torch.randn(2, 3, dtype=DT, generator=torch.Generator().manual_seed(14))
    assert rel(layer(q[0]), layer(q)[0]) < 1e-12


def test_warnings_are_not_emitted_on_solved_batches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        il.qp(*random_qp(12, 4, 5, 5, 1))


def test_infeasible_closest_returns_the_closest_feasible_problem():
    G = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=DT)
    h = torch.tensor([1.0, 2, 0, 0], dtype=DT).expand(3, 4).clone()
    h[1, 0] = -1.0  # z1 <= -1 and z1 >= 0: the closest feasible shift moves both bounds by 1/2
    h = leaf(h)
    q = torch.tensor([[-1.0, -1], [1, -1], [0.5, 0.5]], dtype=DT)
    with pytest.warns(il.ConvergenceWarning, match="closest feasible problem"):
        z = il.qp(torch.eye(2, dtype=DT), q, G, h, solver=il.InteriorPoint(infeasible="closest"))
    assert rel(z[1], torch.tensor([-0.5, 1.0], dtype=DT)) < 1e-9
    assert rel(z[0], torch.tensor([1.0, 1.0], dtype=DT)) < 1e-12
    z[1, 0].backward()  # z1 = (h1 - h3) / 2 on the closest feasible problem
    assert rel(h.grad[1], torch.tensor([0.5, 0, -0.5, 0], dtype=DT)) < 1e-8
    assert h.grad[[0, 2]].abs().max() == 0


def test_warm_start_from_the_previous_solution():
    data = random_qp(13, 8, 10, 10, 2)
    z, lam, nu, info = il.qp(*data, return_duals=True, return_info=True)
    nudged = (data[0], data[1] + 1e-3, *data[2:])
    z2, info2 = il.qp(*nudged, warm_start=(z, lam, nu), return_info=True)
    z3, info3 = il.qp(*nudged, return_info=True)
    assert rel(z2, z3) < 1e-12 and rel(z2, reference(*nudged)) < 1e-10
    assert int(info2.steps.sum()) < int(info3.steps.sum())


def test_samples_that_stop_early_leave_the_batch_in_place():
    # Loose constraints on samples 1, 4, 6 make them stop several iterations before the others,
    # so the working batch shrinks during the solve; every sample must come back in its place.
    data = list(random_qp(21, 8, 12, 12, 2, active=0.5))
    data[3] = data[3].clone()
    data[3][[1, 4, 6]] += 100.0
    h = leaf(data[3])
    z, lam, nu, info = il.qp(*data[:3], h, *data[4:], return_duals=True, return_info=True)
    assert len(set(info.steps.tolist())) > 1 and info.status.tolist() == [0] * 8
    assert rel(z, reference(*data)) < 1e-9
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(5), dtype=DT)
    (grad,) = torch.autograd.grad((w * z).sum(), h)
    for i in (0, 1, 4, 7):
        h_i = leaf(data[3][i])
        z_i, lam_i, nu_i = il.qp(*(t[i] for t in data[:3]), h_i, *(t[i] for t in data[4:]), return_duals=True)
        (grad_i,) = torch.autograd.grad((w[i] * z_i).sum(), h_i)
        assert rel(z[i], z_i) < 1e-12 and rel(lam[i], lam_i) < 1e-9 and rel(nu[i], nu_i) < 1e-9
        assert rel(grad[i], grad_i) < 1e-9


def qp_or_boxed_lp(seed: int, m: int, p: int, lp: bool, n: int = 6, B: int = 5):
    """``random_qp``, or with ``lp`` the same constraints plus the box [-2, 2]ⁿ and ``Q = 0``."""
    Q, q, G, h, A, b = random_qp(seed, B, n, m, p)
    if lp:
        Q = torch.zeros_like(Q)
        G = torch.cat([G, torch.eye(n, dtype=DT).expand(B, n, n), -torch.eye(n, dtype=DT).expand(B, n, n)], 1)
        h = torch.cat([h, 2 * torch.ones(B, 2 * n, dtype=DT)], 1)
    return Q, q, G, h, A, b


@pytest.mark.parametrize("m, p, lp", [(7, 2, False), (7, 0, False), (0, 3, False), (9, 0, True)])
def test_reduced_kkt_solves_match_a_dense_solve(m, p, lp):
    # The backward's solves with K and Kᵀ through the eliminated (n, n) system, against LU of the
    # KKT matrix built in closed form at the same point.
    from implicit_layers._qp._kkt import kkt_matrix
    from implicit_layers._qp._reduced import ReducedKKT

    Q, q, G, h, A, b = qp_or_boxed_lp(21, m, p, lp)
    z, lam, nu = il.qp(Q, q, G, h, A, b, return_duals=True)
    x = torch.cat([z, lam, nu], -1)
    K = kkt_matrix(x, Q, G, h, A)
    reduced = ReducedKKT(Q, G, h, A, x)
    assert not reduced.degenerate.any() and not reduced.failed.any()
    rhs = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    for transpose, M in ((False, K), (True, K.mT)):
        u = reduced.solve(rhs, transpose)
        assert rel(u, torch.linalg.solve(M, rhs)) < 1e-9
        assert rel(reduced.apply(u, transpose), (M @ u.unsqueeze(-1)).squeeze(-1)) < 1e-13


@pytest.mark.parametrize("m, p, lp", [(7, 2, False), (9, 0, True)])
def test_backward_takes_the_polish_factor_and_matches_a_dense_solve(m, p, lp):
    # The forward's polish factor, taken by the backward's reduced system where its active set is
    # the one found at the solution: the solves with K and Kᵀ still agree with LU of K.
    from implicit_layers._qp._ipm import interior_point
    from implicit_layers._qp._kkt import kkt_matrix
    from implicit_layers._qp._reduced import ReducedKKT

    Q, q, G, h, A, b = qp_or_boxed_lp(23, m, p, lp)
    result = interior_point(Q, q, G, h, A, b, tol=1e-9, max_steps=50, check_every=2)
    assert result.polish_factor is not None
    L, guessed, has = result.polish_factor
    assert bool(has.all())  # every sample ended by a polish
    x = torch.cat([result.z, result.lam, result.nu], -1)
    reduced = ReducedKKT(Q, G, h, A, x, factor=result.polish_factor)
    taken = (guessed == (reduced.active > 0)).all(-1)
    assert bool(taken.any())
    assert torch.equal(reduced.L[taken], L[taken])  # taken, not recomputed
    K = kkt_matrix(x, Q, G, h, A)
    rhs = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    for transpose, M in ((False, K), (True, K.mT)):
        assert rel(reduced.solve(rhs, transpose), torch.linalg.solve(M, rhs)) < 1e-9


def test_a_failed_polish_guesses_again_from_its_point():
    # min ½|z - c|² s.t. z <= 0: the active set is {i: cᵢ > 0}. A first guess that holds an
    # inactive row and misses an active one fails; its next guess (the negative multiplier
    # leaves, the violated row joins) is the true set, and that polish solves the problem.
    from implicit_layers._qp._ipm import _polish

    c = torch.tensor([[1.0, -1.0, 2.0, -2.0]], dtype=DT)
    eye = torch.eye(4, dtype=DT)[None]
    no_rows = (torch.zeros(1, 0, 4, dtype=DT), torch.zeros(1, 0, dtype=DT))
    data = (eye, -c, eye, torch.zeros(1, 4, dtype=DT), *no_rows)
    start = (torch.zeros(1, 4, dtype=DT), torch.ones(1, 4, dtype=DT), torch.zeros(1, 0, dtype=DT))
    scales = (torch.tensor([3.0], dtype=DT), torch.tensor([1.0], dtype=DT), torch.tensor([1e-9], dtype=DT))
    first = torch.tensor([[True, True, False, False]])
    *_, res, _, next_guess = _polish(*data, *start, first, *scales)
    assert float(res[0]) > 1e-3
    assert next_guess.tolist() == [[True, False, True, False]]
    z, lam, *_, res, _, _ = _polish(*data, *start, next_guess, *scales)
    assert float(res[0]) < 1e-12
    torch.testing.assert_close(z, c.clamp(max=0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(lam, c.clamp(min=0.0), rtol=0, atol=1e-12)


def test_forward_mode_through_the_reduced_kkt_solve():
    # torch.func.jvp takes the tangent solve (K, not Kᵀ): against central differences.
    Q, q, G, h, A, b = (t[0] for t in random_qp(22, 1, 5, 6, 1))
    d = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=DT)
    _, tangent = torch.func.jvp(lambda h_: il.qp(Q, q, G, h_, A, b), (h,), (d,))
    e = 1e-6
    def solo(hh):
        return reference(Q[None], q[None], G[None], hh[None], A[None], b[None])[0]

    assert rel(tangent, (solo(h + e * d) - solo(h - e * d)) / (2 * e)) < 1e-6


def test_operator_orientation_is_declared_to_the_linear_solver():
    # The adjoint solve's operator says it applies Jᵀ, the tangent solve's that it applies J.
    seen = []

    class Spy(il.linear.Dense):
        def _solve(self, op, b, x0):
            seen.append(op.transposed)
            return super()._solve(op, b, x0)

    W = 0.3 * torch.eye(3, dtype=DT)
    x = leaf(torch.ones(3, dtype=DT))
    z = il.fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(3, dtype=DT), x,
                       backward=il.backward.Implicit(Spy()))
    z.sum().backward()
    torch.func.jvp(lambda x_: il.fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(3, dtype=DT),
                                             x_, backward=il.backward.Implicit(Spy())), (x.detach(),),
                   (torch.ones(3, dtype=DT),))
    assert seen == [True, False]


def test_early_iterations_factorise_in_float32_without_losing_accuracy(monkeypatch):
    # On the CPU the first iterations (every residual above 1e-3) factorise the reduced matrix in
    # float32; the answer must still match the reference to float64 accuracy, and a badly scaled
    # problem (pivots spread beyond 1e4) must fall back to float64 and still be exact.
    from implicit_layers._qp import _ipm

    dtypes: list[torch.dtype] = []
    init = _ipm._Reduced.__init__

    def recording(self, Qd, *rest):
        dtypes.append(Qd.dtype)
        init(self, Qd, *rest)

    monkeypatch.setattr(_ipm._Reduced, "__init__", recording)
    data = random_qp(31, 6, 12, 12, 3)
    # Small batches stay in float64 (the conversions would cost more than they save) ...
    z64 = il.qp(*data)
    assert torch.float32 not in dtypes
    # ... larger ones (here: the threshold lowered) take float32 factors at first.
    dtypes.clear()
    monkeypatch.setattr(_ipm, "_SINGLE_WORK", 0)
    z = il.qp(*data)
    assert torch.float32 in dtypes and dtypes[-1] == DT and z.dtype == DT
    assert rel(z, reference(*data)) < 1e-10 and rel(z, z64) < 1e-10

    # A float32 factor that fails the conditioning check is redone in float64: with a check no
    # factor passes, the solve is the float64 one exactly.
    monkeypatch.setattr(_ipm, "_SINGLE_PIVOTS", 1.0 + 1e-3)
    z_redone = il.qp(*data)
    monkeypatch.setattr(_ipm, "_SINGLE_ABOVE", float("inf"))
    assert torch.equal(z_redone, il.qp(*data))


def test_badly_scaled_rows_are_solved_to_the_tolerance():
    # Rows of G scaled from 1e-2 to 1e2: a polish short of rounding must not stop the iterations.
    Q, q, G, h, A, b = random_qp(31, 6, 12, 12, 3)
    scale = torch.logspace(-2, 2, 12, dtype=DT)[:, None]
    scaled = (Q, q, G * scale, h * scale.squeeze(-1), A, b)
    z, info = il.qp(*scaled, return_info=True)
    assert info.status.tolist() == [0] * 6 and bool((info.residual <= 1e-9).all())
    assert rel(z, reference(*scaled)) < 1e-8


def test_single_precision_factor_solves_and_its_conditioning_check():
    from implicit_layers._qp._ipm import _Reduced

    Q, q, G, h, A, b = random_qp(32, 4, 10, 8, 2)
    eps = torch.full((4,), 1e-9, dtype=DT)
    delta = torch.full((4,), 1e-9, dtype=DT)
    w = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=DT) + 0.5
    exact = _Reduced(Q, delta, G, A, w, eps)
    single = _Reduced(Q.float(), delta, G.float(), A.float(), w, eps)
    r1, r2 = torch.randn(4, 10, dtype=DT), torch.randn(4, 2, dtype=DT)
    (dz, dnu), (dz32, dnu32) = exact.solve(r1, r2), single.solve(r1, r2)
    assert dz32.dtype == DT and dnu32.dtype == DT
    assert rel(dz32, dz) < 1e-4 and rel(dnu32, dnu) < 1e-4
    # The direction solves H dz + Aᵀ dν = r₁, A dz - ε dν = r₂ (checked in float64).
    H = Q + 1e-9 * torch.eye(10, dtype=DT) + G.mT @ (w.unsqueeze(-1) * G)
    assert rel((H @ dz.unsqueeze(-1)).squeeze(-1) + (A.mT @ dnu.unsqueeze(-1)).squeeze(-1), r1) < 1e-10
    assert bool(single.well_conditioned(1e-4).all())
    # The check is per sample: only sample 1 is near a solution (λ/s from 1e-5 to 1e5).
    spread = w.clone()
    spread[1] = spread[1] * torch.logspace(-5, 5, 8, dtype=DT)
    spread_factor = _Reduced(Q.float(), delta, G.float(), A.float(), spread, eps)
    assert spread_factor.well_conditioned(1e-4).tolist() == [True, False, True, True]


def test_single_precision_factor_redoes_only_its_failed_samples_in_double():
    from implicit_layers._qp._ipm import _factorise, _Patched, _Reduced

    Q, q, G, h, A, b = random_qp(32, 4, 10, 8, 2)
    eps = torch.full((4,), 1e-9, dtype=DT)
    delta = torch.full((4,), 1e-9, dtype=DT)
    w = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=DT) + 0.5
    w[2] = w[2] * torch.logspace(-5, 5, 8, dtype=DT)  # sample 2 fails the float32 pivot check
    single = (Q.float(), G.float(), A.float())
    red = _factorise(Q, delta, G, A, w, eps, single)
    assert isinstance(red, _Patched) and red.rows.tolist() == [2] and red.fix.L.dtype == DT
    exact = _Reduced(Q, delta, G, A, w, eps)
    r1, r2 = torch.randn(4, 10, dtype=DT), torch.randn(4, 2, dtype=DT)
    (dz, dnu), (pz, pnu) = exact.solve(r1, r2), red.solve(r1, r2)
    # Sample 2 is solved in float64 (to rounding), the others in float32.
    assert rel(pz[2], dz[2]) < 1e-12 and rel(pnu[2], dnu[2]) < 1e-12
    assert rel(pz, dz) < 1e-4 and rel(pnu, dnu) < 1e-4
    # With more than a quarter of the samples failing, the whole batch is factorised in float64.
    w[0] = w[0] * torch.logspace(5, -5, 8, dtype=DT)
    red = _factorise(Q, delta, G, A, w, eps, single)
    assert isinstance(red, _Reduced) and red.L.dtype == DT


def test_check_every_changes_when_samples_stop_not_the_answer():
    with pytest.raises(ValueError, match="check_every"):
        il.InteriorPoint(check_every=0)
    data = random_qp(33, 8, 10, 10, 2)
    z, info = il.qp(*data, solver=il.InteriorPoint(check_every=1), return_info=True)
    z3, info3 = il.qp(*data, solver=il.InteriorPoint(check_every=3), return_info=True)
    ref = reference(*data)
    assert rel(z, ref) < 1e-10 and rel(z3, ref) < 1e-10
    # Checking at every iteration stops (or polishes) each sample at its first chance.
    assert int(info.steps.sum()) <= int(info3.steps.sum())


def test_cholesky_falls_back_to_a_new_factor_where_torch_refuses_the_in_place_one(monkeypatch):
    from implicit_layers._qp import _linalg

    g = torch.Generator().manual_seed(4)
    M = torch.randn(3, 6, 6, generator=g, dtype=DT)
    H = M @ M.mT + 0.5 * torch.eye(6, dtype=DT)
    original = torch.linalg.cholesky_ex

    def refusing(A, *, upper=False, out=None):
        if out is not None:
            raise RuntimeError("unsupported operation: the output aliases the input")
        return original(A, upper=upper)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", refusing)
    L, info = _linalg.cholesky(H.clone())
    assert not bool(info.any()) and rel(L @ L.mT, H) < 1e-14 and torch.equal(L, L.tril())


def test_step_to_the_boundary_matches_its_definition():
    from implicit_layers._qp._ipm import _max_step

    g = torch.Generator().manual_seed(5)
    v = torch.rand(64, 9, generator=g, dtype=DT) + 1e-3
    dv = torch.randn(64, 9, generator=g, dtype=DT) * torch.logspace(-3, 3, 64, dtype=DT)[:, None]
    # The largest α <= 1 with v + α dv >= 0, from the rows with dv < 0 only.
    ratios = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    expected = ratios.amin(-1).clamp(max=1.0)
    alpha = _max_step(v, dv)
    assert rel(alpha, expected) < 1e-15
    assert bool((v + alpha[:, None] * dv >= -1e-15 * v.abs()).all())
    # No row moving towards the boundary: the full step. A zero entry that stays put (0/0)
    # leaves α defined; one moving down allows no step (α below the smallest normal number).
    up = torch.tensor([[1.0, 2.0, 0.0]], dtype=DT)
    assert _max_step(up, torch.tensor([[0.5, 0.0, 0.0]], dtype=DT)).tolist() == [1.0]
    assert _max_step(up, torch.tensor([[-4.0, 1.0, 0.0]], dtype=DT)).tolist() == [0.25]
    assert 0.0 <= float(_max_step(up, torch.tensor([[1.0, 1.0, -1.0]], dtype=DT))) <= torch.finfo(DT).tiny


def test_cholesky_solve_matches_a_dense_solve_for_both_factor_layouts():
    from implicit_layers._qp._linalg import cholesky, cholesky_solve

    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 7, 7, generator=g, dtype=DT)
    H = M @ M.mT + 0.5 * torch.eye(7, dtype=DT)
    rhs = torch.randn(5, 7, 2, generator=g, dtype=DT)
    exact = torch.linalg.solve(H, rhs)
    work = H.clone()
    L_rows, info = cholesky(work)  # row-major lower factor, made in place over its argument
    assert L_rows.data_ptr() == work.data_ptr() and torch.equal(L_rows, L_rows.tril())
    assert rel(L_rows @ L_rows.mT, H) < 1e-14
    L_cols = torch.linalg.cholesky(H)  # torch's own (column-major) lower factor
    assert not bool(info.any()) and L_rows.is_contiguous() and not L_cols.is_contiguous()
    for L in (L_rows, L_cols):
        assert rel(cholesky_solve(rhs, L), exact) < 1e-12
        assert rel(cholesky_solve(rhs.float(), L.float()), exact) < 1e-4


def test_a_nonsymmetric_q_is_its_symmetric_part():
    # ½zᵀQz depends on (Q + Qᵀ)/2 alone: the minimiser of the objective as written.
    Q = torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    z = il.qp(Q, q)
    sym = torch.tensor([[2.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(z, torch.linalg.solve(sym, -q))
    (g,) = torch.autograd.grad(z.sum(), Q)
    # The gradient of a function of the symmetric part is symmetric.
    torch.testing.assert_close(g, g.mT)


@pytest.mark.parametrize("Q", [
    -torch.eye(2),
    torch.diag(torch.tensor([1.0, -1.0])),
    torch.tensor([[1.0, 0.5], [0.5, -1e-3]]),
])
def test_a_q_with_a_negative_diagonal_entry_is_an_error(Q):
    # A nonconvex QP: the interior-point method would return a stationary point as solved.
    G = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    with pytest.raises(ValueError, match="Q must be positive semidefinite"):
        il.qp(Q.double(), torch.tensor([0.1, 0.2], dtype=torch.float64), G,
              torch.ones(4, dtype=torch.float64))
    batched = torch.stack([torch.eye(2, dtype=torch.float64), Q.double()])
    with pytest.raises(ValueError, match=r"\(batch sample 1\)"):
        il.qp(batched, torch.zeros(2, 2, dtype=torch.float64), G, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("Q", [
    torch.tensor([[1.0, 1.0], [1.0, 0.1]]),  # eigenvalues -0.55 and 1.65
    torch.tensor([[1.0, -2.0], [-2.0, 3.5]]),  # a rank-one Q made indefinite by 12 %
    torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # a zero diagonal: nothing to measure rounding by
])
def test_an_indefinite_q_with_a_nonnegative_diagonal_is_an_error(Q):
    # Before, solved "successfully" to a stationary point (status 0, no warning).
    assert torch.linalg.eigvalsh(Q.double()).min() < 0
    G = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    with pytest.raises(ValueError, match="a 2 x 2 principal minor is negative"):
        il.qp(Q.double(), torch.tensor([0.1, 0.2], dtype=torch.float64), G,
              torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore::implicit_layers.ConvergenceWarning")  # float32, rank one
def test_positive_semidefinite_q_built_in_floating_point_is_accepted(dtype):
    # Rank-deficient products, duplicated variables and rank one: 2 x 2 minors at or near
    # zero, which rounding must not turn into an error.
    g = torch.Generator().manual_seed(3)
    n = 12
    M = torch.randn(16, n, 4, generator=g, dtype=dtype)
    M[:, 1] = M[:, 0]  # a duplicated variable
    v = torch.randn(16, n, 1, generator=g, dtype=dtype) * 1e3
    Q = torch.cat([M @ M.mT, v @ v.mT, 1e-20 * (M @ M.mT)])
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(dtype)
    q = torch.randn(Q.shape[0], n, generator=g, dtype=dtype)
    bf16 = (v[:4].bfloat16() @ v[:4].bfloat16().mT).to(dtype)  # rank one, rounded to bfloat16
    Q, q = torch.cat([Q, bf16]), torch.cat([q, q[:4]])
    for Q_in, q_in in ((Q, q), (Q.double(), q.double())):  # and float32 data passed as float64
        z, info = il.qp(Q_in, q_in, G.to(Q_in.dtype), torch.ones(2 * n, dtype=Q_in.dtype),
                        return_info=True)
        assert torch.isfinite(z).all()


def test_positive_semidefinite_q_at_any_scale_is_accepted():
    G = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    h = torch.ones(4, dtype=torch.float64)
    q = torch.tensor([0.1, 0.2], dtype=torch.float64)
    for Q in (torch.zeros(2, 2), 1e-12 * torch.eye(2), 1e8 * torch.ones(2, 2)):  # LP, tiny, rank one
        z = il.qp(Q.double(), q, G, h)
        assert torch.isfinite(z).all() and (z.abs() <= 1 + 1e-9).all()


def test_a_warm_start_of_the_wrong_shape_names_the_part():
    Q = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    q = torch.zeros(3, 2, dtype=torch.float64)
    G, h = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    z, lam, nu = il.qp(Q, q, G, h, return_duals=True)
    with pytest.raises(ValueError, match=r"warm_start's z must have 6 entries \(batch 3 × 2\)"):
        il.qp(Q, q, G, h, warm_start=(z[0], lam, nu))
    with pytest.raises(TypeError, match="warm_start must be a tuple"):
        il.qp(Q, q, G, h, warm_start=z)
    torch.testing.assert_close(il.qp(Q, q, G, h, warm_start=(z, lam, nu)), z)


def test_the_warning_of_an_unbatched_problem_reads():
    G = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    with pytest.warns(il.ConvergenceWarning, match=r"qp: the problem \(primal infeasible\) not solved"):
        il.qp(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), G,
              -torch.ones(4, dtype=torch.float64))


def test_an_empty_batch_returns_empty_outputs():
    q = torch.zeros(0, 2, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(2, dtype=torch.float64)
    z, lam, nu, info = il.qp(eye, q, eye, torch.ones(2, dtype=torch.float64),
                             return_duals=True, return_info=True)
    assert z.shape == (0, 2) and lam.shape == (0, 2) and nu.shape == (0, 0)
    assert info.status.shape == (0,) and info.converged.shape == (0,)
    z.sum().backward()
    assert q.grad is not None and q.grad.shape == (0, 2)


@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e-9, 1e-200])
def test_small_scale_data_solved_as_order_one(scale: float) -> None:
    """A QP whose vectors are all of order ``scale`` has the solution ``scale`` times that of
    the same QP at order 1 (``z(αq, αh) = α z(q, h)``), and the same derivatives; the stopping
    tests relative to ``1 + ‖q‖`` once accepted a point 2000 times too small at 1e-6."""
    I = torch.eye(3, dtype=DT)
    G = torch.cat([I, -I])
    x = torch.tensor([1.3778, 0.25, -3.5413], dtype=DT)
    h1 = torch.full((6,), 1.0, dtype=DT)

    def solve(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return il.qp(I, q, G, h)

    expected = torch.clamp(x, -1.0, 1.0)  # the projection onto the box [-1, 1]^3
    q, h = (-x * scale).requires_grad_(), (h1 * scale).requires_grad_()
    z, info = il.qp(I, q, G, h, return_info=True)
    assert int(info.status) == 0
    torch.testing.assert_close(z / scale, expected, rtol=1e-9, atol=1e-9)
    # Derivatives equal those at order 1 (the map is positively homogeneous of degree 1).
    jac = torch.autograd.functional.jacobian(solve, (q.detach(), h.detach()))
    jac1 = torch.autograd.functional.jacobian(solve, (-x, h1))
    for a, b in zip(jac, jac1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_small_scale_batched_samples_scaled_apart() -> None:
    """Scaling is per sample: a batch mixing order 1 and order 1e-7 solves both."""
    I = torch.eye(2, dtype=DT).expand(2, 2, 2)
    G = torch.cat([torch.eye(2, dtype=DT), -torch.eye(2, dtype=DT)]).expand(2, 4, 2)
    x = torch.tensor([[2.0, 0.5], [2.0e-7, -0.3e-7]], dtype=DT)
    h = torch.tensor([[1.0] * 4, [1e-7] * 4], dtype=DT)
    z = il.qp(I, -x, G, h)
    torch.testing.assert_close(z, torch.minimum(torch.maximum(x, -h[:, :2]), h[:, :2]),
                               rtol=1e-9, atol=1e-16)


@pytest.mark.parametrize("name", ["Q", "q", "G", "h", "A", "b"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_is_a_clear_error(name: str, value: float) -> None:
    """NaN or Inf in the data ran the whole step budget and returned NaN as 'max steps', and
    the backward failed in an SVD; it is a ValueError naming the input and the sample."""
    I = torch.eye(3, dtype=DT)
    data = {"Q": I.expand(2, 3, 3).clone(), "q": -torch.ones(2, 3, dtype=DT),
            "G": torch.cat([I, -I]).expand(2, 6, 3).clone(), "h": torch.ones(2, 6, dtype=DT),
            "A": torch.ones(2, 1, 3, dtype=DT), "b": torch.ones(2, 1, dtype=DT)}
    data[name].view(2, -1)[1, 0] = value
    with pytest.raises(ValueError, match=rf"^{name} must be finite, got a NaN or infinite entry "
                       r"\(batch sample 1\)"):
        il.qp(data["Q"], data["q"], data["G"], data["h"], data["A"], data["b"])


def test_finite_data_whose_sum_overflows_is_accepted() -> None:
    """The finiteness check sums each input first; a sum that overflows on finite entries
    falls back to the entry-wise test instead of refusing the data."""
    from implicit_layers._qp._inputs import check_inputs

    big = torch.finfo(DT).max / 2
    Q = torch.eye(2, dtype=DT)
    q = torch.tensor([big, big, big], dtype=DT)[:2].clone()
    G = torch.full((3, 2), big, dtype=DT)
    (Qc, qc, Gc, *_), _ = check_inputs(Q, q, G, torch.ones(3, dtype=DT), None, None)
    assert torch.isinf(Gc.sum()) and torch.equal(Gc, G)
    with pytest.raises(ValueError, match="^G must be finite"):
        check_inputs(Q, q, torch.cat([G[:2], torch.full((1, 2), float("inf"), dtype=DT)]),
                     torch.ones(3, dtype=DT), None, None)


def test_small_scale_data_in_float32() -> None:
    """float32 data of order 1e-20 (its solve runs in float64, scaled): the projection onto a
    box of that scale, to float32 rounding."""
    x = torch.tensor([3.0, -0.5, 0.25], dtype=torch.float32) * 1e-20
    I = torch.eye(3, dtype=torch.float32)
    h = torch.full((6,), 1e-20, dtype=torch.float32)
    z = il.qp(I, -x, torch.cat([I, -I]), h)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.clamp(x, -1e-20, 1e-20), rtol=1e-6, atol=0)


def test_gradient_wrt_a_symmetric_q_is_symmetric_and_passes_gradcheck():
    """For an exactly symmetric Q the gradient was -y zᵀ (not symmetric); the solution depends
    on the symmetric part alone, so single-entry finite differences see the symmetric gradient
    and gradcheck failed w.r.t. Q."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(3, 3, dtype=DT, generator=gen)
    Q = (M @ M.T + torch.eye(3, dtype=DT)).requires_grad_()
    q = torch.randn(3, dtype=DT, generator=gen)
    G = torch.cat([torch.eye(3, dtype=DT), -torch.eye(3, dtype=DT)])
    h = torch.full((6,), 0.3, dtype=DT)
    (g,) = torch.autograd.grad(il.qp(Q, q, G, h).square().sum(), Q)
    torch.testing.assert_close(g, g.mT, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda Q_: il.qp(Q_, q, G, h), (Q,), atol=1e-6)
