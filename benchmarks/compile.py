"""Implicit layers inside ``torch.compile``: graph breaks, graphs per batch size, step times.

Small models, each a linear layer, an implicit layer and a linear head: an ``il.nn.DEQ`` (tanh
cell), an ``il.nn.ArgminLayer`` (a quartic objective) with and without a box and with an l1
penalty (``prox=``), an OptNet ``il.nn.QPLayer``, and the DEQ with
the opt-in compiled solve (``compiled_solve=True``, Picard + Neumann); at two sizes, the tiny
n=16, B=8 and n=256, B=64. For each:

* graph breaks of one forward call (``torch._dynamo.explain``): the implicit layer runs
  eagerly as one break, the rest of the model compiles (with ``compiled_solve=True`` the
  layer traces into the model's graph: no break);
* graphs compiled after two batch sizes and after six (dynamo's ``unique_graphs``);
* a training step (forward + backward) eager, compiled with the "eager" backend (graph capture
  only) and with inductor, timed alternately in one run; gradients compared with eager;
* the same steps of the model with the implicit layer replaced by the identity, timed in the
  same rounds: the part of the compiled step's excess over eager that is torch.compile's own
  fixed cost per call of the surrounding layers, with no implicit layer involved.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch._dynamo.utils import counters

import implicit_layers as il

from ._common import BURST, Config, Section, time_bursts

#: Method-name prefix of the rows of the model without its implicit layer.
BARE = "layer -> identity: "
#: The row of the default DEQ model, timed beside the compiled-solve model.
REFERENCE = "default DEQ: eager"


class _Cell(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / max(1.0, float(torch.linalg.matrix_norm(self.lin.weight, 2))))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


class _Model(torch.nn.Module):
    """A linear layer, an implicit layer (``self.layer``, made by :meth:`_make_layer`) and a
    linear head; the loss is the mean square of the head's output."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(n, n)
        self.layer = self._make_layer(n)
        self.out = torch.nn.Linear(n, 3)

    def _make_layer(self, n: int) -> torch.nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(self.inp(x))).square().mean()


class _DEQModel(_Model):
    compiled_solve = False

    def _make_layer(self, n: int) -> torch.nn.Module:
        if self.compiled_solve:
            # The settings the compiled solve supports: Picard forward, Neumann adjoint.
            return il.nn.DEQ(
                _Cell(n), state_shape=(n,), solver=il.solvers.Picard(max_steps=50),
                backward=il.linear.Neumann(), compiled_solve=True,
            )
        return il.nn.DEQ(_Cell(n), state_shape=(n,))


class _CompiledSolveDEQModel(_DEQModel):
    compiled_solve = True


class _BoxArgminModel(_Model):
    def _make_layer(self, n: int) -> torch.nn.Module:
        self.scale = torch.nn.Parameter(torch.linspace(1.0, 2.0, n))
        return il.nn.ArgminLayer(self._objective, w_shape=(n,), **self._options())

    def _options(self) -> dict[str, Any]:
        """The layer's keyword arguments beyond the objective and the shape."""
        return {"lower": -0.3, "upper": 0.3}

    def _objective(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.scale * w.square() - x * w).sum(-1) + 0.1 * w.pow(4).sum(-1)


class _ArgminModel(_BoxArgminModel):
    """The same objective without the box (an unconstrained ``ArgminLayer``)."""

    def _options(self) -> dict[str, Any]:
        return {}


class _QPModel(_Model):
    """An OptNet layer (``il.nn.QPLayer``: n/4 inequalities, one equality) between two linear
    layers."""

    def _make_layer(self, n: int) -> torch.nn.Module:
        return il.nn.QPLayer(n, n_ineq=max(1, n // 4), n_eq=1)


class _ProxArgminModel(_BoxArgminModel):
    """The quadratic-quartic objective with a learnable l1 penalty (``prox=``)."""

    def _options(self) -> dict[str, Any]:
        self.strength = torch.nn.Parameter(torch.tensor(0.05))
        return {"prox": self._prox}

    def _prox(self, w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return il.prox.l1(w, self.strength, step)


def _graphs_over_batch_sizes(model: torch.nn.Module, sizes: list[int], n: int) -> tuple[int, int]:
    """Graphs dynamo compiled for a training step after the first two batch sizes and after all."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    after_two = 0
    for i, B in enumerate(sizes):
        compiled(torch.randn(B, n)).backward()
        if i == 1:
            after_two = counters["stats"]["unique_graphs"]
    return after_two, counters["stats"]["unique_graphs"]


def _step(model: torch.nn.Module, call: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One training step through ``call`` (the model or its compiled form); the gradients."""
    model.zero_grad()
    call(x).backward()
    # (A parameter only the implicit layer reads has no gradient in the model without it.)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


#: The models timed: (name, constructor). The compiled solve is an opt-in setting of the DEQ
#: (Picard + Neumann); its row compares the compiled model with the same model run eagerly.
MODELS = (
    ("DEQ", _DEQModel),
    ("ArgminLayer (box)", _BoxArgminModel),
    ("ArgminLayer (unbounded)", _ArgminModel),
    ("ArgminLayer (prox=l1)", _ProxArgminModel),
    ("QPLayer", _QPModel),
    ("DEQ (compiled_solve=True)", _CompiledSolveDEQModel),
)
#: Models timed at the small shape only: at n=256, B=64 a training step takes 0.2 s (prox) and
#: 0.4 s (QP), minutes of the suite for rows that say the same as the small shape's (the
#: layer's own time dominates the step either way).
SMALL_ONLY = (_ProxArgminModel, _QPModel)


def run_compile(cfg: Config) -> Section:
    section = Section("compile", "Implicit layers inside torch.compile (float32, training step)")
    section.notes.append(
        "breaks: graph breaks of one forward call (torch._dynamo.explain); graphs 2 / 6: graphs "
        "dynamo compiled after two and after six batch sizes; times are one training step "
        "(forward + backward), eager vs torch.compile with the 'eager' backend and inductor, "
        f"timed over bursts of {BURST} consecutive steps, methods alternated burst by burst."
    )
    section.notes.append(
        "Two shapes: the tiny model (n=16, B=8) and a larger one (n=256, B=64, the width and "
        "batch of the easy DEQ); the 'layer -> identity' rows show what torch.compile costs or "
        "saves on the surrounding layers alone at each. "
        "DEQ (compiled_solve=True): the opt-in compiled solve (Picard + Neumann as torch "
        "control-flow operators, traced into the model's graph); its ratios are to the same "
        "model run eagerly, and its case also times the default DEQ model (same weights) "
        "eagerly in the same rounds (row 'default DEQ: eager', ratio to that eager step)."
    )
    # "aot_eager" (AOT autograd without inductor) tells which part of the compiled step's
    # excess over eager is AOT autograd's and which is inductor's code.
    backends = ["eager"] if cfg.tiny else ["eager", "aot_eager", "inductor"]
    shapes = [(8, 4)] if cfg.tiny else [(16, 8), (256, 64)]
    for n, B in shapes:
        for name, make in MODELS:
            if make in SMALL_ONLY and (n, B) != shapes[0]:
                continue
            torch.manual_seed(0)
            model = make(n)
            reference = None
            if make is _CompiledSolveDEQModel:
                torch.manual_seed(0)  # the same weights
                reference = _DEQModel(n)
            _run_case(section, f"{name} n={n} B={B}", model, n, B, backends, cfg, reference)
    torch._dynamo.reset()
    return section


def _run_case(
    section: Section, case: str, model: torch.nn.Module, n: int, B: int, backends: list[str],
    cfg: Config, reference: torch.nn.Module | None = None,
) -> None:
    """Breaks, graphs over batch sizes and step times of ``model`` (rows and targets added to
    ``section``); ``reference``, if given, is another model timed eagerly in the same rounds."""
    x = torch.randn(B, n)
    sizes = [B, B + 1, B + 2, B + 3, B + 5, B + 9]
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    after_two, after_six = _graphs_over_batch_sizes(model, sizes, n)

    methods = {"eager": lambda m=model, x=x: _step(m, m, x)}
    # The same model with the implicit layer replaced by the identity: what torch.compile
    # itself adds to a step of the surrounding layers (guards, wrappers, graph launch).
    bare = deepcopy(model)
    bare.layer = torch.nn.Identity()
    methods[BARE + "eager"] = lambda m=bare, x=x: _step(m, m, x)
    for backend in backends:
        torch._dynamo.reset()
        # A copy of its own per backend (same weights, so the same gradients): two compiled
        # wrappers of one module share dynamo's cache entries for its code, and each call
        # then also tests the other backend's guards.
        for prefix, source in (("", model), (BARE, bare)):
            copy = deepcopy(source)
            compiled = torch.compile(copy, backend=backend)
            methods[f"{prefix}compiled ({backend})"] = lambda m=copy, c=compiled, x=x: _step(m, c, x)
    if reference is not None:
        methods[REFERENCE] = lambda m=reference, x=x: _step(m, m, x)
    times, grads = time_bursts(methods, cfg)
    bare_times = {m: times.pop(m) for m in list(times) if m.startswith(BARE)}
    reference_time = times.pop(REFERENCE, None)
    for method, seconds in times.items():
        err = max(
            float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
            for g, e in zip(grads[method], grads["eager"], strict=True)
        )
        section.add(
            case=case, method=method, time_ms=1e3 * seconds,
            ratio_to_eager=seconds / times["eager"], grad_rel_err=err, breaks=breaks,
            graphs_after_2_sizes=after_two, graphs_after_6_sizes=after_six,
        )
    section.target(f"{case}: graph breaks per implicit-layer call", "<= 1", breaks, breaks <= 1)
    section.target(
        f"{case}: graphs after six batch sizes vs after two", "equal", after_six,
        after_six == after_two, f"{after_two} after two",
    )
    for method, seconds in bare_times.items():
        section.add(case=case, method=method, time_ms=1e3 * seconds,
                    ratio_to_eager=seconds / bare_times[BARE + "eager"])
    if reference_time is not None:
        section.add(case=case, method=REFERENCE, time_ms=1e3 * reference_time,
                    ratio_to_eager=reference_time / times["eager"])
    for backend in backends:
        ratio = times[f"compiled ({backend})"] / times["eager"]
        excess = times[f"compiled ({backend})"] - times["eager"]
        bare_excess = bare_times[f"{BARE}compiled ({backend})"] - bare_times[BARE + "eager"]
        section.target(
            f"{case}: compiled ({backend}) step / eager step", "<= 1.0", ratio, ratio <= 1.0,
            f"compiled - eager: {1e3 * excess:.3f} ms with the layer, {1e3 * bare_excess:.3f} ms "
            "with the layer replaced by the identity"
            + ("" if reference_time is None else
               f"; / the default DEQ's eager step: {times[f'compiled ({backend})'] / reference_time:.2f}"),
        )
