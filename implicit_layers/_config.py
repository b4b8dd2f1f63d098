"""Defaults that depend on the dtype and device of the problem."""

from __future__ import annotations

import torch


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance used when a solver is given ``rtol=None``."""
    if dtype == torch.float64:
        return 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-3
    return 1e-5


def default_check_every(device: torch.device) -> int:
    """How often a solver loop may synchronise with the device to test for convergence.

    On the CPU a check costs nothing, so solvers stop at the first converged step; on
    accelerators each check is a host synchronisation, so it is done every few steps (converged
    samples are frozen on the device meanwhile, so the answer is the same).
    """
    return 1 if device.type == "cpu" else 8


def check_float_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            f"convert it with {name}.double() or {name}.float()."
        )
    return value


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def check_tolerance(value: object, name: str, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}.")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return float(value)


class SolverSettings:
    """The settings every iterative solver shares, validated once for forward and linear solvers.

    Args:
        rtol: relative tolerance, or ``None`` for the dtype's default.
        atol: absolute tolerance.
        max_steps: iteration limit, or ``None`` for the class's ``default_max_steps``.
        check_every: steps between convergence checks, or ``None`` for the device's default.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
    """

    default_max_steps = 1000

    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: str = "warn",
    ) -> None:
        from ._info import check_on_failure

        self.rtol = check_tolerance(rtol, "rtol")
        self.atol = check_tolerance(atol, "atol", allow_none=False)
        self.max_steps = (
            self.default_max_steps if max_steps is None else check_positive_int(max_steps, "max_steps")
        )
        self.check_every = None if check_every is None else check_positive_int(
            check_every, "check_every"
        )
        self.on_failure = check_on_failure(on_failure)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

