"""Failure is never silent and user mistakes are explained: non-convergence warns (or raises
with ``on_failure="raise"``), NaN raises :class:`il.NonFiniteError` instead of returning NaN
gradients, and bad arguments raise ``TypeError``/``ValueError`` naming the argument."""

import functools

import pytest
import torch

import implicit_layers as il
from tests import registry

DT = torch.float64


def contractive(device, n=5, scale=0.9):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=gen, dtype=DT).to(device)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(n, generator=gen, dtype=DT).to(device)
    return W, x


def f_tanh(W):
    return lambda z, x: torch.tanh(W @ z + x)


def quartic(w, x):
    return ((w - x) ** 2).sum() + 0.1 * (w**4).sum()


# -- non-convergence ---------------------------------------------------------------------

FIXED_POINT_SOLVERS = [c.cls for c in registry.forward("fixed_point")]
ARGMIN_SOLVERS = [c.cls for c in registry.forward("argmin") if c.cls not in FIXED_POINT_SOLVERS]


@pytest.mark.parametrize("solver_cls", FIXED_POINT_SOLVERS + ARGMIN_SOLVERS,
                         ids=lambda c: c.__name__)
def test_forward_non_convergence_warns_with_solver_name(solver_cls, device):
    W, x = contractive(device)
    solver = solver_cls(max_steps=1)
    with pytest.warns(il.ConvergenceWarning,
                      match=rf"{solver_cls.__name__}.*residual.*tolerance.*max_steps"):
        if solver_cls in FIXED_POINT_SOLVERS:
            z, info = il.fixed_point(f_tanh(W), torch.zeros_like(x), x, solver=solver,
                                     return_info=True)
        else:
            z, info = il.argmin(quartic, torch.zeros_like(x), 3 * x, solver=solver,
                                return_info=True)
    assert not bool(info.converged)
    assert int(info.steps) == 1
    assert float(info.residual) > float(info.tolerance)


@pytest.mark.parametrize("solver_cls", FIXED_POINT_SOLVERS + ARGMIN_SOLVERS,
                         ids=lambda c: c.__name__)
def test_forward_non_convergence_raises_when_strict(solver_cls, device):
    W, x = contractive(device)
    solver = solver_cls(max_steps=1, on_failure="raise")
    with pytest.raises(il.ConvergenceError, match=solver_cls.__name__):
        if solver_cls in FIXED_POINT_SOLVERS:
            il.fixed_point(f_tanh(W), torch.zeros_like(x), x, solver=solver)
        else:
            il.argmin(quartic, torch.zeros_like(x), 3 * x, solver=solver)


def test_forward_on_failure_ignore_reports_in_info(device):
    W, x = contractive(device)
    solver = il.solvers.Picard(max_steps=2, on_failure="ignore")
    _, info = il.fixed_point(f_tanh(W), torch.zeros_like(x), x, solver=solver, return_info=True)
    assert not bool(info.converged)


# The iterative solvers of a fixed point's non-symmetric adjoint (GMRES restarted every step,
# so that one step cannot solve the system).
BACKWARD_SOLVERS = {
    c.name: functools.partial(c.make, **({"restart": 1} if c.name == "GMRES" else {}))
    for c in registry.linear("contract", iterative=True)
}


@pytest.mark.parametrize("name", sorted(BACKWARD_SOLVERS))
def test_backward_non_convergence_warns_or_raises(name, device):
    W, x0 = contractive(device, scale=0.95)

    def grad(linear):
        x = x0.clone().requires_grad_(True)
        z = il.fixed_point(f_tanh(W), torch.zeros_like(x0), x, backward=linear)
        return torch.autograd.grad(z.sum(), x)[0]

    with pytest.warns(il.ConvergenceWarning, match=rf"{name}.*backward.*residual"):
        grad(BACKWARD_SOLVERS[name](max_steps=1))
    with pytest.raises(il.ConvergenceError, match=name):
        grad(BACKWARD_SOLVERS[name](max_steps=1, on_failure="raise"))


def test_backward_info_reports_non_convergence(device):
    W, x0 = contractive(device, scale=0.95)
    x = x0.clone().requires_grad_(True)
    z, info = il.fixed_point(f_tanh(W), torch.zeros_like(x0), x, return_info=True,
                             backward=il.linear.Neumann(max_steps=2, on_failure="ignore"))
    z.sum().backward()
    assert not bool(info.backward.converged)
    assert int(info.backward.steps) == 2


# -- NaN / Inf ---------------------------------------------------------------------------


def nan_vector(device, n=5):
    x = torch.ones(n, dtype=DT, device=device)
    x[2] = float("nan")
    return x


def test_nan_input_raises_in_forward(device):
    W, _ = contractive(device)
    x = nan_vector(device)
    z0 = torch.zeros_like(x)
    for solver in (il.solvers.Picard(), il.solvers.Anderson(), il.solvers.Broyden()):
        with pytest.raises(il.NonFiniteError, match=solver.name):
            il.fixed_point(f_tanh(W), z0, x, solver=solver)
    with pytest.raises(il.NonFiniteError, match="Broyden"):
        il.root(lambda z, x: z + torch.tanh(z) - x, z0, x)
    for solver in (il.solvers.LBFGS(), il.solvers.Newton(), il.solvers.GradientDescent(0.1)):
        with pytest.raises(il.NonFiniteError, match=solver.name):
            il.argmin(quartic, z0, x, solver=solver)


def test_nan_initial_guess_raises(device):
    W, x = contractive(device)
    with pytest.raises(il.NonFiniteError):
        il.fixed_point(f_tanh(W), nan_vector(device), x)


def test_nan_in_one_sample_of_a_batch_raises(device):
    W, x = contractive(device)
    xb = torch.stack([x, nan_vector(device), x])
    with pytest.raises(il.NonFiniteError):
        il.fixed_point(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(xb), xb,
                       batched=True)


@pytest.mark.parametrize("name", [c.name for c in registry.linear("contract")])
def test_nan_cotangent_raises_instead_of_nan_gradient(name, device):
    W, x0 = contractive(device)
    x = x0.clone().requires_grad_(True)
    linear = getattr(il.linear, name)()
    z = il.fixed_point(f_tanh(W), torch.zeros_like(x0), x, backward=linear)
    with pytest.raises(il.NonFiniteError):
        torch.autograd.grad(z, x, nan_vector(device))


@pytest.mark.parametrize(
    "name", [c.name for c in registry.linear("spd") if c.symmetric_only or not c.iterative]
)
def test_nan_cotangent_raises_argmin(name, device):
    _, x0 = contractive(device)
    x = x0.clone().requires_grad_(True)
    w = il.argmin(quartic, torch.zeros_like(x0), x, backward=getattr(il.linear, name)())
    with pytest.raises(il.NonFiniteError):
        torch.autograd.grad(w, x, nan_vector(device))


def test_diverging_backward_raises_not_nan(device):
    """Forward converges (Anderson solves the linear map), but ``|∂f/∂z| = 1000``: the
    Neumann series for the adjoint blows up and must raise, not return Inf/NaN."""
    x = torch.ones(3, dtype=DT, device=device, requires_grad=True)
    z = il.fixed_point(lambda z, x: -1e3 * z + x, torch.zeros(3, dtype=DT, device=device), x,
                       backward=il.linear.Neumann(max_steps=300, alpha=1.0))
    with pytest.raises(il.NonFiniteError, match="Neumann"):
        torch.autograd.grad(z.sum(), x)


# -- bad arguments -----------------------------------------------------------------------


def test_f_returning_wrong_shape(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(ValueError, match=r"f must return a tensor shaped like z0 \(3,\).*\(4,\)"):
        il.fixed_point(lambda z: torch.zeros(4, dtype=DT, device=device), z0)
    with pytest.raises(ValueError, match=r"F must return.*\(2,\)"):
        il.root(lambda z: z[:2], z0)


def test_f_returning_non_tensor(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="f must return a torch.Tensor, got list"):
        il.fixed_point(lambda z: [0.0, 0.0, 0.0], z0)
    with pytest.raises(TypeError, match="F must return a torch.Tensor, got float"):
        il.root(lambda z: 1.0, z0)
    with pytest.raises(TypeError, match="fun must return a torch.Tensor"):
        il.argmin(lambda w: w.tolist(), z0)


def test_f_returning_wrong_dtype(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="f returned dtype torch.float32"):
        il.fixed_point(lambda z: torch.zeros(3, device=device), z0)


def test_argmin_objective_not_scalar(device):
    w0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(ValueError, match=r"fun must return a scalar.*\(3,\)"):
        il.argmin(lambda w: w**2, w0)


def test_batched_argmin_objective_wrong_shape(device):
    w0 = torch.zeros(2, 3, dtype=DT, device=device)
    with pytest.raises(ValueError, match=r"fun must return one value per problem, shape \(2,\)"):
        il.argmin(lambda w: (w**2).sum(), w0, batched=True)
    with pytest.raises(ValueError, match=r"fun must return one value per problem.*\(2, 3\)"):
        il.argmin(lambda w: w**2, w0, batched=True)


def test_z0_not_a_tensor_or_integer():
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor, got list"):
        il.fixed_point(lambda z: z, [0.0, 1.0])
    with pytest.raises(TypeError, match="z0 must be a floating-point tensor.*int64"):
        il.root(lambda z: z, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="w0 must be a floating-point tensor"):
        il.argmin(lambda w: (w**2).sum(), torch.zeros(3, dtype=torch.int32))


def test_fn_not_callable(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="f must be callable"):
        il.fixed_point(3, z0)
    with pytest.raises(TypeError, match="optimality_fn must be callable"):
        il.custom_root("not a function")


def test_batched_flag_checked(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="batched must be True or False"):
        il.fixed_point(lambda z: 0.5 * z, z0, batched=1)
    with pytest.raises(ValueError, match="batched=True needs z0 with a leading batch"):
        il.fixed_point(lambda z: 0.5 * z, torch.zeros((), dtype=DT), batched=True)


def test_linear_solver_passed_as_solver(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="solver must be a forward solver.*GMRES.*backward="):
        il.fixed_point(lambda z: 0.5 * z, z0, solver=il.linear.GMRES())


def test_backward_given_a_string(device):
    z0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(TypeError, match="backward must be a backward mode.*got str"):
        il.fixed_point(lambda z: 0.5 * z, z0, backward="implicit")
    with pytest.raises(TypeError, match="backward must be"):
        il.custom_root(lambda z: z, backward="cg")


def test_anderson_for_argmin(device):
    w0 = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(ValueError, match="solver Anderson does not solve argmin.*LBFGS"):
        il.argmin(lambda w: (w**2).sum(), w0, solver=il.solvers.Anderson())
    with pytest.raises(ValueError, match="solver LBFGS does not solve fixed_point"):
        il.fixed_point(lambda z: 0.5 * z, w0, solver=il.solvers.LBFGS())


def test_unrolled_through_newton_or_black_box(device):
    w0 = torch.zeros(3, dtype=DT, device=device)
    x = torch.ones(3, dtype=DT, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="Unrolled.*Newton"):
        il.argmin(quartic, w0, x, solver=il.solvers.Newton(), backward=il.backward.Unrolled())
    black_box = il.custom_root(lambda z, x: z - x, backward=il.backward.Unrolled())(
        lambda z0, x: x.clone()
    )
    with pytest.raises(ValueError, match="Unrolled"):
        black_box(w0, x)


def test_cg_on_operator_declared_non_symmetric(device):
    b = torch.ones(3, dtype=DT, device=device)
    op = il.linear.FunctionOperator(lambda v: 2 * v, 1, 3, DT, device, symmetric=False)
    with pytest.raises(ValueError, match="CG needs a symmetric operator.*symmetric=True"):
        il.linear.solve(op, b.unsqueeze(0), solver=il.linear.CG())
    with pytest.raises(ValueError, match="CG needs a symmetric operator"):
        il.linear.solve(lambda v: 2 * v, b, solver=il.linear.CG(), symmetric=False)


def test_cg_as_backward_of_a_fixed_point(device):
    """The fixed-point adjoint ``I - Jᵀ`` is not symmetric: CG must refuse, not guess."""
    W, x0 = contractive(device)
    x = x0.clone().requires_grad_(True)
    z = il.fixed_point(f_tanh(W), torch.zeros_like(x0), x, backward=il.linear.CG())
    with pytest.raises(ValueError, match="CG needs a symmetric operator"):
        z.sum().backward()


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: il.solvers.Anderson(max_steps=0), ValueError, "max_steps must be >= 1, got 0"),
        (lambda: il.solvers.LBFGS(max_steps=2.5), TypeError, "max_steps must be an int"),
        (lambda: il.linear.CG(max_steps=0), ValueError, "max_steps must be >= 1, got 0"),
        (lambda: il.solvers.Picard(rtol=-1), ValueError, "rtol must be >= 0, got -1"),
        (lambda: il.linear.GMRES(rtol=-1), ValueError, "rtol must be >= 0, got -1"),
        (lambda: il.solvers.Broyden(atol="x"), TypeError, "atol must be a float"),
        (lambda: il.solvers.Picard(on_failure="loud"), ValueError, "on_failure must be one of"),
        (lambda: il.linear.Neumann(on_failure="loud"), ValueError, "on_failure must be one of"),
        (lambda: il.backward.Phantom(damping=0), ValueError, "damping must be > 0, got 0"),
        (lambda: il.backward.Truncated(0), ValueError, "steps must be >= 1, got 0"),
        (lambda: il.backward.Implicit("cg"), TypeError, "linear_solver must be an il.linear"),
        (lambda: il.backward.Implicit(fallback=il.backward.Unrolled()), TypeError,
         "fallback must be"),
        (lambda: il.solvers.Picard(damping=0), ValueError, "damping must be > 0"),
        (lambda: il.solvers.Anderson(mixing=2.0), ValueError, "mixing must lie in"),
        (lambda: il.solvers.GradientDescent(-0.1), ValueError, "step_size must be > 0"),
        (lambda: il.solvers.GradientDescent("big"), TypeError, "step_size must be a float"),
        (lambda: il.linear.Neumann(alpha=0), ValueError, "alpha must be > 0"),
    ],
)
def test_bad_constructor_arguments(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()
