"""Which tensors carrying derivatives a compiled function read on its latest call.

``torch.compile`` lifts every tensor a traced function reads into an input of its graph: the
arguments, closure cells, globals, attributes of objects and modules, whatever path reached
them. Its guards check each such tensor's ``requires_grad`` on every call (a change compiles
again). The backend of :func:`inductor_reporting_reads` is inductor's, wrapped so that each call
of a compiled graph notes its inputs that require grad, before running it. :func:`with_reads`
runs a call of the compiled function and says which tensors that carry derivatives it read: the
question the capture of ``_capture.py`` answers with an eager call of the function, answered
here by the compiled call itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["inductor_reporting_reads", "with_reads"]

_LAST = threading.local()
T = TypeVar("T")


def inductor_reporting_reads(
    config_patches: dict[str, Any], cpu_config_patches: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """A ``torch.compile`` backend: inductor with ``config_patches`` (as ``options=`` would
    give them), and ``cpu_config_patches`` too for a graph whose tensor inputs are all on the
    CPU, each compiled graph noting its inputs that require grad when called."""

    def backend(graph: Any, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        patches = config_patches
        if cpu_config_patches and all(t.device.type == "cpu" for t in example_inputs
                                      if isinstance(t, Tensor)):
            patches = {**config_patches, **cpu_config_patches}

        # Tensors the graph holds as attributes rather than inputs (constants dynamo makes
        # while tracing, parameters of modules it does not inline): read on every call too.
        held = [t for t in (_attribute(graph, node.target) for node in graph.graph.nodes
                            if node.op == "get_attr") if isinstance(t, Tensor)]
        compiled: Callable[..., Any] = compile_fx(graph, example_inputs, config_patches=patches)  # type: ignore[assignment]

        def run(*args: Any) -> Any:
            _LAST.reads = tuple(a for a in (*args, *held) if isinstance(a, Tensor) and a.requires_grad)
            return compiled(*args)

        return run

    return backend


def _attribute(module: Any, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def with_reads(call: Callable[[], T]) -> tuple[T, tuple[Tensor, ...] | None]:
    """``call()``'s result and the inputs that required grad of the compiled graph it ran
    last on this thread (``None`` where it ran none: an eager stance, or no compiled call).
    An answer left by an earlier call is cleared first, so it is never read for this one."""
    _LAST.reads = None
    result = call()
    reads, _LAST.reads = _LAST.reads, None
    return result, reads
