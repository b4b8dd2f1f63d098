"""Measure the worst relative errors that the core tests (``tests/test_core_*.py``) bound.

Run ``python -m tests.core_accuracy`` from the repository root; it prints one line per
check with the worst relative error observed over the same problems the tests use (and, for
the property checks, over 30 random problems per type). The figures in ``docs/testing.md``
come from this script.
"""

from __future__ import annotations

import time
import warnings

import torch

import implicit_layers as il

# The problems and solver lists are the tests' own (so the figures are the tests' bounds): this
# report lives beside them, in the tests package.
from tests import test_core_backward_modes as modes
from tests import test_core_deq as deq
from tests import test_core_properties as props
from tests import test_core_ridge as ridge

CPU = torch.device("cpu")


def worst(values: list[float]) -> str:
    return f"{max(values):.2e}"


def ridge_errors() -> None:
    for dtype in (torch.float64, torch.float32):
        data = ridge.make_data(dtype, CPU)
        _, g_ref = ridge.closed_form_hypergradient(*ridge.make_data(torch.float64, CPU))
        errs: dict[tuple[str, str], float] = {}
        for lname, make_linear in ridge.LINEAR_SOLVERS.items():
            for fname, make_forward in ridge.FORWARD_SOLVERS.items():
                if dtype == torch.float32 and fname != "LBFGS":
                    continue
                _, g, _ = ridge.implicit_hypergradient(*data, make_forward(), make_linear())
                errs[lname, fname] = ridge.rel(g.double(), g_ref)
        for axis, names in ((0, ridge.LINEAR_SOLVERS), (1, ridge.FORWARD_SOLVERS)):
            rows = {name: worst([e for k, e in errs.items() if k[axis] == name])
                    for name in names if any(k[axis] == name for k in errs)}
            what = "linear solver" if axis == 0 else "forward solver"
            print(f"ridge hypergradient {str(dtype)[6:]}: worst rel. error per {what}: {rows}")


def deq_errors() -> None:
    params, cot = deq.make_params(CPU)
    _, g_ref = deq.dense_ift_gradients(params, cot)
    rows = {}
    for lname, make_linear in deq.LINEAR_SOLVERS.items():
        errs = []
        for make_forward in deq.FORWARD_SOLVERS.values():
            for batched in (True, False):
                _, grads, _ = deq.implicit_gradients(params, cot, make_forward(), make_linear(),
                                                     batched)
                errs += [deq.rel(g, r) for g, r in zip(grads, g_ref, strict=True)]
        rows[lname] = worst(errs)
    print(f"DEQ gradients (W, U, b, x) vs dense IFT: worst rel. error per linear solver "
          f"(over Anderson/Picard/Broyden forward, batched and not): {rows}")


def property_errors(n_problems: int = 30) -> None:
    gen = torch.Generator().manual_seed(1234)
    cases = {
        "argmin": props.test_argmin_implicit_unrolled_finite_differences,
        "fixed_point": props.test_fixed_point_implicit_unrolled_finite_differences,
        "root": props.test_root_implicit_unrolled_finite_differences,
    }
    captured: list[tuple[float, float]] = []
    original = props.three_way

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result)
        return result

    props.three_way = recording
    try:
        for name, test in cases.items():
            captured.clear()
            inner = test.hypothesis.inner_test
            for _ in range(n_problems):
                n = int(torch.randint(2, 7, (), generator=gen))
                seed = int(torch.randint(0, 2**16, (), generator=gen))
                u = float(torch.rand((), generator=gen))
                if name == "fixed_point":
                    inner(n=n, contraction=0.05 + 0.85 * u, seed=seed, device=CPU)
                else:
                    inner(n=n, cond=1.0 + 9.0 * u, seed=seed, device=CPU)
            unrolled = worst([c[0] for c in captured])
            fd = worst([c[1] for c in captured])
            print(f"{name}: over {n_problems} random problems, implicit vs unrolled {unrolled}, "
                  f"implicit vs central differences {fd}")
    finally:
        props.three_way = original


def backward_mode_errors() -> None:
    fp = modes.FixedPoint(CPU)
    exact = fp.grad(il.linear.Dense())
    trunc = {k: modes.rel(fp.grad(il.backward.Truncated(k, step_size=0.7)), exact)
             for k in (1, 3, 10, 30, 100)}
    same = max(modes.rel(fp.grad(il.backward.Truncated(k, step_size=0.7)),
                         fp.grad(modes.neumann(k, 0.7))) for k in (1, 3, 10, 30, 100))
    phantom = {k: modes.rel(fp.grad(il.backward.Phantom(k, damping=0.5)), exact) for k in (1, 5, 20, 60)}
    jfb = modes.rel(fp.grad(il.backward.JacobianFree()), exact)
    print(f"DEQ Truncated(k) vs Implicit(Neumann(k)): worst rel. difference {same:.2e}")
    print("DEQ Truncated(k) vs implicit, rel. error by k: "
          + ", ".join(f"{k}: {e:.1e}" for k, e in trunc.items()))
    print("DEQ Phantom(k, 0.5) vs implicit, rel. error by k: "
          + ", ".join(f"{k}: {e:.1e}" for k, e in phantom.items()))
    print(f"DEQ JacobianFree vs implicit: rel. error {jfb:.2e} (the bias JFB accepts)")


def main() -> None:
    warnings.simplefilter("error", il.ConvergenceWarning)
    start = time.perf_counter()
    ridge_errors()
    deq_errors()
    property_errors()
    backward_mode_errors()
    print(f"(measured in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
