"""The influence-function and data-poisoning examples, run in --tiny mode, checked on results.

Each example returns its measured figures; the references are independent of the library:
leave-one-out retraining and a dense closed-form Hessian for influence, Newton retraining and
central finite differences for poisoning.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import load_example as _load


@pytest.fixture(scope="module")
def influence(tmp_path_factory):
    out = tmp_path_factory.mktemp("influence")
    return _load("influence_functions").main(["--tiny", "--out", str(out)])


@pytest.fixture(scope="module")
def poisoning(tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoning")
    return _load("data_poisoning").main(["--tiny", "--out", str(out)])


def test_influence_predicts_leave_one_out(influence):
    bc = influence["breast_cancer"]
    assert bc["loo_points"] >= 15
    assert bc["pearson_min"] > 0.9, bc["pearson"]
    assert bc["spearman_min"] > 0.9, bc["spearman"]


def test_cg_influence_equals_dense_influence(influence):
    dg = influence["digits"]
    assert dg["rel_err_vs_dense"] < 1e-6
    assert dg["pearson_vs_dense"] > 0.999


def test_lissa_influence_agrees_with_cg(influence):
    lissa = influence["breast_cancer"]["lissa"]
    assert lissa["pearson_vs_cg"] > 0.9
    assert min(lissa["pearson_vs_loo"]) > 0.8


def test_influence_plot_written(influence):
    assert Path(influence["plot"]).stat().st_size > 0


def test_poisoned_point_raises_retrained_test_loss(poisoning):
    loss = poisoning["test_loss"]
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["poisoned_point"] > loss["clean"] * 1.05
    assert loss["poisoned_point"] > loss["random_point"]
    assert loss["poisoned_point"] > loss["unoptimised_point"]
    assert poisoning["val_loss_end"] > poisoning["val_loss_start"]


def test_poisoning_gradient_matches_finite_differences(poisoning):
    assert poisoning["grad_fd_rel_err"] < 1e-5
    assert Path(poisoning["plot"]).stat().st_size > 0
