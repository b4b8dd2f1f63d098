"""Where ``torch.compile`` stops: every implicit-layer call runs eagerly, as one graph break.

A solve is a data-dependent loop with host-side convergence checks, per-sample statistics and
warnings, and its backward is another such loop. Traced by dynamo, each check, each ``tolist``
of the bookkeeping and each functorch query becomes a graph break of its own (dozens per
training step, and new graphs for every batch size). Marking the entry points and the custom
backward as not to be traced leaves exactly one break per call: the model around the layer
compiles into graphs, the layer runs as it does eagerly (same iterates, same ``SolveInfo``), and
a new batch size recompiles only the model's own graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["run_eagerly"]

F = TypeVar("F", bound=Callable)

REASON = (
    "implicit_layers runs each solve eagerly under torch.compile (one graph break per layer "
    "call; the surrounding model is still compiled). fullgraph=True cannot hold across an "
    "implicit-layer call: compile the model without fullgraph=True, or use a layer that traces "
    "into the graph: il.nn.DEQ(..., compiled_solve=True), or custom_root(..., symmetric=True, "
    "backward=il.backward.CompiledImplicit(...))."
)


def run_eagerly(fn: F) -> F:
    """``fn`` excluded from dynamo tracing (with a reason that names what to do)."""
    return torch.compiler.disable(fn, reason=REASON)  # type: ignore[return-value]
