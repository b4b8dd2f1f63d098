"""Settings objects: frozen, keyword-only, ``replace``, evaluable ``repr``, value equality."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import implicit_layers as il
from tests import registry

ALL = registry.params(list(registry.FORWARD) + list(registry.LINEAR))
NAMESPACE = {**vars(il.solvers), **vars(il.linear)}


def _namespace(case: registry.SolverCase) -> dict:
    # il.solvers.Broyden and il.linear.Broyden share a name: evaluate in the right module.
    module = il.solvers if case in registry.FORWARD else il.linear
    return dict(vars(module))


@pytest.mark.parametrize("case", ALL)
def test_repr_evaluates_back_to_an_equal_object(case):
    solver = case.make()
    for obj in (solver, solver.replace(max_steps=7, atol=1e-3, on_failure="ignore")):
        again = eval(repr(obj), _namespace(case))
        assert again == obj and hash(again) == hash(obj)
        assert type(again) is type(obj)
    assert solver != solver.replace(max_steps=solver.max_steps + 1)


@pytest.mark.parametrize("case", ALL)
def test_settings_are_frozen(case):
    solver = case.make()
    for name in solver.settings():
        with pytest.raises(AttributeError, match=rf"immutable.*{name}.*replace"):
            setattr(solver, name, getattr(solver, name))
    with pytest.raises(AttributeError, match="immutable"):
        solver.brand_new = 1
    with pytest.raises(AttributeError, match="immutable"):
        del solver.max_steps


@pytest.mark.parametrize("case", ALL)
def test_replace_validates_and_leaves_the_original_alone(case):
    solver = case.make()
    changed = solver.replace(max_steps=3)
    assert changed.max_steps == 3 and solver == case.make()  # the original is unchanged
    assert changed.settings() == {**solver.settings(), "max_steps": 3}
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        solver.replace(max_steps=0)
    with pytest.raises(ValueError, match="on_failure must be one of"):
        solver.replace(on_failure="bogus")
    with pytest.raises(TypeError, match=r"replace\(\) got unknown setting\(s\) tol, x; its settings"):
        solver.replace(tol=1.0, x=2)


@pytest.mark.parametrize("case", ALL)
def test_copies_and_pickles_stay_frozen_and_equal(case):
    solver = case.make()
    for other in (copy.copy(solver), copy.deepcopy(solver), pickle.loads(pickle.dumps(solver))):
        assert other == solver
        with pytest.raises(AttributeError, match="immutable"):
            other.max_steps = 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: il.linear.CG(1e-3), r"CG\(\) takes no argument positionally"),
        (lambda: il.linear.GMRES(20, 1e-3), r"GMRES\(\) takes only restart positionally"),
        (lambda: il.linear.LiSSA(6.0), r"LiSSA\(\) takes no argument positionally"),
        (lambda: il.linear.Neumann(10, 0.5), r"Neumann\(\) takes only max_steps positionally"),
        (lambda: il.solvers.Anderson(5, 0.5), r"Anderson\(\) takes only memory positionally"),
        (lambda: il.solvers.Newton(50), r"Newton\(\) takes no argument positionally"),
    ],
)
def test_positional_settings_are_refused(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_the_positional_algorithm_parameters():
    assert il.linear.GMRES(30).restart == 30 and il.linear.GMRES(30).rtol is None
    assert il.linear.Broyden(10).memory == 10 == il.solvers.Broyden(10).memory
    assert il.linear.Neumann(50).max_steps == 50
    assert il.solvers.Anderson(3).memory == 3
    assert il.solvers.Picard(0.5).damping == 0.5
    assert il.solvers.GradientDescent(0.1).gradient_step_size() == 0.1


def test_repr_shows_only_changed_settings():
    assert repr(il.linear.CG()) == "CG()"
    assert repr(il.linear.GMRES(30, rtol=1e-6)) == "GMRES(restart=30, rtol=1e-06)"
    assert repr(il.linear.LiSSA(depth=50, scale=3.0)) == "LiSSA(max_steps=50, scale=3.0)"


def test_tensor_settings_compare_by_identity():
    eta = torch.tensor(0.1, requires_grad=True)
    a, b = il.solvers.GradientDescent(eta), il.solvers.GradientDescent(eta)
    assert a == b and hash(a) == hash(b) and a.gradient_step_size() is eta
    assert a != il.solvers.GradientDescent(torch.tensor(0.1))


def test_gradient_step_size_contract():
    assert il.solvers.GradientDescent().gradient_step_size() is None
    for case in registry.FORWARD:
        if case.cls is not il.solvers.GradientDescent:
            assert case.make().gradient_step_size() is None


BACKWARD_MODES = [
    il.backward.Implicit(),
    il.backward.Implicit(il.linear.CG(rtol=1e-6), fallback=il.backward.Phantom(3)),
    il.backward.Unrolled(),
    il.backward.Truncated(4, step_size=0.5),
    il.backward.JacobianFree(step_size=0.25),
    il.backward.Phantom(6, damping=0.3),
]


@pytest.mark.parametrize("mode", BACKWARD_MODES, ids=repr)
def test_backward_modes_are_settings_objects(mode):
    namespace = {**vars(il.linear), **vars(il.backward)}
    again = eval(repr(mode), namespace)
    assert again == mode and hash(again) == hash(mode) and type(again) is type(mode)
    assert pickle.loads(pickle.dumps(mode)) == mode and copy.deepcopy(mode) == mode
    for name in mode.settings():
        with pytest.raises(AttributeError, match="immutable"):
            setattr(mode, name, getattr(mode, name))
    with pytest.raises(TypeError, match="unknown setting.*bogus"):
        mode.replace(bogus=1)


def test_backward_mode_replace_validates():
    assert il.backward.Phantom(3).replace(damping=0.2) == il.backward.Phantom(3, damping=0.2)
    with pytest.raises(ValueError, match="damping must be > 0"):
        il.backward.Phantom(3).replace(damping=0.0)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        il.backward.Truncated(2, step_size=0.0)


def _public_solver_classes() -> list[type]:
    from implicit_layers._config import SolverSettings

    found = []
    for module in (il.solvers, il.linear):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, SolverSettings) and obj not in found:
                found.append(obj)
    # StepsOnFailure wraps another solver and takes its tolerances from it, not as keywords.
    found.remove(il.linear.StepsOnFailure)
    return found


COMMON = {"rtol": None, "atol": 0.0, "max_steps": None, "check_every": None, "on_failure": "warn"}


@pytest.mark.parametrize("cls", _public_solver_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_signature_lists_every_common_keyword_with_its_default(cls):
    import inspect

    params = inspect.signature(cls).parameters
    for name, default in COMMON.items():
        assert name in params, f"{cls.__name__} signature lacks {name}"
        assert params[name].default == default
        # only Neumann takes a common setting (max_steps, its number of terms) positionally
        positional = cls is il.linear.Neumann and name == "max_steps"
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if positional else inspect.Parameter.KEYWORD_ONLY
        assert params[name].kind is kind
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # cuda_graph: listed, last and False by default, exactly for the classes that take it
    takes_graphs = "cuda_graph" in params
    assert takes_graphs == cls.supports_cuda_graph
    if takes_graphs:
        assert list(params)[-1] == "cuda_graph" and params["cuda_graph"].default is False
        assert cls().cuda_graph is False
    # the signature is the constructor's: every keyword it lists is accepted and kept
    solver = cls(**{name: params[name].default for name in COMMON if name in params})
    assert set(solver.settings()) <= set(params)
    unexpected = rf"{cls.__name__}.__init__\(\) got an unexpected keyword argument 'tol'"
    with pytest.raises(TypeError, match=unexpected):
        cls(tol=1e-6)
    if not takes_graphs:
        with pytest.raises(TypeError, match="unexpected keyword argument 'cuda_graph'"):
            cls(cuda_graph=False)


@pytest.mark.parametrize("cls", [il.solvers.LevenbergMarquardt, il.solvers.GaussNewton])
def test_settings_passed_on_to_the_base_are_settings_too(cls):
    # Their constructors end in **settings: replace, repr and == see those settings as well.
    solver = cls(max_steps=5, dense_max_size=3)
    assert solver.settings()["max_steps"] == 5 and solver.settings()["dense_max_size"] == 3
    assert solver.replace(rtol=1e-6).max_steps == 5
    assert repr(solver) == f"{cls.__name__}(dense_max_size=3, max_steps=5)"
    assert eval(repr(solver), vars(il.solvers)) == solver != cls()
