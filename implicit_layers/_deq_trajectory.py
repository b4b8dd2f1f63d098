"""Trajectory sampling for a DEQ: states taken along the forward solve, each with a gradient.

A fixed-point correction loss (Bai et al., 2022, "Deep Equilibrium Optical Flow Estimation")
sums a loss over several states of the solve, not only the last. :class:`Recorder` wraps the
map and keeps the iterates the solver evaluates it at (the calls made without a graph); the
chosen states are then attached to the graph with the layer's backward mode, as a black-box
solution would be (:func:`~implicit_layers.custom_fixed_point`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .functional import custom_fixed_point

__all__ = ["Recorder", "check_states", "pick_states", "attach_state"]


class Recorder:
    """``f`` with a record of the iterates it was evaluated at during the graph-free solve.

    ``iterates[k]`` is the state after ``k`` evaluations (the input of the ``k+1``-th); with
    ``keep`` given only those indices are stored (the others are ``None``), so that sampling a
    few states does not hold the whole trajectory.
    """

    def __init__(self, f: Callable[..., Tensor], keep: set[int] | None = None) -> None:
        self.f = f
        self.keep = keep
        self.iterates: list[Tensor | None] = []
        self._last: Tensor | None = None

    def __call__(self, z: Tensor, *args: Any) -> Tensor:
        if not torch.is_grad_enabled() and not z.requires_grad:
            # The layer's first call (finding the tensors f closes over) and a solver's check
            # may evaluate f twice at one point; a state is recorded once.
            if self._last is None or not torch.equal(self._last, z):
                self._last = z.detach().clone()
                stored = self.keep is None or len(self.iterates) in self.keep
                self.iterates.append(self._last if stored else None)
        return self.f(z, *args)


def check_states(states: object) -> int | tuple[int, ...] | None:
    """``states`` validated: ``None``, a positive int, or a sequence of positive ints."""
    if states is None:
        return None
    if isinstance(states, int) and not isinstance(states, bool):
        if states >= 1:
            return states
    elif isinstance(states, Sequence) and len(states) > 0 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in states
    ):
        return tuple(states)
    raise ValueError(
        "states must be None, a positive int (that many states spread evenly along the solve, "
        "the last being the solution) or a non-empty sequence of iteration indices >= 1 "
        f"(torchdeq's n_states / indexing), got {states!r}."
    )


def pick_states(
    iterates: list[Tensor | None], solution: Tensor, states: int | tuple[int, ...]
) -> list[Tensor | None]:
    """The detached states to return; ``None`` stands for the solution itself.

    Iterate ``k`` (1-based) is the state after ``k`` evaluations of the map. An int ``n``
    spreads ``n`` indices evenly over the evaluations made, ending at the solution; an index
    past the last evaluation means the solution.
    """
    m = len(iterates)
    if isinstance(states, int):
        picks = [max(1, round(m * (i + 1) / states)) for i in range(states)]
    else:
        picks = list(states)
    # iterates[k] is the input of the (k+1)-th evaluation, i.e. the state after k evaluations.
    return [iterates[k] if k < m else None for k in picks]


def attach_state(
    f: Callable[..., Tensor], z: Tensor, args: tuple[Any, ...], backward: Any
) -> Tensor:
    """The detached state ``z`` ``(B, ...)`` carrying ``backward``'s gradient of the map ``f``."""

    def given(z0: Tensor, *_: Any) -> Tensor:
        return z

    return custom_fixed_point(f, backward, batched=True)(given)(z, *args)
