"""What the forward solvers' whole-solve compiled loops share (``compile=True``).

``LevenbergMarquardt(compile=True)`` and ``ProximalGradient(compile=True)`` each write their
solve as one function over fixed-shape tensors whose loop is a ``while_loop``, traced by
``torch.compile(fullgraph=True)`` (compiled by
:func:`~implicit_layers._guarded_call.compile_loop`). This module says where a compiled loop can
serve a problem (:func:`loop_serves`) and calls it with the errors of a failed trace mapped to
the solver's own (:func:`run_loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._capture import modes_active, transforms_active
from .._compile_failures import failed_to_compile
from .._problem import Problem

__all__ = ["CompileFailed", "loop_serves", "run_loop"]


class CompileFailed(RuntimeError):
    """torch's compiler failed internally on a loop (not the user function's fault: see
    :mod:`~implicit_layers._compile_failures`); ``error`` is what it raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def loop_serves(problem: Problem) -> bool:
    """Whether a compiled loop can trace ``problem``'s functions: outside ``inference_mode``,
    torch-function and dispatch modes, forward-mode AD (see
    :func:`~implicit_layers._capture.modes_active`) and ``torch.func`` transforms (a problem
    folded from ``vmap`` calls the user's function under the transform), with the function
    called as it is (under ``torch.func.grad`` the layer's forward calls it with unwrapped
    values substituted, a mode the compiled loop cannot trace), and where torch's compiler
    has not failed on it before."""
    return not (torch.is_inference_mode_enabled() or transforms_active() or modes_active()
                or problem.substitutes or failed_to_compile(problem.fn))


def run_loop(loop: Callable[..., tuple[Tensor, ...]], args: tuple[Any, ...], solver: str,
             traced: str) -> tuple[Tensor, ...]:
    """``loop(*args)``, a compiled loop, with clear errors where it cannot run.

    Every user function, batch size, dtype and setting is one more compiled variant of the
    one loop; past ``torch._dynamo.config.recompile_limit`` of them (8 by default), where
    ``fullgraph=True`` would refuse, the limit is raised for that call.

    Args:
        loop: the compiled loop (:func:`~implicit_layers._guarded_call.compile_loop`).
        args: its arguments.
        solver: the solver as the messages name it (``"LevenbergMarquardt(compile=True)"``).
        traced: what the loop traces of the user's, as the messages name it
            (``"residual"``, ``"fun and prox"``).

    Raises:
        ValueError: the user's functions cannot be traced in one graph.
        RuntimeError: they were traced, and the compiler failed on the loop.
        CompileFailed: torch's tracer failed internally on functions that are fine.
    """
    try:
        try:
            return loop(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            limit = max(2 * torch._dynamo.config.recompile_limit, 64)
            with torch._dynamo.config.patch(recompile_limit=limit):
                return loop(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        # Traced: the failure is the compiler's, not the user's functions'.
        reason = str(error).strip().splitlines()[0]
        raise RuntimeError(
            f"{solver} traced {traced}, but torch.compile's compiler failed on the loop "
            f"({reason}). Use compile=False (the same steps, eagerly)."
        ) from error
    except torch._dynamo.exc.TorchDynamoException as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{solver} traces {traced} into one graph, and torch.compile could not ({reason}). "
            f"Keep {traced} to torch operations on tensors (no .item(), NumPy or Python "
            "branches on tensor values), or use compile=False."
        ) from error
    except Exception as error:  # noqa: BLE001  (torch's tracer failed on a traceable function)
        raise CompileFailed(error) from error
