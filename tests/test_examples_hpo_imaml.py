"""The hyperparameter-optimization and iMAML examples, run in their tiny modes, checked on results.

The examples run on the CPU (they are small problems that pick float64 / float32 themselves), so
these tests do not use the ``device`` fixture.
"""

import math
from pathlib import Path

import pytest
import torch

import implicit_layers as il
from tests.helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def hpo():
    return load_example("hyperparameter_optimization")


@pytest.fixture(scope="module")
def hpo_results(hpo, tmp_path_factory):
    out = tmp_path_factory.mktemp("hpo")
    return hpo.main(["--tiny", "--out", str(out)])


@pytest.fixture(scope="module")
def imaml():
    return load_example("imaml")


@pytest.fixture(scope="module")
def imaml_results(imaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("imaml")
    return imaml.main(["--tiny", "--out", str(out)])


def _errors(rows, prefix):
    return [r["rel_error"] for r in rows if r["method"].startswith(prefix)]


# --- hyperparameter optimization ----------------------------------------------------------------
def test_hpo_exact_hypergradient_matches_finite_differences(hpo):
    """The example's dense reference against central differences of the validation loss."""
    torch.manual_seed(0)
    data = hpo.load_data(60, 100, 8)
    n = data["X_train"].shape[1] * hpo.N_CLASSES
    rho = math.log(0.05) + 0.5 * torch.randn(n, dtype=torch.float64)
    g, _ = hpo.exact_hypergradient(rho, hpo.solve_tight(rho, data), data)
    eps = 1e-4
    for i in (0, n // 2, n - 3):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = eps
        up, down = (hpo.cross_entropy(hpo.solve_tight(rho + s * e, data), data["X_val"], data["y_val"])
                    for s in (1, -1))
        fd = float(up - down) / (2 * eps)
        assert abs(fd - float(g[i])) <= 1e-6 * float(g.abs().max()) + 1e-9, (i, fd, float(g[i]))


def test_hpo_implicit_hypergradients_match_dense(hpo_results):
    rows = {r["method"]: r for r in hpo_results["table"]}
    assert rows["Implicit(CG)"]["rel_error"] < 1e-6
    assert rows["Implicit(Dense)"]["rel_error"] < 1e-6


def test_hpo_approximate_hypergradients_improve_with_k(hpo_results):
    rows = hpo_results["table"]
    for prefix in ("Implicit(Neumann", "Truncated", "Unrolled"):
        errs = _errors(rows, prefix)
        assert len(errs) >= 2
        assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), (prefix, errs)
        assert errs[0] > 1e-3  # a short series is visibly inexact: the comparison means something
    # Truncated(k) from the solution with step α is the k-term Neumann series with the same α.
    for a, b in zip(_errors(rows, "Implicit(Neumann"), _errors(rows, "Truncated"), strict=True):
        assert abs(a - b) <= 1e-8 * max(a, 1.0)


def test_hpo_outer_optimisation_lowers_validation_loss(hpo_results):
    history = hpo_results["history"]
    assert history[-1] < history[0]
    assert hpo_results["tuned"]["val_loss"] < hpo_results["grid_best"]["val_loss"]
    assert Path(hpo_results["plot"]).is_file()


# --- iMAML ----------------------------------------------------------------------------------------
def test_imaml_meta_gradient_matches_finite_differences(imaml):
    """The example's iMAML meta-gradient (CG backward) against central differences in float64."""
    gen = torch.Generator().manual_seed(0)
    theta = imaml.init_params(gen).double()
    tasks = {k: v.double() for k, v in imaml.sample_tasks(2, 10, 25, gen).items()}
    lam = 2.0

    def query_loss(th):
        phi = il.argmin(imaml.proximal_objective, th.detach().expand(2, -1).clone(), th,
                        tasks["xs"], tasks["ys"], lam, batched=True,
                        solver=il.solvers.LBFGS(rtol=0.0, atol=1e-12, max_steps=3000),
                        backward=il.linear.CG(rtol=1e-12, max_steps=3000))
        return imaml.task_mse(phi, tasks["xq"], tasks["yq"]).sum()

    th = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(query_loss(th), th)
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = float(query_loss(theta + eps * v) - query_loss(theta - eps * v)) / (2 * eps)
    assert abs(fd - float(grad @ v)) <= 1e-6 * abs(fd), (fd, float(grad @ v))


def test_imaml_meta_training_lowers_post_adaptation_loss(imaml_results):
    for method in ("iMAML", "MAML", "FOMAML"):
        mse = imaml_results["test_mse"][method]
        init = imaml_results["test_mse_init"][method]
        assert mse < init, (method, mse, init)
    curve = [mse for _, mse in imaml_results["eval_curves"]["iMAML"]]
    assert len(curve) >= 3
    assert curve[-1] < 0.95 * curve[0], curve


def test_imaml_memory_flat_while_unrolled_grows(imaml_results):
    scan, ks = imaml_results["scan"], imaml_results["ks"]
    lo, hi = min(ks), max(ks)
    assert hi >= 20 * lo
    imaml = [scan["iMAML"][k]["saved_bytes"] for k in (lo, hi)]
    maml = [scan["MAML"][k]["saved_bytes"] for k in (lo, hi)]
    assert imaml[0] > 0
    assert imaml[1] <= 1.1 * imaml[0]
    assert scan["iMAML"][hi]["peak_saved_bytes"] <= 1.1 * scan["iMAML"][lo]["peak_saved_bytes"]
    # Unrolling keeps every step: at least half the linear growth.
    assert maml[1] >= 0.5 * (hi / lo) * maml[0], maml
    assert Path(imaml_results["plot"]).is_file()
