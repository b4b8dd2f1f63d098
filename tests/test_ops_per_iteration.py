"""The solver loops stay lean: aten ops and host synchronisations per iteration, counted by the
benchmark's dispatch-mode counter (deterministic counts, not timings)."""

from __future__ import annotations

import pytest
import torch

import implicit_layers as il
from benchmarks.ops_per_iteration import (
    OpCounter,
    _count,
    _forward_runner,
    _linear_runner,
    per_iteration,
)


def test_counter_counts_ops_and_synchronisations():
    a, b = torch.ones(3), torch.ones(3)

    def run(counter: OpCounter) -> None:
        c = a + b  # add
        counter.paused(torch.mul)(c, c)  # hidden
        float(c.sum())  # sum, _local_scalar_dense
        c.tolist()  # counted by hand
        c.numpy()  # counted by hand as one read (its internal alias is part of it)

    counter = _count(run)
    assert counter.ops == 5
    assert counter.syncs == 3
    assert counter.names == {"add": 1, "sum": 1, "_local_scalar_dense": 1, "tolist": 1, "numpy": 1}
    # the reads are restored after counting
    assert torch.Tensor.numpy.__name__ == "numpy" and torch.Tensor.tolist.__name__ == "tolist"


# Ops per iteration beyond the map / operator product at check_every=8 (the accelerator
# default). The targets; CG's is 15 plus a quarter op for its check every 8 steps.
BUDGETS = [
    ("Picard", lambda: _forward_runner(il.solvers.Picard, 8, True), 8.0),
    ("Anderson", lambda: _forward_runner(il.solvers.Anderson, 8, True), 25.0),
    ("Neumann", lambda: _linear_runner(il.linear.Neumann, 8, True, False), 8.0),
    ("CG", lambda: _linear_runner(il.linear.CG, 8, True, True), 15.25),
    ("GMRES", lambda: _linear_runner(il.linear.GMRES, 8, True, False, restart=40), 35.0),
]


@pytest.mark.parametrize("name,make,budget", BUDGETS, ids=[b[0] for b in BUDGETS])
def test_lean_loops_meet_their_budgets(name, make, budget):
    ops, syncs, names = per_iteration(make(), 8)
    assert ops <= budget, (name, ops, names)
    # one synchronisation per check, none between checks
    assert syncs <= 1 / 8, (name, syncs)


def test_cpu_setting_synchronises_once_per_step():
    ops, syncs, _ = per_iteration(_forward_runner(il.solvers.Picard, 1, True), 8)
    assert syncs == 1.0
    ops, syncs, _ = per_iteration(_linear_runner(il.linear.CG, 1, True, True), 8)
    assert syncs == 1.0


def test_whole_call_counts_only_the_layer_own_ops():
    """Rows of the whole-call count: forward + backward add up, the map and its VJP are hidden
    (no tanh or matrix product among the counted ops), both APIs count the same, and each call
    stays within the count measured when it was last cut."""
    from benchmarks._whole_call import call_configs, count_call

    budgets = {"Picard + Neumann": 195, "default": 214, "Anderson + GMRES": 635}
    for label, (solver, backward) in call_configs().items():
        functional = count_call("il.fixed_point", True, solver, backward)
        module = count_call("il.nn.DEQ", True, solver, backward)
        for r in (functional, module):
            assert r["fwd"] + r["bwd"] == sum(r["names"].values())
            assert not {"tanh", "mm", "addmm", "matmul"} & set(r["names"]), r["names"]
            assert r["fwd_steps"] > 1 and r["syncs"] >= r["fwd_steps"]
        # the module makes its own zero initial state: one op more
        assert (functional["fwd"] + 1, functional["bwd"]) == (module["fwd"], module["bwd"])
        assert functional["fwd"] + functional["bwd"] <= budgets[label], (label, functional)
