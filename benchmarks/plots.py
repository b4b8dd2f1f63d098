"""Plots of a results file: ``python -m benchmarks.plots [results.json] [--out docs/img]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def make_plots(results: dict, out: Path) -> list[Path]:
    """Write PNG plots (memory vs inner steps, CG iterations vs κ) and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    sec = {s["name"]: s for s in results["sections"]}
    paths = []
    if "memory" in sec:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for mode in ("implicit", "unrolled"):
            rows = [r for r in sec["memory"]["rows"] if r["method"] == mode]
            ks = [int(r["case"].split("=")[1]) for r in rows]
            ax.loglog(ks, [r["saved_MB"] for r in rows], "o-", label=mode)
        ax.set_xlabel("inner steps K")
        ax.set_ylabel("memory kept for backward (MB)")
        ax.legend()
        ax.set_title("Hypergradient memory vs inner steps")
        fig.tight_layout()
        paths.append(out / "bench_memory.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if "linsolve" in sec:
        rows = [r for r in sec["linsolve"]["rows"] if r["method"] == "ours CG"]
        if rows:
            kap = [float(r["case"].split("κ=")[1]) for r in rows]
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            ax.loglog(kap, [r["steps"] for r in rows], "o-", label="ours CG")
            ax.loglog(kap, [r["scipy_steps"] for r in rows], "x--", label="scipy cg")
            ax.loglog(kap, [r["sqrt_kappa_bound"] for r in rows], ":", label="½√κ ln(2/tol)")
            ax.set_xlabel("condition number κ")
            ax.set_ylabel("iterations to rtol 1e-8")
            ax.legend()
            ax.set_title("CG iterations vs κ")
            fig.tight_layout()
            paths.append(out / "bench_cg_kappa.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    peers = peer_chart(results, out)
    if peers is not None:
        paths.append(peers)
    return paths


# (section, case, label, {role: method}) of the peer chart; a method missing from the results
# (a peer not installed in that run) leaves its bar out.
PEER_CASES = [
    ("ridge", "d=1000", "ridge d=1000\n(torchopt)", {
        "ours": "ours default", "tight": "torchopt CG", "defaults": "torchopt default",
        "jaxopt": "jaxopt CG (jit)"}),
    ("ridge", "digits logistic (650 weights)", "digits logistic\n(torchopt)", {
        "ours": "ours LBFGS + default", "tight": "torchopt CG (same LBFGS forward)",
        "jaxopt": "jaxopt LBFGS + CG (jit)"}),
    ("imaml", "tanh MLP, one task", "iMAML tanh MLP\n(torchopt)", {
        "ours": "ours CG 1e-10", "tight": "torchopt CG 1e-10", "defaults": "torchopt default (normal CG)"}),
    ("deq", "easy n=256 B=64", "DEQ easy\n(torchdeq)", {
        "ours": "ours default", "tight": "torchdeq fixed_point_iter IFT 1e-10",
        "defaults": "torchdeq defaults", "jaxopt": "jaxopt FixedPointIteration (jit)"}),
    ("deq", "hard n=256 B=64", "DEQ hard\n(torchdeq)", {
        "ours": "ours default", "tight": "torchdeq fixed_point_iter IFT 1e-10",
        "defaults": "torchdeq defaults", "jaxopt": "jaxopt FixedPointIteration (jit)"}),
]
PEER_ROLES = {
    "ours": "implicit_layers, defaults",
    "tight": "torchopt / torchdeq, tolerance 1e-10",
    "defaults": "torchopt / torchdeq, their defaults",
    "jaxopt": "jaxopt, jit-compiled",
}


def peer_chart(results: dict, out: Path) -> Path | None:
    """Grouped bars of time and gradient error against the peers (``bench_peers.png``), or None
    when the results hold none of the cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = {s["name"]: s for s in results["sections"]}
    cases = []
    for section, case, label, methods in PEER_CASES:
        rows = {r["method"]: r for r in sec.get(section, {}).get("rows", []) if r["case"] == case}
        found = {role: rows[m] for role, m in methods.items() if m in rows}
        if found:
            cases.append((label, found))
    if not cases:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    width = 0.2
    for ax, key, ylabel in ((axes[0], "time_ms", "time, forward + backward (ms)"),
                            (axes[1], "grad_rel_err", "relative gradient error")):
        for j, (role, name) in enumerate(PEER_ROLES.items()):
            xs = [i + (j - 1.5) * width for i, (_, found) in enumerate(cases) if role in found]
            ys = [max(found[role][key], 1e-16) for _, found in cases if role in found]
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3, which="major")
    axes[1].axhline(1e-10, color="gray", lw=0.8)
    fig.suptitle("Against the peer libraries on the benchmark problems (CPU, float64)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 0.95))
    axes[1].set_xticks(range(len(cases)), [label for label, _ in cases])
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = out / "bench_peers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="?", default=str(here / "results" / "results.json"))
    p.add_argument("--out", default=None, help="output folder (default out/plots, ignored by git)")
    p.add_argument("--write-docs", action="store_true", help="write into docs/img (tracked files)")
    a = p.parse_args(argv)
    if a.out is not None and a.write_docs:
        p.error("give either --out or --write-docs, not both")
    out = Path(a.out) if a.out else here.parent / ("docs/img" if a.write_docs else "out/plots")
    for path in make_plots(json.loads(Path(a.results).read_text()), out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
