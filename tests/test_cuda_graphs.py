"""The ``cuda_graph`` setting: chunks of ``check_every`` steps recorded as CUDA graphs and
replayed give the results of the step-by-step loops.

On the CPU: the setting validates, is refused with a clear error, and the chunked loops (run
by the eager stand-in of :mod:`implicit_layers._cuda_graph`, which replays each captured
chunk with the tensors it closed over at capture, on the static buffers) equal the plain
loops exactly. On CUDA: graphs replayed against eager execution, forward and backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import implicit_layers as il
from implicit_layers import _cuda_graph
from implicit_layers.solvers.adaptive import NeumannThenGMRES

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FORWARD = {
    "Picard": lambda **k: il.solvers.Picard(**k),
    "Picard damped": lambda **k: il.solvers.Picard(0.7, **k),
    "Anderson": lambda **k: il.solvers.Anderson(3, **k),
    "Anderson mixing": lambda **k: il.solvers.Anderson(4, mixing=0.8, **k),
    "Adaptive": lambda **k: il.solvers.Adaptive(**k),
    "Adaptive switching": lambda **k: il.solvers.Adaptive(0.3, **k),
}
LINEAR = {
    "Neumann": lambda **k: il.linear.Neumann(**k),
    "GMRES": lambda **k: il.linear.GMRES(7, **k),
    "GMRES short cycles": lambda **k: il.linear.GMRES(3, **k),
}
CLASSES = [
    il.solvers.Picard, il.solvers.Anderson, il.solvers.Adaptive, il.linear.Neumann,
    il.linear.GMRES, NeumannThenGMRES,
]


class _Spy(_cuda_graph.ChunkGraphs):
    made: list[_cuda_graph.ChunkGraphs] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Spy.made.append(self)


@pytest.fixture
def runners(monkeypatch):
    """The chunk runners made during the test (their ``replays`` count)."""
    _Spy.made = []
    monkeypatch.setattr(_cuda_graph, "ChunkGraphs", _Spy)
    return _Spy.made


@pytest.fixture
def stand_in(monkeypatch, runners):
    """The chunked loops on the CPU, graphs replaced by the eager stand-in."""
    monkeypatch.setattr(_cuda_graph, "EAGER_STAND_IN", True)
    return runners


def _deq(B: int, n: int, dtype: torch.dtype, device: str | torch.device, scale: float = 0.9):
    """A batched tanh DEQ ``z = tanh(W z + x)`` whose samples converge at different speeds."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=gen, dtype=torch.float64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, n, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.1, 3.0, B, dtype=torch.float64).unsqueeze(-1)
    return W.to(device, dtype), x.to(device, dtype)


def _solve_fp(solver, W, x, backward=None):
    """z* of the DEQ, its info, and the gradients of a loss with respect to W and x."""
    Wl, xl = W.clone().requires_grad_(True), x.clone().requires_grad_(True)
    z, info = il.fixed_point(
        lambda z, x: torch.tanh(z @ Wl.T + x), torch.zeros_like(x), xl, solver=solver,
        backward=backward, batched=True, return_info=True,
    )
    (z * torch.linspace(-1, 1, z.shape[-1], dtype=z.dtype, device=z.device)).sum().backward()
    return z.detach(), info, Wl.grad, xl.grad


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_setting_validates(cls):
    assert cls().cuda_graph is False
    on = cls(cuda_graph=True)
    assert on.cuda_graph is True
    assert "cuda_graph=True" in repr(on)
    assert "cuda_graph" not in repr(cls())
    assert on.replace(cuda_graph=False) == cls()
    assert cls().replace(cuda_graph=True) == on
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="cuda_graph must be True or False"):
            cls(cuda_graph=bad)


def test_adaptive_passes_the_setting_to_the_backward_it_picks(stand_in):
    W, x = _deq(4, 8, torch.float64, "cpu", scale=0.5)
    for flag in (False, True):
        solver = il.solvers.Adaptive(cuda_graph=flag)
        _, info = il.fixed_point(
            lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x), solver=solver,
            batched=True, return_info=True,
        )
        chosen = solver.adjoint_solver(info)
        assert isinstance(chosen, NeumannThenGMRES) and chosen.cuda_graph is flag


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FORWARD))
def test_cpu_tensors_are_refused_in_the_forward(name):
    W, x = _deq(3, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"cuda_graph=True\) replays CUDA graphs and needs CUDA"):
        il.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x),
                       solver=FORWARD[name](cuda_graph=True), batched=True)


@pytest.mark.parametrize("name", list(LINEAR))
def test_cpu_tensors_are_refused_in_a_linear_solve(name):
    A = torch.eye(5, dtype=torch.float64) * 2
    with torch.no_grad(), pytest.raises(ValueError, match="set cuda_graph=False"):
        il.linear.solve(A, torch.ones(5, dtype=torch.float64), LINEAR[name](cuda_graph=True))


def test_unrolled_backward_is_refused(stand_in):
    W, x = _deq(3, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match="cannot run a loop that autograd records"):
        _solve_fp(il.solvers.Picard(cuda_graph=True), W, x, backward=il.backward.Unrolled())


@pytest.mark.parametrize("name", list(LINEAR))
def test_a_linear_solve_in_grad_mode_is_refused(stand_in, name):
    A = torch.eye(5, dtype=torch.float64) * 2
    with pytest.raises(ValueError, match=r"cuda_graph=True\) cannot run a loop that autograd"):
        il.linear.solve(A, torch.ones(5, dtype=torch.float64), LINEAR[name](cuda_graph=True))


def test_double_backward_runs_its_solves_without_recording(stand_in):
    """A double backward differentiates the adjoint solve by another solve (each without
    autograd recording the loop): the setting applies to both, with the same numbers."""
    W, x = _deq(3, 6, torch.float64, "cpu")

    def second(flag):
        xl = x.clone().requires_grad_(True)
        z = il.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), xl,
                           solver=il.solvers.Picard(check_every=2),
                           backward=il.linear.GMRES(check_every=2, cuda_graph=flag), batched=True)
        (g,) = torch.autograd.grad(z.sum(), xl, create_graph=True)
        return g, torch.autograd.grad((g**2).sum(), xl)[0]

    for a, b in zip(second(False), second(True), strict=True):
        assert torch.equal(a, b)
    assert stand_in and all(r.owner == "GMRES" for r in stand_in)


def test_a_chunk_that_changes_shapes_is_refused(stand_in):
    graphs = _cuda_graph.ChunkGraphs("Picard", torch.device("cpu"))
    state = (torch.zeros(3),)
    graphs.run(1, lambda t: (t + 1,), state)
    with pytest.raises(RuntimeError, match="cuda_graph=True.*fixed shapes"):
        graphs.run(1, lambda t: (torch.cat([t, t]),), state)


# -- the chunked loops equal the plain ones (CPU stand-in, exact) ----------------------------
def _compare_forward(make, W, x, check_every, max_steps):
    """z*, gradients and info with and without the setting: bit for bit the same."""
    common = dict(check_every=check_every, max_steps=max_steps, on_failure="ignore")
    plain = _solve_fp(make(**common), W, x)
    graphed = _solve_fp(make(cuda_graph=True, **common), W, x)
    for i in (0, 2, 3):  # z, grad W, grad x
        assert torch.equal(plain[i], graphed[i])
    assert torch.equal(plain[1].steps, graphed[1].steps)
    assert torch.equal(plain[1].converged, graphed[1].converged)
    assert torch.equal(plain[1].residual, graphed[1].residual)
    assert plain[1].solver == graphed[1].solver
    return plain, graphed


@pytest.mark.parametrize("name", list(FORWARD))
@pytest.mark.parametrize(("check_every", "max_steps"), [(4, 500), (3, 22), (8, 37), (5, 9)])
def test_chunked_forward_equals_the_plain_loop(stand_in, name, check_every, max_steps):
    W, x = _deq(6, 16, torch.float64, "cpu")
    plain, _ = _compare_forward(FORWARD[name], W, x, check_every, max_steps)
    # the forward's runner replayed captured chunks (its first chunk is the warm-up)
    forward = [r for r in stand_in if r.owner in name]
    if max_steps >= 3 * check_every and "switching" not in name:
        assert forward[0].replays >= 1
    if max_steps < 500:
        assert int(plain[1].steps.max()) <= max_steps


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize(("check_every", "max_steps"), [(4, 1000), (3, 17), (8, 100), (1, 60)])
def test_chunked_linear_solve_equals_the_plain_loop(stand_in, name, check_every, max_steps):
    W, x = _deq(6, 16, torch.float64, "cpu")
    op = il.linear.MatrixOperator(torch.eye(16, dtype=torch.float64) - 0.8 * W, batch=6)
    common = dict(check_every=check_every, max_steps=max_steps, on_failure="ignore", rtol=1e-12)
    with torch.no_grad():
        u, info = LINEAR[name](**common).solve(op, x)
        ug, infog = LINEAR[name](cuda_graph=True, **common).solve(op, x)
    assert torch.equal(u, ug)
    assert torch.equal(info.steps, infog.steps)
    assert torch.equal(info.converged, infog.converged)
    assert torch.equal(info.residual, infog.residual)
    assert stand_in[0].replays >= 1
    # the reference itself is right: the dense solution where it converged
    ref = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - 0.8 * W, x.T).T
    ok = info.converged
    torch.testing.assert_close(u[ok], ref[ok], rtol=1e-9, atol=1e-9)


def test_chunked_deq_forward_and_backward_equal_the_plain_ones(stand_in):
    """The default solver with the setting on: Adaptive forward, the Neumann+GMRES backward
    it picks (with the setting too), against the same without it and a dense reference."""
    W, x = _deq(6, 16, torch.float64, "cpu")
    plain = _solve_fp(il.solvers.Adaptive(check_every=4), W, x)
    graphed = _solve_fp(il.solvers.Adaptive(check_every=4, cuda_graph=True), W, x)
    for a, b in zip(plain[::2] + plain[3:], graphed[::2] + graphed[3:], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain[1].backward.steps, graphed[1].backward.steps)
    assert len(stand_in) == 2 and all(r.replays >= 1 for r in stand_in)
    # dense implicit gradient of the same loss with respect to x
    z = graphed[0]
    c = torch.linspace(-1, 1, 16, dtype=torch.float64)
    D = 1 - z**2
    J = D.unsqueeze(-1) * W  # (B, n, n): ∂f/∂z per sample
    u = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - J.mT, c.expand(6, 16))
    torch.testing.assert_close(graphed[3], D * u, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("transform", ["jvp", "vmap", "jacrev", "grad of grad"])
def test_chunked_solves_under_torch_func_equal_the_plain_ones(stand_in, transform):
    """The layer's solves see plain tensors under ``torch.func`` transforms: the setting
    applies there too, with the same numbers."""
    W, x = _deq(4, 8, torch.float64, "cpu")

    def layer(flag):
        def g(x):
            return il.fixed_point(
                lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x,
                solver=il.solvers.Picard(check_every=3, cuda_graph=flag),
                backward=il.linear.GMRES(check_every=3, cuda_graph=flag), batched=True,
            )

        return g

    run = {
        "jvp": lambda g: torch.func.jvp(g, (x,), (torch.ones_like(x),))[1],
        "vmap": lambda g: torch.func.vmap(g)(x.unsqueeze(1).expand(4, 3, 8).contiguous()),
        "jacrev": lambda g: torch.func.jacrev(g)(x[:1]),
        "grad of grad": lambda g: torch.func.grad(
            lambda x: torch.func.grad(lambda x: g(x).pow(2).sum())(x).sum()
        )(x),
    }[transform]
    assert torch.equal(run(layer(False)), run(layer(True)))
    assert stand_in and all(r.replays >= 1 for r in stand_in if r.owner == "Picard")


def test_benchmark_runs_and_reports(stand_in):
    """The benchmark's plumbing, small and on the CPU (the stand-in for the graphs)."""
    from benchmarks._common import Config
    from benchmarks.cuda_graphs import run_cuda_graphs

    sec = run_cuda_graphs(Config(tiny=True, device="cpu", threads=None), hidden=32, batch=4)
    assert [r["method"] for r in sec.rows][:3] == [
        "implicit, eager", "implicit, CUDA graphs",
        "implicit, CUDA graphs, default stream (forward only)",
    ]
    assert sec.rows[3]["method"].startswith("autograd through K=")
    assert all(r["grad_W_rel_err"] < 1e-3 for r in sec.rows)
    assert sec.rows[1]["max_abs_diff_vs_eager"] == 0
    assert [t["met"] for t in sec.targets][1] is True


# -- CUDA: graphs replayed against eager execution ------------------------------------------
DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["Picard", "Anderson", "Adaptive", "Picard damped"])
def test_cuda_forward_equals_eager(runners, name, dtype):
    W, x = _deq(16, 64, dtype, "cuda")
    common = dict(check_every=4, max_steps=200, on_failure="ignore")
    make = FORWARD[name]
    with torch.no_grad():
        f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
        ze, ie = il.fixed_point(f, torch.zeros_like(x), solver=make(**common), batched=True,
                                return_info=True)
        zg, ig = il.fixed_point(f, torch.zeros_like(x), solver=make(cuda_graph=True, **common),
                                batched=True, return_info=True)
    torch.testing.assert_close(zg, ze, **_tol(dtype))
    assert torch.equal(ig.steps, ie.steps)
    assert torch.equal(ig.converged, ie.converged)
    assert runners[0].replays >= 1


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("linear", ["Neumann", "GMRES", "GMRES short cycles"])
def test_cuda_backward_equals_eager_on_a_side_stream(runners, linear, dtype):
    """Forward and backward on a side stream: the adjoint solve (products through the
    recorded autograd graph) is captured and replayed."""
    W, x = _deq(16, 64, dtype, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        common = dict(check_every=4, max_steps=200)
        eager = _solve_fp(il.solvers.Picard(**common), W, x,
                          backward=LINEAR[linear](check_every=4, max_steps=400))
        graphed = _solve_fp(il.solvers.Picard(cuda_graph=True, **common), W, x,
                            backward=LINEAR[linear](check_every=4, max_steps=400, cuda_graph=True))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(eager[::2] + eager[3:], graphed[::2] + graphed[3:], strict=True):
        torch.testing.assert_close(b, a, **_tol(dtype))
    assert torch.equal(eager[1].steps, graphed[1].steps)
    assert torch.equal(eager[1].backward.steps, graphed[1].backward.steps)
    assert len(runners) == 2 and all(r.replays >= 1 for r in runners)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_default_deq_with_graphs_equals_eager(runners, dtype):
    """The default solver (Adaptive, and the backward it picks) with the setting on."""
    W, x = _deq(64, 128, dtype, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = _solve_fp(il.solvers.Adaptive(), W, x)
        graphed = _solve_fp(il.solvers.Adaptive(cuda_graph=True), W, x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(eager[::2] + eager[3:], graphed[::2] + graphed[3:], strict=True):
        torch.testing.assert_close(b, a, **_tol(dtype))
    assert torch.equal(eager[1].steps, graphed[1].steps)
    assert eager[1].backward.solver == graphed[1].backward.solver


@cuda
def test_cuda_max_steps_not_a_multiple_of_check_every(runners):
    W, x = _deq(8, 32, torch.float64, "cuda", scale=0.99)
    solver = il.solvers.Picard(rtol=0.0, max_steps=21, check_every=8, on_failure="ignore")
    with torch.no_grad():
        f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
        ze, ie = il.fixed_point(f, torch.zeros_like(x), solver=solver, batched=True,
                                return_info=True)
        zg, ig = il.fixed_point(f, torch.zeros_like(x), solver=solver.replace(cuda_graph=True),
                                batched=True, return_info=True)
    assert ig.steps.tolist() == [21] * 8
    torch.testing.assert_close(zg, ze, rtol=1e-13, atol=1e-14)
    # 21 = 8 (warm-up) + 8 (replayed) + 5 (eager tail)
    assert runners[0].replays == 1 and runners[0].eager_runs == 2


@cuda
def test_cuda_backward_on_the_default_stream_runs_eagerly_with_a_warning(runners, monkeypatch):
    monkeypatch.setattr(_cuda_graph, "_warned_default_stream", False)
    W, x = _deq(8, 32, torch.float64, "cuda")
    eager = _solve_fp(il.solvers.Picard(), W, x, backward=il.linear.GMRES())
    with pytest.warns(RuntimeWarning, match="default CUDA stream"):
        graphed = _solve_fp(il.solvers.Picard(cuda_graph=True), W, x,
                            backward=il.linear.GMRES(cuda_graph=True))
    for a, b in zip(eager[::2] + eager[3:], graphed[::2] + graphed[3:], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _solve_fp(il.solvers.Picard(cuda_graph=True), W, x,
                  backward=il.linear.GMRES(cuda_graph=True))


@cuda
def test_cuda_a_map_that_synchronises_is_refused():
    W, x = _deq(4, 16, torch.float64, "cuda", scale=0.99)

    def f(z):
        if float(z.abs().max()) > 1e6:  # a host synchronisation at every call
            raise AssertionError
        return torch.tanh(z @ W.T + x)

    solver = il.solvers.Picard(rtol=0.0, max_steps=40, check_every=4, on_failure="ignore",
                               cuda_graph=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cuda_graph=True.*capture-safe"):
        il.fixed_point(f, torch.zeros_like(x), solver=solver, batched=True)
    # the device is usable afterwards
    torch.testing.assert_close(torch.ones(3, device="cuda").sum().cpu(), torch.tensor(3.0))
