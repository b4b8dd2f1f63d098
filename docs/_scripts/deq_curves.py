"""DEQ training curves: ``python docs/_scripts/deq_curves.py [--write-docs]``.

Trains ``examples/deq_digits.py``'s classifier (implicit backward, defaults of the example:
40 epochs, hidden 128, Anderson forward) twice, without and with the Jacobian penalty
(``--jac-reg 0.5``), and draws ``deq_training_curves.png``: test accuracy, mean forward
(Anderson) steps and mean backward (GMRES) steps per sample, per epoch. About two minutes on
one core.

The figure goes to ``--out`` if given, ``docs/img`` with ``--write-docs`` (a tracked file), and
``out/figures`` otherwise. ``--tiny`` trains the example's tiny mode (seconds; for the tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PENALTY = 0.5


def _example():
    spec = importlib.util.spec_from_file_location("deq_digits", ROOT / "examples" / "deq_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tiny: bool) -> dict[str, dict]:
    """The example's results (with their per-epoch ``history``) without and with the penalty."""
    example = _example()
    base = ["--backward", "implicit"] + (["--tiny"] if tiny else [])
    return {
        "no penalty": example.main(base),
        f"Jacobian penalty {PENALTY}": example.main(base + ["--jac-reg", str(PENALTY)]),
    }


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("test_accuracy", "test accuracy", lambda v: 100 * v, "%"),
        ("forward_steps", "forward steps per sample", lambda v: v, "Anderson steps"),
        ("backward_steps", "backward steps per sample", lambda v: v, "GMRES steps"),
    )
    for ax, (key, title, scale, unit) in zip(axes, panels, strict=True):
        for label, result in results.items():
            values = result["history"][key]
            ax.plot(range(1, len(values) + 1), [scale(v) for v in values], marker=".", label=label)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_ylabel(unit, fontsize=11)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the example's tiny mode (seconds)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--write-docs", action="store_true", help="write docs/img (tracked files)")
    a = p.parse_args(argv)
    if a.out and a.write_docs:
        p.error("give either --out or --write-docs, not both")
    out = Path(a.out) if a.out else ROOT / ("docs/img" if a.write_docs else "out/figures")
    results = run(a.tiny)
    plot(results, out / "deq_training_curves.png")
    for label, result in results.items():
        h = result["history"]
        print(f"{label}: test accuracy {100 * result['test_accuracy']:.1f}%, forward steps "
              f"{h['forward_steps'][0]:.1f} -> {h['forward_steps'][-1]:.1f}, backward steps "
              f"{h['backward_steps'][0]:.1f} -> {h['backward_steps'][-1]:.1f} (first -> last epoch)")
    print(f"figure: {out / 'deq_training_curves.png'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
