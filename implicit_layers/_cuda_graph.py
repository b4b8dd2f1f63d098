"""Replaying chunks of a solver loop as CUDA graphs (the ``cuda_graph=True`` setting).

A solver loop runs ``check_every`` steps between two convergence checks, with step functions
that neither synchronise with the host nor branch on data. :class:`ChunkGraphs` records such
a chunk once as a :class:`torch.cuda.CUDAGraph` and replays it: one launch instead of one per
op. The loops hand it a *chunk*: a function of the loop's state tensors that returns the new
state (same count, shapes and dtypes), reading nothing else that changes during the solve.

How a chunk runs:

* the first run of each chunk (one per ``key``, e.g. its length) is eager, on the capture
  stream: the warm-up PyTorch asks for before a capture (library handles, lazily loaded
  kernels); its results are the loop's, nothing is wasted;
* its second run captures it, on fixed *static* buffers (a copy of the state made at the
  first capture, shared by every key), then replays it; later runs only replay. Each call
  copies the state into the static buffers (only the tensors that are not already the
  static ones) and returns them; the next call overwrites them, so the caller consumes
  them before (the loops fold them into their bookkeeping at the check that follows);
* ``graph=False`` (a short tail before ``max_steps``) runs the chunk eagerly, on the static
  buffers once they exist, so the state stays where the graphs read it.

Captures run on the current stream when it is not the default one (then products through
autograd graphs recorded on it are captured along), else on a side stream of this module.
Replays run on the current stream. The graphs of one solve share one memory pool (one
stream replays them in turn, so their temporaries never overlap); it is released with them
when the solve ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["ChunkGraphs", "graph_runner"]

Chunk = Callable[..., Sequence[Tensor]]

#: Test hook: run the chunked loop eagerly on the CPU instead of refusing the setting (checks
#: the chunking logic without a GPU). Never set by the library itself.
EAGER_STAND_IN = False

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_warned_default_stream = False


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper or carries a forward-mode tangent."""
    import torch.autograd.forward_ad as forward_ad

    return (
        torch._C._functorch.is_functorch_wrapped_tensor(t)
        or forward_ad.unpack_dual(t).tangent is not None
    )


def graph_runner(
    owner: str, enabled: bool, like: Tensor, *, recording: bool, autograd_products: bool = False
) -> ChunkGraphs | None:
    """The chunk runner of one solve, or ``None`` when ``cuda_graph`` is off.

    Args:
        owner: the solver's name, for messages.
        enabled: the solver's ``cuda_graph`` setting.
        like: a state tensor of the solve (its device decides).
        recording: whether autograd records the loop (an ``Unrolled`` backward, a solve in
            grad mode that a double backward differentiates).
        autograd_products: whether the loop's product may go through an autograd graph
            recorded before the solve (the adjoint solve of an implicit backward).

    Returns:
        A :class:`ChunkGraphs`, or ``None`` (run the ordinary loop).

    Raises:
        ValueError: for tensors that are not on a CUDA device, a recorded loop, ``torch.func``
            transforms, forward-mode tangents, ``torch.compile`` tracing, or a capture
            already under way.
    """
    if not enabled:
        return None
    fix = f"set cuda_graph=False on {owner} for this call"
    if like.device.type != "cuda" and not (EAGER_STAND_IN and like.device.type == "cpu"):
        raise ValueError(
            f"{owner}(cuda_graph=True) replays CUDA graphs and needs CUDA tensors, got a "
            f"tensor on {like.device}; {fix} (it is only useful on a GPU)."
        )
    if recording:
        raise ValueError(
            f"{owner}(cuda_graph=True) cannot run a loop that autograd records (an Unrolled "
            "backward, or a solve in grad mode, e.g. the adjoint solve of a double backward): "
            f"graph replays overwrite fixed buffers. {fix[0].upper() + fix[1:]}, or run the "
            "solve under torch.no_grad()."
        )
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{owner}(cuda_graph=True) cannot run inside torch.compile; {fix}, or use "
            "torch.compile(mode='reduce-overhead'), which records CUDA graphs itself."
        )
    if _transformed(like):
        raise ValueError(
            f"{owner}(cuda_graph=True) cannot run under torch.func transforms or forward-mode "
            f"AD (the state carries a tangent or a batching wrapper); {fix}."
        )
    if like.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            f"{owner}(cuda_graph=True) cannot run inside another CUDA graph capture; {fix} "
            "(a solver loop synchronises with the host at its checks, so it cannot be part of "
            "an outer graph either)."
        )
    if like.device.type == "cuda" and autograd_products:
        if torch.cuda.current_stream(like.device) == torch.cuda.default_stream(like.device):
            global _warned_default_stream
            if not _warned_default_stream:
                _warned_default_stream = True
                warnings.warn(
                    f"{owner}(cuda_graph=True) runs without CUDA graphs on the default CUDA "
                    "stream: a product through an autograd graph recorded on that stream (the "
                    "implicit backward) cannot be captured. Run the layer's forward and "
                    "backward under `with torch.cuda.stream(torch.cuda.Stream()):` to replay "
                    "the adjoint solve as CUDA graphs. (Shown once.)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
    return ChunkGraphs(owner, like.device)


class ChunkGraphs:
    """Runs the chunks of one solve, each captured once as a CUDA graph and then replayed.

    Args:
        owner: the solver's name, for messages.
        device: the device of the solve (the CPU only with the eager stand-in of the tests).
    """

    def __init__(self, owner: str, device: torch.device) -> None:
        self.owner = owner
        self.eager = device.type != "cuda"
        self.stream: torch.cuda.Stream | None = None
        self.replay_stream: torch.cuda.Stream | None = None
        if not self.eager:
            current = torch.cuda.current_stream(device)
            default = torch.cuda.default_stream(device)
            self.stream = _side_stream(device) if current == default else current
            self.replay_stream = current
        self.static: tuple[Tensor, ...] | None = None
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph | _StandInGraph] = {}
        self.warmed: set[Hashable] = set()
        #: chunks replayed (from a graph, or the stand-in's), and chunks run eagerly
        self.replays = 0
        self.eager_runs = 0

    def run(
        self, key: Hashable, chunk: Chunk, state: Sequence[Tensor], graph: bool = True
    ) -> tuple[Tensor, ...]:
        """Advance ``state`` by one chunk.

        Args:
            key: names the chunk: calls with the same key must pass the same computation
                (same function of the state, same fixed tensors read besides the state).
            chunk: ``chunk(*state) -> new state``, free of host synchronisation.
            state: the state tensors; shapes and dtypes fixed for the solve.
            graph: ``False`` runs this chunk eagerly (a tail that runs once).

        Returns:
            The new state. Once a graph was captured these are the static buffers: valid
            until the next call.

        Raises:
            RuntimeError: when the chunk cannot be captured (a host synchronisation, a CPU
                tensor copied to the device, a dynamic shape); names the setting and the fix.
        """
        state = tuple(state)
        if self.static is not None:
            self._copy_in(state)
            state = self.static
        if not graph or key not in self.warmed:
            # The first run of a key is its warm-up: eager, on the capture stream.
            if graph:
                self.warmed.add(key)
            return self._eager_run(chunk, state)
        if self.static is None:
            self.static = tuple(t.clone() for t in state)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(chunk)
        if self.replay_stream is not None and (
            torch.cuda.current_stream(self.replay_stream.device) != self.replay_stream
        ):
            raise RuntimeError(
                f"{self.owner}(cuda_graph=True): the current CUDA stream changed during the "
                "solve; run the whole solve on one stream."
            )
        g.replay()
        self.replays += 1
        return self.static

    # -- helpers -----------------------------------------------------------------------
    def _checked(self, out: Sequence[Tensor], state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        out = tuple(out)
        if len(out) != len(state) or any(
            o.shape != s.shape or o.dtype != s.dtype for o, s in zip(out, state, strict=True)
        ):
            raise RuntimeError(
                f"{self.owner}(cuda_graph=True): a chunk changed the shapes or dtypes of the "
                "loop's state; CUDA graphs need fixed shapes. Set cuda_graph=False."
            )
        return out

    def _copy_in(self, state: tuple[Tensor, ...]) -> None:
        assert self.static is not None
        if len(state) != len(self.static):
            raise RuntimeError(f"{self.owner}(cuda_graph=True): the loop's state changed size.")
        for s, t in zip(self.static, state, strict=True):
            if t is not s:
                if t.shape != s.shape or t.dtype != s.dtype:
                    raise RuntimeError(
                        f"{self.owner}(cuda_graph=True): the loop's state changed shape or "
                        "dtype; CUDA graphs need fixed shapes. Set cuda_graph=False."
                    )
                s.copy_(t)

    def _eager_run(self, chunk: Chunk, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The chunk run eagerly on the capture stream; on the static buffers once they
        exist (the state then stays where the graphs read it)."""
        self.eager_runs += 1
        if self.stream is None:
            out = self._checked(chunk(*state), state)
        else:
            current = torch.cuda.current_stream(state[0].device)
            if self.stream == current:
                out = self._checked(chunk(*state), state)
            else:
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream):
                    out = self._checked(chunk(*state), state)
                current.wait_stream(self.stream)
                for o in out:
                    # made on the side stream, used on the current one: the allocator must
                    # not hand the memory out again before the current stream is done with it
                    o.record_stream(current)
        if self.static is None:
            return out
        for s, o in zip(self.static, out, strict=True):
            if o is not s:
                s.copy_(o)
        return self.static

    def _capture(self, chunk: Chunk) -> torch.cuda.CUDAGraph | _StandInGraph:
        assert self.static is not None
        static = self.static
        if self.stream is None or self.replay_stream is None:
            return _StandInGraph(chunk, static, self._checked)
        g = torch.cuda.CUDAGraph()
        # the memory pool of this solve's first graph, which stays alive as long as this one
        first = next((h for h in self.graphs.values() if isinstance(h, torch.cuda.CUDAGraph)), None)
        self.stream.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(self.stream):
            # thread_local: other threads (data loaders) may allocate pinned memory meanwhile
            g.capture_begin(
                pool=None if first is None else first.pool(), capture_error_mode="thread_local"
            )
            try:
                out = self._checked(chunk(*static), static)
                for s, o in zip(static, out, strict=True):
                    if o is not s:
                        s.copy_(o)
            except BaseException as err:
                try:
                    g.capture_end()
                except RuntimeError:
                    pass  # the capture was invalidated by the error being raised
                if isinstance(err, RuntimeError):
                    raise self._capture_error(err) from err
                raise
            try:
                g.capture_end()
            except RuntimeError as err:
                raise self._capture_error(err) from err
        return g

    def _capture_error(self, err: BaseException) -> RuntimeError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return RuntimeError(
            f"{self.owner}(cuda_graph=True): recording the loop's steps as a CUDA graph failed "
            f"({first}). Every step must be capture-safe: no host synchronisation in the map "
            "(.item(), .cpu(), .tolist(), bool() or printing of a tensor), no CPU tensor copied "
            "to the device, no data-dependent shapes (torch.nonzero, boolean-mask indexing). "
            "Remove the synchronisation from the map, or set cuda_graph=False."
        )


class _StandInGraph:
    """What a captured graph does, eagerly (the CPU stand-in of the tests): the chunk
    captured with the tensors it closed over at capture time, replayed on the static
    buffers, its new state copied into them."""

    def __init__(
        self, chunk: Chunk, static: tuple[Tensor, ...],
        checked: Callable[[Sequence[Tensor], tuple[Tensor, ...]], tuple[Tensor, ...]],
    ) -> None:
        self.chunk, self.static, self.checked = chunk, static, checked

    def replay(self) -> None:
        out = self.checked(self.chunk(*self.static), self.static)
        for s, o in zip(self.static, out, strict=True):
            if o is not s:
                s.copy_(o)
