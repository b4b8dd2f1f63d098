"""The guards the library's compiled loops leave out (those on torch's and the library's own
objects) and the ones they keep: a change of anything the caller owns still recompiles."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from implicit_layers._guard_filter import keep_guard

D = torch.float64
T = torch.linspace(0, 2, 25, dtype=D)


@pytest.mark.parametrize(
    "name, guard_type",
    [
        ("G['__import_torch_dot_utils_dot__pytree'].tree_flatten.__code__", "ID_MATCH"),
        ("G['__import_torch']", "MODULE_MATCH"),
        ("__import__('torch').utils._pytree.SUPPORTED_NODES", "DICT_KEYS_MATCH"),
        ("list(dict.keys(__import__('torch').utils._pytree.SUPPORTED_NODES))[0]", "ID_MATCH"),
        ("dict(G['__import_torch_dot_autograd_dot_forward_ad'].UnpackedDualTensor.__dict__)",
         "DICT_CONTAINS"),
        ("G['__import_implicit_layers_dot_solvers_dot_least_squares']._gain_update.__code__",
         "ID_MATCH"),
        ("G['_lm_step'].__code__", "ID_MATCH"),  # the loop's own module
        ("G['torch']", "MODULE_MATCH"),
        ("G['__builtins_dict___0']['len']", "BUILTIN_MATCH"),
    ],
)
def test_guards_on_torch_and_library_objects_are_left_out(name: str, guard_type: str) -> None:
    assert not keep_guard(name, guard_type)


@pytest.mark.parametrize(
    "name, guard_type",
    [
        ("z0", "TENSOR_MATCH"),  # locals: the arguments and what they reach
        ("residuals.__self__.fn.__code__", "ID_MATCH"),
        ("dict(type(residuals.__self__).__mro__[1].__dict__)", "DICT_CONTAINS"),
        ("G['__import___main__'].helper.__code__", "ID_MATCH"),  # the user's modules
        ("G['__import___main__']", "MODULE_MATCH"),
        ("G['__import_torchvision_dot_ops'].nms", "ID_MATCH"),  # not torch itself
        ("G['__import_mypkg_dot_torch_utils'].scale", "ID_MATCH"),
        ("__import__('numpy').pi", "EQUALS_MATCH"),
        # tensors and values wherever they are
        ("G['__import_implicit_layers_dot_x'].buffer", "TENSOR_MATCH"),
        ("G['__import_torch_dot__functorch_dot_eager_transforms'].JVP_NESTING", "EQUALS_MATCH"),
        ("G['__import_torch_dot_autograd_dot_forward_ad']._current_level", "EQUALS_MATCH"),
        ("G['_CHUNK']", "EQUALS_MATCH"),
        ("G['__import_torch_dot_autograd_dot_forward_ad']._current_level", "CONSTANT_MATCH"),
    ],
)
def test_guards_on_what_the_caller_owns_tensors_and_values_are_kept(name: str, guard_type: str) -> None:
    assert keep_guard(name, guard_type)


def _decay(w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-w[..., 1:2] * T)


def _decay_squared(w: torch.Tensor) -> torch.Tensor:
    return torch.exp(-w[..., 1:2] * T) ** 2


SHAPE = _decay
SCALE = 2.0


def _residual(w: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return SCALE * w[..., 0:1] * SHAPE(w) + w[..., 2:3] * torch.sin(3 * T) - Y


def _fit(Y: torch.Tensor, compile: bool) -> torch.Tensor:
    solver = il.solvers.LevenbergMarquardt(compile=compile)
    return il.least_squares(_residual, torch.ones(Y.shape[0], 3, dtype=D), Y, batched=True,
                            solver=solver)


@pytest.mark.slow
def test_the_compiled_solve_follows_a_rebound_global_of_the_callers_module() -> None:
    global SHAPE, SCALE
    Y = (2.0 * torch.exp(-1.5 * T) + 0.5 * torch.sin(3 * T)).expand(2, -1).contiguous()
    first = _fit(Y, compile=True)
    torch.testing.assert_close(first, _fit(Y, compile=False), rtol=0, atol=1e-9)
    try:
        SHAPE = _decay_squared  # the user's helper function, rebound
        second = _fit(Y, compile=True)
        torch.testing.assert_close(second, _fit(Y, compile=False), rtol=0, atol=1e-9)
        assert (second - first).abs().max() > 0.1  # the squared decay fits another rate
        SCALE = 4.0  # a number of the user's module
        third = _fit(Y, compile=True)
        torch.testing.assert_close(third, _fit(Y, compile=False), rtol=0, atol=1e-9)
        assert (third - second).abs().max() > 0.1
    finally:
        SHAPE, SCALE = _decay, 2.0
