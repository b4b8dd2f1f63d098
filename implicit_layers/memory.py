"""Measure the memory autograd keeps for the backward pass (what an implicit layer saves).

Every tensor an autograd node saves for its backward formula goes through the pack hook of
:func:`torch.autograd.graph.saved_tensors_hooks`. :class:`SavedTensorBytes` counts those
tensors by their storages: deterministic, unlike process-level measures, and the quantity that
distinguishes an implicit backward (independent of the forward steps) from unrolling (linear in
them).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor

__all__ = ["SavedTensorBytes"]


class SavedTensorBytes:
    """Context manager: bytes of the tensors autograd saves for backward inside it.

    Each storage is counted once, however many nodes or views save it. Graphs recorded inside
    the context work as usual, double backward included.

    Args:
        exclude: tensors whose storages are not counted (e.g. the data, which every method
            keeps anyway).

    Attributes:
        total: bytes of every distinct storage saved inside the context, freed since or not.
        live: bytes of the saved storages that graphs still hold (:meth:`collect` runs the
            garbage collector first, for graphs kept only by Python reference cycles).
        peak: the largest value ``live`` reached.

    Example:
        >>> with SavedTensorBytes() as saved:
        ...     loss = layer(x).pow(2).sum()
        >>> saved.live  # what waits for loss.backward()
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        # Bytes of saved storages the graphs have let go of: their addresses may be reused by
        # later storages, which must count again.
        self._freed = 0
        self._refs: dict[int, int] = {}
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    @property
    def total(self) -> int:
        return self._freed + sum(self._seen.values())

    def collect(self) -> int:
        """Run the garbage collector, then return :attr:`live`."""
        gc.collect()
        return self.live

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes
            self._freed += self._seen.pop(key, 0)

    def _pack(self, t: Tensor) -> object:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self._exclude:
            return t
        self._seen[key] = nbytes
        if key not in self._refs:
            self._refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        # A detached alias: holding ``t`` itself would, for a saved output, make its node reach
        # itself through ``t.grad_fn`` (a cycle the garbage collector cannot see through the
        # C++ graph), keeping every such graph alive. Autograd restores the graph link on
        # unpack, so double backward is unaffected.
        held = _Held(t.detach())
        weakref.finalize(held, self._release, key, nbytes)
        return held

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor as the graph holds it; finalised when the graph lets go of it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _unpack(packed: object) -> Tensor:
    return packed.tensor if isinstance(packed, _Held) else cast(Tensor, packed)
