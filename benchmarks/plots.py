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
    return paths


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="?", default=str(here / "results" / "results.json"))
    p.add_argument("--out", default=str(here.parent / "docs" / "img"))
    a = p.parse_args(argv)
    for path in make_plots(json.loads(Path(a.results).read_text()), Path(a.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
