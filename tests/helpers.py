"""Small helpers shared by the test modules: seeded float64 data, relative errors, leaves, the
compiled solvers' fallback check."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

DT = torch.float64


def randn_factory(seed: int, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """A ``randn(*shape)`` drawing float64 numbers from its own generator (on the CPU, so the
    data do not depend on the device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    return randn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` (as a float, ``b`` the reference)."""
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf that requires grad, with the value of ``t``."""
    return t.detach().clone().requires_grad_(True)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """The example script ``examples/{name}.py`` as a module (the examples are standalone
    scripts, not a package)."""
    # A script's own folder is on the path when it runs (`python examples/x.py`): the same here,
    # for the modules the examples share (`_outputs`).
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module


def assert_falls_back_to_eager_once(solve: Callable[[bool], torch.Tensor], match: str,
                                    wrt: torch.Tensor) -> None:
    """A solver's ``compile=True`` whose loop torch fails to compile internally: ``solve(True)``
    warns (``match``) once, a second call neither warns nor tries again, and both equal
    ``solve(False)``, as do their gradients with respect to ``wrt``."""
    with pytest.warns(RuntimeWarning, match=match):
        got = solve(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = solve(True)  # said once; no second attempt to compile
    want = solve(False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(again, want, rtol=0, atol=1e-12)
    (got_grad,) = torch.autograd.grad(got.sum(), wrt)
    (want_grad,) = torch.autograd.grad(want.sum(), wrt)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)
