"""``il.qp`` on data of mixed scales: how many answers are right, wrong with status solved (no
warning), or reported not solved, and what a mixed batch costs.

Box-constrained QPs ``|zᵢ| <= δ`` with ``Q`` and ``q`` of order 1 and bounds ``δ`` from 1e-10
to 1e-6, their solutions known by construction (each coordinate at its upper or lower bound
with a multiplier in [0.5, 1.5], or free inside; variants: a weakly active bound, duplicated
rows, an LP, a rank-deficient ``Q``), three samples a batch beside one with bounds of order 1.
An answer is right when ``z`` is within ``1e-6 δ`` of the solution (multipliers within
``1e-6``, relative, where they are unique), near within ``1e-4 δ``, wrong beyond. Then the time
of one batch of ``B = 128``, ``n = 50`` with half the samples bounded at 1e-8 (median of
repeats), against the same batch of order 1.

Usage::

    python benchmarks/qp_scales.py                       # 200 batches, about a minute
    python benchmarks/qp_scales.py --baseline ../other-checkout   # also that checkout's il.qp
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import implicit_layers as il  # noqa: E402
from benchmarks.qp import load_baseline  # noqa: E402

F64 = torch.float64
VARIANTS = ("plain", "weak", "dup", "lp", "rank")
KINDS = ("right", "near", "silently wrong", "not solved")


def box_problem(
    g: torch.Generator, n: int, delta: float, variant: str,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]:
    """``(Q, q, G, h, A, b)``, the solution ``z`` and the multipliers ``λ`` (``None`` where
    they are not unique: duplicated rows)."""
    if variant == "lp":
        Q = torch.zeros(n, n, dtype=F64)
    elif variant == "rank":
        L = torch.randn(n, max(1, n // 2), generator=g, dtype=F64)
        Q = L @ L.T
    else:
        L = torch.randn(n, n, generator=g, dtype=F64)
        Q = L @ L.T / n + 0.1 * torch.eye(n, dtype=F64)
    where = torch.randint(0, 3, (n,), generator=g)
    if variant in ("lp", "rank"):
        where[where == 2] = 0  # every coordinate at a bound: a unique solution
    inside = delta * (1.6 * torch.rand(n, generator=g, dtype=F64) - 0.8)
    z = torch.where(where == 0, delta, torch.where(where == 1, -delta, inside))
    lam = torch.zeros(2 * n, dtype=F64)
    lam[:n] = torch.where(where == 0, 0.5 + torch.rand(n, generator=g, dtype=F64), 0.0)
    lam[n:] = torch.where(where == 1, 0.5 + torch.rand(n, generator=g, dtype=F64), 0.0)
    if variant == "weak":  # at its upper bound with a zero multiplier
        i = int(torch.randint(0, n, (1,), generator=g))
        z[i], lam[i], lam[n + i] = delta, 0.0, 0.0
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(F64)
    q = -(Q @ z + G.T @ lam)
    h = delta * torch.ones(2 * n, dtype=F64)
    if variant == "dup":
        G, h, lam = torch.cat([G, G[:n]]), torch.cat([h, h[:n]]), None
    return (Q, q, G, h, torch.zeros(0, n, dtype=F64), torch.zeros(0, dtype=F64)), z, lam


def count(qp: Callable[..., Any], batches: int) -> list[str]:
    """Over ``batches`` batches: right (within ``1e-6``), near (within ``1e-4``: the solve's
    tolerance is close to absolute, and 1e-14 is 3e-6 of a bound of 3e-9), wrong with status
    solved, and reported not solved: one verdict per sample, in order."""
    verdicts = []
    for seed in range(batches):
        g = torch.Generator().manual_seed(seed)
        n = 3 + seed % 4
        variant = VARIANTS[seed % len(VARIANTS)]
        delta = float(10.0 ** (-10 + 4 * torch.rand(1, generator=g, dtype=F64)))
        samples = [box_problem(g, n, delta, variant) for _ in range(3)] + [box_problem(g, n, 1.0, variant)]
        data = [torch.stack(parts) for parts in zip(*(s[0] for s in samples), strict=True)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z, lam, _, info = qp(*data, return_duals=True, return_info=True)
        for i, (_, z_true, lam_true) in enumerate(samples):
            size = delta if i < 3 else 1.0
            error = float((z[i] - z_true).abs().max()) / size
            if lam_true is not None:
                error = max(error, float((lam[i] - lam_true).abs().max()) / (1 + float(lam_true.abs().max())))
            if int(info.status[i]) != 0:
                verdicts.append("not solved")
            elif error <= 1e-6:
                verdicts.append("right")
            elif error <= 1e-4:
                verdicts.append("near")
            else:
                verdicts.append("silently wrong")
    return verdicts


def mixed_batch(tiny: bool) -> tuple[torch.Tensor, ...]:
    """``B = 128``, ``n = 50``, a box and 5 equalities; with ``tiny``, half the samples bounded
    at 1e-8."""
    g = torch.Generator().manual_seed(0)
    B, n, p = 128, 50, 5
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=F64)
    q = torch.randn(B, n, generator=g, dtype=F64)
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(F64).expand(B, -1, -1)
    scale = torch.where(torch.arange(B) % 2 == 0, 1e-8 if tiny else 1.0, 1.0).to(F64)[:, None]
    h = scale * (0.5 + torch.rand(B, 2 * n, generator=g, dtype=F64))
    A = torch.randn(B, p, n, generator=g, dtype=F64)
    b = torch.zeros(B, p, dtype=F64)
    return Q, q, G, h, A, b


def seconds(qp: Callable[..., Any], data: tuple[torch.Tensor, ...]) -> float:
    """The wall time of one solve."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qp(*data)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200,
                        help="batches of known solutions (4 samples each)")
    parser.add_argument("--repeats", type=int, default=15, help="timed solves of each batch")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose il.qp is run too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    solvers: dict[str, Callable[..., Any]] = {"il.qp": il.qp}
    if args.baseline is not None:
        solvers["il.qp (baseline)"] = load_baseline(args.baseline).qp
    verdicts = {name: count(qp, args.batches) for name, qp in solvers.items()}
    for name, found in verdicts.items():
        print(f"{name:>17}: " + ", ".join(f"{found.count(k)} {k}" for k in KINDS)
              + f" of {len(found)} samples")
    if len(verdicts) == 2:
        ours, base = verdicts.values()
        print("  of the samples the baseline had right or near, now: " + ", ".join(
            f"{sum(1 for a, b in zip(ours, base, strict=True) if b in ('right', 'near') and a == k)} {k}"
            for k in KINDS))
    for tiny in (False, True):
        label = "half bounded at 1e-8" if tiny else "order 1"
        data = mixed_batch(tiny)
        # Alternated, so that neither always runs after the other.
        times: dict[str, list[float]] = {name: [] for name in solvers}
        for r in range(args.repeats):
            for name in (list(solvers) if r % 2 == 0 else list(solvers)[::-1]):
                times[name].append(seconds(solvers[name], data))
        print(f"B = 128, n = 50, {label}: " + ", ".join(
            f"{name} {1e3 * statistics.median(t):.1f} ms" for name, t in times.items()))


if __name__ == "__main__":
    main()
