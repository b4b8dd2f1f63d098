"""The lean paths of a layer call give what the general paths give.

* The capture of the tensors a function reads (its ``TorchFunctionMode`` does the least per
  operation) finds the same tensors, in the same order, as a plain reference that flattens
  every operation's arguments with ``tree_flatten``: closures, keyword and list arguments,
  ``torch.func`` transforms inside the function and around it, forward-mode duals.
* ``leaves`` (pytree flattening without pytree for flat trees) equals ``tree_flatten``.
* The autograd Functions of the core, applied without torch's signature binding, give the
  closed-form gradient, under ``torch.func`` too, and accept a dead ``torch.func`` wrapper.
* The fast paths of the entry points keep their errors.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import implicit_layers as il
from implicit_layers._capture import capture, carries_derivatives, current_level, outer_tensor
from implicit_layers._problem import leaves
from implicit_layers.functional import _detached

D = torch.float64


class _Reference(TorchFunctionMode):
    """The capture written plainly: every argument tree flattened, every check made."""

    def __init__(self, exclude):
        super().__init__()
        self.inside = {id(t) for t in exclude}
        self.keep, self.found, self.level = [], {}, current_level()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor):
                continue
            t = outer_tensor(t, self.level)
            if id(t) not in self.inside and id(t) not in self.found and carries_derivatives(t):
                self.found[id(t)] = t
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.inside.add(id(t))
                self.keep.append(t)
        return out


def _reference(fn, exclude=()):
    mode = _Reference(exclude)
    with mode:
        out = fn()
    return out, list(mode.found.values())


def _same(a, b):
    return [id(t) for t in a] == [id(t) for t in b]


def _tensors():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, dtype=D, generator=gen)
    a = torch.randn(4, dtype=D, generator=gen).requires_grad_()
    b = torch.randn(4, dtype=D, generator=gen).requires_grad_()
    c = torch.randn(4, dtype=D, generator=gen)  # no grad: never captured
    return z, a, b, c


def _functions(a, b, c):
    lin = torch.nn.Linear(4, 4, dtype=D)
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)

    def inner_grad(z):  # a transform run inside the function: lam arrives wrapped
        return torch.func.grad(lambda w, s: (s * w ** 2).sum())(z, lam) + a

    return {
        "closure, reused, no-grad tensor": lambda z: (z * a + b) * a + c,
        "keyword argument": lambda z: torch.clamp(z, min=b.detach() - 1, max=b) + torch.add(z, a, alpha=2),
        "list argument": lambda z: torch.cat([z, a.expand(3, 4), c.expand(3, 4)], -1)[:, :4] * b,
        "module parameters": lambda z: lin(z) * a,
        "derived tensor read twice": (lambda d: lambda z: z * d + d)(a * 2),
        "inner torch.func.grad": inner_grad,
        "tuple output": lambda z: torch.sort(z * a, -1)[0] + torch.max(z * b, -1).values.unsqueeze(-1),
    }


@pytest.mark.parametrize("name", list(_functions(*_tensors()[1:])))
def test_capture_finds_what_the_plain_reference_finds(name):
    z, a, b, c = _tensors()
    fn = _functions(a, b, c)[name]
    with torch.no_grad():
        out, found = capture(lambda: fn(z), exclude=(z,))
        ref_out, expected = _reference(lambda: fn(z), exclude=(z,))
    assert expected, "each case reads some tensor that carries derivatives"
    assert _same(found, expected)
    assert all(not any(t is e for e in (z, c)) for t in found)
    torch.testing.assert_close(out, ref_out)


def test_capture_under_an_outer_transform_and_forward_mode():
    """Around the function: torch.func.grad wraps its argument (found at that level), and a
    forward-mode dual carries a tangent (found)."""
    z, a, b, _ = _tensors()

    def found_by(mode_capture, x, y):
        with torch.no_grad():
            return mode_capture(lambda: (z * x).sin() * y + x, exclude=(z,))[1]

    def total(x):
        got = found_by(capture, x, b)
        assert _same(got, found_by(_reference, x, b))
        assert len(got) == 2 and got[0] is x and got[1] is b
        return (z * x).sum()

    torch.func.grad(total)(a.detach())
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(a.detach(), torch.ones_like(a))
        got = found_by(capture, dual, b.detach())
        assert _same(got, found_by(_reference, dual, b.detach()))
        assert len(got) == 1 and got[0] is dual


_Pair = namedtuple("_Pair", "x y")


@pytest.mark.parametrize("tree", [
    torch.ones(2), (torch.ones(2), 1, 2.5, True, "s"), [torch.ones(1), torch.zeros(2)], (), [],
    (torch.ones(1), (torch.ones(2), 3)), (torch.ones(1), None), {"a": torch.ones(1)},
    _Pair(torch.ones(1), 2), (torch.ones(1), _Pair(torch.ones(2), torch.ones(3))), 5, None,
    (torch.nn.Parameter(torch.ones(2)), 1 + 2j),
])
def test_leaves_equals_tree_flatten(tree):
    got, expected = leaves(tree), tree_flatten(tree)[0]
    assert len(got) == len(expected)
    assert all(g is e for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("tree", [
    (torch.ones(2, requires_grad=True), 3, 2.0), {}, {"k": torch.ones(1, requires_grad=True)},
    torch.ones(2, requires_grad=True),
    (torch.ones(1, requires_grad=True), (torch.ones(1, requires_grad=True),)),
    (torch.ones(1), None),
])
def test_detached_detaches_every_tensor_and_keeps_the_structure(tree):
    out = _detached(tree)
    got, spec = tree_flatten(out)
    want, want_spec = tree_flatten(tree)
    assert spec == want_spec
    for g, w in zip(got, want, strict=True):
        if isinstance(w, torch.Tensor):
            assert not g.requires_grad and g.data_ptr() == w.data_ptr()
        else:
            assert g == w


def _affine_fixed_point(x):
    """z = A z + x: z* = (I - A)⁻¹ x, d(sum z*)/dx = (I - A)⁻ᵀ 1."""
    A = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=D)
    z = il.fixed_point(lambda z, x: z @ A.T + x, torch.zeros(2, dtype=D), x,
                       solver=il.solvers.Anderson(rtol=1e-12))
    expected = torch.linalg.solve((torch.eye(2, dtype=D) - A).T, torch.ones(2, dtype=D))
    return z, expected


def test_core_function_gradient_eager_and_under_torch_func():
    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    z, expected = _affine_fixed_point(x)
    (g,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)
    g_func = torch.func.grad(lambda x: _affine_fixed_point(x)[0].sum())(x.detach())
    torch.testing.assert_close(g_func, expected, rtol=1e-9, atol=1e-12)
    # create_graph: the linear solve of the backward is a core Function too
    (g2,) = torch.autograd.grad(_affine_fixed_point(x)[0].sum(), x, create_graph=True)
    torch.testing.assert_close(g2.detach(), expected, rtol=1e-9, atol=1e-12)


def test_core_function_accepts_a_dead_torch_func_wrapper():
    """A tensor that escaped a finished torch.func.grad is a dead wrapper: the layer unwraps it
    (as torch's own apply does) and gives the same solution."""
    leaked = []

    def f(x):
        leaked.append(x * 1.0)
        return x.sum()

    torch.func.grad(f)(torch.tensor([1.0, -2.0], dtype=D))
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    z_dead = _affine_fixed_point(leaked[0])[0]
    z_plain = _affine_fixed_point(torch.tensor([1.0, -2.0], dtype=D))[0]
    torch.testing.assert_close(z_dead, z_plain)


def test_entry_errors_unchanged():
    f = lambda z: z  # noqa: E731
    for z0 in [(torch.ones(2, dtype=D), 3.0), [torch.ones(2, dtype=D), 3.0]]:
        with pytest.raises(TypeError, match=r"also accepted, but its leaf 1 is a float"):
            il.fixed_point(f, z0)
    with pytest.raises(TypeError, match=r"z0 leaf 1 must be a floating"):
        il.fixed_point(f, (torch.ones(2, dtype=D), torch.ones(2, dtype=torch.int64)))
    with pytest.raises(TypeError, match="must return a torch.Tensor, got tuple"):
        il.fixed_point(lambda z: (z,), torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="structure and shapes of z0"):
        il.fixed_point(lambda z: (z[0],), (torch.ones(2, dtype=D), torch.ones(1, dtype=D)))
    with pytest.raises(ValueError, match="must return a solution shaped like z0"):
        one = torch.ones(2, dtype=D)
        il.custom_root(lambda z, a: z - a)(lambda z0, a: (z0, z0))(one, one)


def test_nested_explicit_arguments_still_reach_the_gradient():
    """Arguments that are not a flat tuple of tensors take the pytree path: their tensors are
    differentiated (here through a double backward, which substitutes them)."""
    a = torch.tensor([0.5, -1.0], dtype=D, requires_grad=True)
    s = torch.tensor(2.0, dtype=D, requires_grad=True)
    # argmin of ½ s ‖w‖² - aᵀw: w* = a / s; Σ w* = Σa / s
    w = il.argmin(lambda w, p: 0.5 * p["s"] * (w ** 2).sum() - (w * p["a"][0]).sum(),
                  torch.zeros(2, dtype=D), {"a": (a,), "s": s},
                  solver=il.solvers.LBFGS(rtol=1e-12))
    ga, gs = torch.autograd.grad(w.sum(), (a, s), create_graph=True)
    torch.testing.assert_close(ga, torch.full((2,), 0.5, dtype=D), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gs, -a.sum() / s ** 2, rtol=1e-8, atol=1e-10)
    (dgs_ds,) = torch.autograd.grad(gs, s)
    torch.testing.assert_close(dgs_ds, 2 * a.sum().detach() / 8.0, rtol=1e-6, atol=1e-9)


def test_least_squares_output_errors_unchanged():
    w0 = torch.ones(2, dtype=D)
    with pytest.raises(TypeError, match=r"got tuple \(a tuple of tensors: concatenate them with torch.cat\)"):
        il.least_squares(lambda w: (w, w), w0)
    with pytest.raises(TypeError, match=r"floating-point torch.Tensor of residuals, got torch.int64\."):
        il.least_squares(lambda w: (w > 0).long(), w0)


def test_python_call_count_of_the_ridge_breakdown():
    """The count that ``benchmarks.ridge_breakdown`` prints: every call is counted once, by
    where it is defined."""
    from benchmarks.ridge_breakdown import python_calls

    def two() -> int:
        return len([1]) + len([2])

    counts = python_calls(lambda: two())
    # the lambda and two(); len twice and the sys.setprofile(None) that ends the count
    assert counts["other"] == 2 and counts["builtins"] == 3
    x = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    counts = python_calls(lambda: _affine_fixed_point(x))
    assert counts["implicit_layers"] > 10 and counts["torch"] > 0
    assert counts["in all"] == sum(v for k, v in counts.items() if k != "in all")
