"""Structured states (``z0`` a tuple, list or dict of tensors) through every problem type,
``custom_root`` and ``nn.DEQ``; and the ``custom_root`` / ``custom_fixed_point`` contract:
keyword arguments forwarded to the optimality function, ``has_aux=True``, and a solution that
requires grad whenever its arguments do.

References: Picard unrolled by hand on the structured map, Newton by hand on the flattened
system with the dense implicit-function-theorem Jacobian, and closed forms (ridge with a bias).

Assumptions about the API, chosen as the natural extension of the single-tensor one:
the solution has the container type and leaf shapes of ``z0``; the map returns the same
structure; with ``batched=True`` the leading dimension of every leaf is the batch and
``info`` fields have shape ``(B,)``; ``il.nn.DEQ`` takes a structured ``z0`` in ``forward``
(``state_shape`` is not used for structured states).
"""

import pytest
import torch

import implicit_layers as il
from tests.helpers import DT, leaf, randn_factory, rel

CONTAINERS = ["tuple", "list", "dict"]





def pack(kind, a, b):
    if kind == "tuple":
        return (a, b)
    if kind == "list":
        return [a, b]
    return {"a": a, "b": b}


def unpack(z):
    return (z["a"], z["b"]) if isinstance(z, dict) else tuple(z)


def assert_same_structure(z, kind, shapes):
    assert type(z).__name__ == kind, type(z)
    leaves = unpack(z)
    assert tuple(tuple(t.shape) for t in leaves) == shapes


class TwoBlock:
    """``a = tanh(M_aa a + M_ab vec(b) + x)``, ``b = tanh(M_ba a + M_bb vec(b))`` with
    ``‖M‖₂ = 0.6``; ``a`` of shape ``(*B, 3)`` and ``b`` of shape ``(*B, 2, 2)``."""

    def __init__(self, device, seed=0):
        randn = randn_factory(seed, device)
        M = randn(7, 7)
        self.M = 0.6 * M / torch.linalg.matrix_norm(M, 2)
        self.c = 0.3 * randn(4)
        self.x = randn(3)
        self.device = device

    def f(self, z, x, M=None):
        M = self.M if M is None else M
        a, b = unpack(z)
        flat = torch.cat([a, b.reshape(*b.shape[:-2], 4)], dim=-1)
        out = torch.tanh(flat @ M.T + torch.cat([x, self.c.expand(*x.shape[:-1], 4)], dim=-1))
        new_a, new_b = out[..., :3], out[..., 3:].reshape(*b.shape)
        kind = "dict" if isinstance(z, dict) else type(z).__name__
        return pack(kind, new_a, new_b)

    def zeros(self, kind, batch=()):
        return pack(kind, torch.zeros(*batch, 3, dtype=DT, device=self.device),
                    torch.zeros(*batch, 2, 2, dtype=DT, device=self.device))

    def picard(self, kind, x, M=None, steps=150):
        z = self.zeros(kind, x.shape[:-1])
        for _ in range(steps):
            z = self.f(z, x, M)
        return z

    @staticmethod
    def outer(z):
        a, b = unpack(z)
        return (a.sin() * a).sum() + (b.cos() * b).sum()


# --------------------------------------------------------------------------------------------
# fixed_point
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CONTAINERS)
def test_fixed_point_structured_state_value_and_gradients(kind, device):
    p = TwoBlock(device)
    x, M = leaf(p.x), leaf(p.M)
    z = il.fixed_point(lambda z, x: p.f(z, x, M), p.zeros(kind), x,
                       solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
    assert_same_structure(z, kind, ((3,), (2, 2)))
    xr, Mr = leaf(p.x), leaf(p.M)
    z_ref = p.picard(kind, xr, Mr)
    for got, ref in zip(unpack(z), unpack(z_ref), strict=True):
        assert rel(got, ref) < 1e-10
    g = torch.autograd.grad(p.outer(z), (x, M))
    g_ref = torch.autograd.grad(p.outer(z_ref), (xr, Mr))
    for got, ref in zip(g, g_ref, strict=True):
        assert rel(got, ref) < 1e-8


@pytest.mark.parametrize("kind", CONTAINERS)
def test_fixed_point_structured_batched_is_per_sample(kind, device):
    p = TwoBlock(device)
    B = 3
    xs = leaf(torch.stack([p.x, 2 * p.x, -0.1 * p.x]))
    z, info = il.fixed_point(p.f, p.zeros(kind, (B,)), xs, batched=True, return_info=True,
                             solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
    assert_same_structure(z, kind, ((B, 3), (B, 2, 2)))
    assert info.steps.shape == (B,) and info.converged.shape == (B,)
    assert bool(info.converged.all())
    for i in range(B):
        zi = il.fixed_point(p.f, p.zeros(kind, (1,)), xs[i:i + 1].detach(), batched=True,
                            solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
        for got, ref in zip(unpack(z), unpack(zi), strict=True):
            assert rel(got[i], ref[0]) < 1e-10
    (g,) = torch.autograd.grad(p.outer(z), xs)
    xr = leaf(xs)
    (g_ref,) = torch.autograd.grad(p.outer(p.picard(kind, xr)), xr)
    assert rel(g, g_ref) < 1e-8


def test_fixed_point_structured_jvp_and_hessian(device):
    p = TwoBlock(device)
    solver = il.solvers.Anderson(rtol=1e-13, max_steps=300)
    layer = lambda x: p.outer(il.fixed_point(p.f, p.zeros("tuple"), x, solver=solver))  # noqa: E731
    ref = lambda x: p.outer(p.picard("tuple", x))  # noqa: E731
    v = randn_factory(1, device)(3)
    _, t = torch.func.jvp(layer, (p.x,), (v,))
    _, t_ref = torch.func.jvp(ref, (p.x,), (v,))
    assert abs(float(t - t_ref)) < 1e-8 * abs(float(t_ref))
    H = torch.autograd.functional.hessian(layer, p.x)
    H_ref = torch.autograd.functional.hessian(ref, p.x)
    assert rel(H, H_ref) < 1e-6


# --------------------------------------------------------------------------------------------
# root, argmin
# --------------------------------------------------------------------------------------------
class TupleRoot:
    """``F(a, b) = (A a + tanh(a) - x, b + b³ - a[:2])``; a unique root."""

    def __init__(self, device, seed=2):
        randn = randn_factory(seed, device)
        Mm, S = randn(3, 3), randn(3, 3)
        self.A = Mm @ Mm.T / 3 + torch.eye(3, dtype=DT, device=device) + 0.2 * (S - S.T)
        self.x = randn(3)
        self.device = device

    def F(self, z, x):
        a, b = z
        return (self.A @ a + torch.tanh(a) - x, b + b**3 - a[:2])

    def flat_F(self, zf, x):
        return torch.cat(self.F((zf[:3], zf[3:]), x))

    def newton(self, x):
        with torch.no_grad():
            zf = torch.zeros(5, dtype=DT, device=self.device)
            for _ in range(40):
                J = torch.autograd.functional.jacobian(lambda z: self.flat_F(z, x), zf)
                zf = zf - torch.linalg.solve(J, self.flat_F(zf, x))
        return zf

    def ift_jacobian(self, zf, x):
        A = torch.autograd.functional.jacobian(lambda z: self.flat_F(z, x), zf)
        Bx = torch.autograd.functional.jacobian(lambda t: self.flat_F(zf, t), x)
        return -torch.linalg.solve(A, Bx)


def test_root_tuple_state_value_and_jacobian(device):
    p = TupleRoot(device)
    z0 = (torch.zeros(3, dtype=DT, device=device), torch.zeros(2, dtype=DT, device=device))
    layer = lambda x: il.root(p.F, z0, x, solver=il.solvers.Broyden(rtol=1e-13, max_steps=300))  # noqa: E731
    z = layer(p.x)
    assert isinstance(z, tuple) and [t.shape for t in z] == [(3,), (2,)]
    zf_ref = p.newton(p.x)
    assert rel(torch.cat(z), zf_ref) < 1e-10
    J = torch.autograd.functional.jacobian(lambda x: torch.cat(layer(x)), p.x)
    assert rel(J, p.ift_jacobian(zf_ref, p.x)) < 1e-8


def test_argmin_dict_state_hypergradient_matches_closed_form(device):
    """Ridge with an unregularised bias, the weights and the bias as a dict."""
    randn = randn_factory(3, device)
    m, d = 20, 4
    X, y = randn(m, d), randn(m) + 1.5
    lam = leaf(0.3 + 0.1 * randn(d).abs())

    def fun(p, lam):
        return 0.5 * (X @ p["w"] + p["b"] - y).square().sum() + 0.5 * (lam * p["w"].square()).sum()

    w0 = {"w": torch.zeros(d, dtype=DT, device=device), "b": torch.zeros((), dtype=DT, device=device)}
    sol = il.argmin(fun, w0, lam, solver=il.solvers.LBFGS(rtol=1e-12))
    assert isinstance(sol, dict) and set(sol) == {"w", "b"}
    assert sol["w"].shape == (d,) and sol["b"].shape == ()

    def closed(lam):
        Xa = torch.cat([X, torch.ones(m, 1, dtype=DT, device=device)], dim=1)
        reg = torch.diag(torch.cat([lam, torch.zeros(1, dtype=DT, device=device)]))
        wa = torch.linalg.solve(Xa.T @ Xa + reg, Xa.T @ y)
        return {"w": wa[:d], "b": wa[d]}

    outer = lambda p: (p["w"].sin()).sum() + p["b"] ** 2  # noqa: E731
    ref = closed(lam)
    assert rel(sol["w"], ref["w"]) < 1e-9 and abs(float((sol["b"] - ref["b"]).detach())) < 1e-9
    (g,) = torch.autograd.grad(outer(sol), lam)
    (g_ref,) = torch.autograd.grad(outer(ref), lam)
    assert rel(g, g_ref) < 1e-8


# --------------------------------------------------------------------------------------------
# custom_root / custom_fixed_point / nn.DEQ with structured states
# --------------------------------------------------------------------------------------------
def test_custom_root_tuple_state(device):
    p = TupleRoot(device)

    @il.custom_root(p.F, rtol=1e-13)
    def solve(z0, x):
        zf = p.newton(x)
        return (zf[:3], zf[3:])

    z0 = (torch.zeros(3, dtype=DT, device=device), torch.zeros(2, dtype=DT, device=device))
    J = torch.autograd.functional.jacobian(lambda x: torch.cat(solve(z0, x)), p.x)
    assert rel(J, p.ift_jacobian(p.newton(p.x), p.x)) < 1e-8


def test_custom_fixed_point_dict_state(device):
    p = TwoBlock(device)

    @il.custom_fixed_point(p.f, rtol=1e-13)
    def solve(z0, x):
        return p.picard("dict", x, steps=200)

    x = leaf(p.x)
    z = solve(p.zeros("dict"), x)
    assert isinstance(z, dict)
    (g,) = torch.autograd.grad(p.outer(z), x)
    xr = leaf(p.x)
    (g_ref,) = torch.autograd.grad(p.outer(p.picard("dict", xr)), xr)
    assert rel(g, g_ref) < 1e-8


class TupleCell(torch.nn.Module):
    """A two-resolution cell: ``f((a, b), x)`` returns a tuple shaped like ``(a, b)``."""

    def __init__(self, seed=4):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(6, 6, generator=gen, dtype=DT)
        self.W = torch.nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))

    def forward(self, z, x):
        a, b = z
        out = torch.tanh(torch.cat([a, b], -1) @ self.W.T + torch.cat([x, x[:, :2]], -1))
        return out[:, :4], out[:, 4:]


def test_deq_tuple_state(device):
    cell = TupleCell().to(device)
    deq = il.nn.DEQ(cell, solver=il.solvers.Anderson(rtol=1e-13, max_steps=300))
    x = randn_factory(5, device)(3, 4)
    z0 = (torch.zeros(3, 4, dtype=DT, device=device), torch.zeros(3, 2, dtype=DT, device=device))
    z, info = deq(x, z0, return_info=True)
    assert isinstance(z, tuple) and z[0].shape == (3, 4) and z[1].shape == (3, 2)
    assert info.steps.shape == (3,)
    zr = z0
    for _ in range(150):
        zr = cell(zr, x)
    for got, ref in zip(z, zr, strict=True):
        assert rel(got, ref) < 1e-10
    loss = lambda z: (z[0].sin()).sum() + z[1].square().sum()  # noqa: E731
    (g,) = torch.autograd.grad(loss(z), cell.W)
    (g_ref,) = torch.autograd.grad(loss(zr), cell.W)
    assert rel(g, g_ref) < 1e-8


# --------------------------------------------------------------------------------------------
# Refusals of malformed structures
# --------------------------------------------------------------------------------------------
def test_map_returning_another_structure_is_refused(device):
    p = TwoBlock(device)

    def swapped(z, x):
        a, b = unpack(p.f(z, x))
        return {"a": a, "b": b}  # z0 is a tuple

    # the well-formed call works, so the refusals below are about the structure alone
    assert isinstance(il.fixed_point(p.f, p.zeros("tuple"), p.x), tuple)
    with pytest.raises((ValueError, TypeError), match=r"(?i)struct|tree|tuple|dict|z0"):
        il.fixed_point(swapped, p.zeros("tuple"), p.x)
    with pytest.raises((ValueError, TypeError), match=r"(?i)struct|tree|tuple|leaves|z0"):
        il.fixed_point(lambda z, x: unpack(p.f(z, x))[0], p.zeros("tuple"), p.x)


def test_batched_leaves_with_different_batch_sizes_are_refused(device):
    p = TwoBlock(device)
    xs = torch.stack([p.x] * 3)
    z, info = il.fixed_point(p.f, p.zeros("tuple", (3,)), xs, batched=True, return_info=True)
    assert info.steps.shape == (3,)
    z0 = (torch.zeros(3, 3, dtype=DT, device=device), torch.zeros(2, 2, 2, dtype=DT, device=device))
    with pytest.raises(ValueError, match=r"(?i)batch"):
        il.fixed_point(p.f, z0, xs, batched=True)


# --------------------------------------------------------------------------------------------
# custom_root / custom_fixed_point contract
# --------------------------------------------------------------------------------------------
def test_custom_root_forwards_keyword_arguments(device):
    """``solver(z0, x, scale=s)``: the optimality function is called with ``scale=s`` too, and a
    tensor keyword argument receives its gradient."""
    randn = randn_factory(6, device)
    M = randn(3, 3)
    A = M @ M.T / 3 + torch.eye(3, dtype=DT, device=device)

    def F(z, x, *, scale):
        return scale * (A @ z) - x

    @il.custom_root(F, symmetric=True, rtol=1e-13)
    def solve(z0, x, *, scale):
        return torch.linalg.solve(scale * A, x)

    x, s = leaf(randn(3)), leaf(torch.tensor(1.7, dtype=DT, device=device))
    z = solve(torch.zeros(3, dtype=DT, device=device), x, scale=s)
    gx, gs = torch.autograd.grad(z.sin().sum(), (x, s))
    xr, sr = leaf(x), leaf(s)
    gx_ref, gs_ref = torch.autograd.grad(torch.linalg.solve(sr * A, xr).sin().sum(), (xr, sr))
    assert rel(gx, gx_ref) < 1e-9
    assert abs(float(gs - gs_ref)) < 1e-9 * abs(float(gs_ref))
    # a plain float keyword argument reaches F as well
    z2 = solve(torch.zeros(3, dtype=DT, device=device), x, scale=2.0)
    (g2,) = torch.autograd.grad(z2.sum(), x)
    assert rel(g2, torch.linalg.solve(2.0 * A, torch.ones(3, dtype=DT, device=device))) < 1e-9


@pytest.mark.parametrize("decorator", ["custom_root", "custom_fixed_point"])
def test_has_aux_returns_aux_without_implicit_gradient(decorator, device):
    randn = randn_factory(7, device)
    W = randn(3, 3)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    f = lambda z, x: torch.tanh(W @ z + x)  # noqa: E731

    def picard(z0, x):
        z, steps = z0, 0
        while float((f(z, x) - z).norm()) > 1e-14 and steps < 500:
            z, steps = f(z, x), steps + 1
        return z, {"steps": steps, "last": z.clone()}

    if decorator == "custom_root":
        wrapped = il.custom_root(lambda z, x: f(z, x) - z, rtol=1e-13, has_aux=True)(picard)
    else:
        wrapped = il.custom_fixed_point(f, rtol=1e-13, has_aux=True)(picard)
    x = leaf(randn(3))
    out = wrapped(torch.zeros(3, dtype=DT, device=device), x)
    assert isinstance(out, tuple) and len(out) == 2
    z, aux = out
    assert aux["steps"] > 0
    assert not aux["last"].requires_grad
    assert z.requires_grad
    (g,) = torch.autograd.grad(z.sum(), x)
    zs = aux["last"]
    J = torch.linalg.solve(torch.eye(3, dtype=DT, device=device)
                           - torch.diag(1 - torch.tanh(W @ zs + x.detach()) ** 2) @ W,
                           torch.diag(1 - torch.tanh(W @ zs + x.detach()) ** 2))
    assert rel(g, J.T @ torch.ones(3, dtype=DT, device=device)) < 1e-9


def test_has_aux_with_a_solver_returning_a_bare_tensor_is_refused(device):
    @il.custom_root(lambda z, x: z - x, has_aux=True)
    def solve(z0, x):
        return x.clone()

    x = leaf(torch.ones(3, dtype=DT, device=device))
    with pytest.raises((TypeError, ValueError), match=r"(?i)aux"):
        solve(torch.zeros(3, dtype=DT, device=device), x)


def test_solution_requires_grad_when_args_do_even_with_zero_gradient(device):
    """``argmin_w ‖w‖² + c`` does not depend on ``c``; ``w*`` still requires grad (as a torch op
    would), ``backward()`` works and ``c`` gets a zero gradient."""
    c = leaf(torch.tensor(0.5, dtype=DT, device=device))
    w0 = torch.ones(3, dtype=DT, device=device)
    w = il.argmin(lambda w, c: (w**2).sum() + c, w0, c)
    assert w.requires_grad
    w.sum().backward()
    assert c.grad is None or float(c.grad.abs()) == 0.0

    @il.custom_root(lambda z, c: z - 2.0)
    def solve(z0, c):
        return torch.full_like(z0, 2.0)

    c2 = leaf(torch.tensor(0.5, dtype=DT, device=device))
    z = solve(w0, c2)
    assert z.requires_grad
    (g,) = torch.autograd.grad(z.sum(), c2, allow_unused=True, materialize_grads=True)
    assert float(g.abs()) == 0.0
    with torch.no_grad():
        assert not solve(w0, c2).requires_grad
    assert not il.argmin(lambda w, c: (w**2).sum() + c, w0, c.detach()).requires_grad
