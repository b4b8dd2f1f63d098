"""benchmarks/deq_training.py and benchmarks/adaptive_switch.py run in tiny mode and report
every configuration they were asked for."""

from __future__ import annotations

import pytest

pytest.importorskip("torchdeq")
pytest.importorskip("sklearn")

from benchmarks import deq_training  # noqa: E402


def test_tiny_run_trains_every_configuration(tmp_path):
    configs = ["torchdeq defaults", "ours defaults", "ours recipe"]
    out = tmp_path / "deq_training.md"
    text = deq_training.main(["--tiny", "--configs", *configs, "--out", str(out)])
    assert out.read_text().strip() == text
    rows = [line.split("|")[1:-1] for line in text.splitlines()[2:]]
    assert len(rows) == len(deq_training.DATASETS) * len(configs)
    for dataset, name, accuracy, *_ in rows:
        mean = float(accuracy.split("±")[0])
        # one epoch on 150 training samples: far above chance (10 % digits, ~60 % breast_cancer)
        assert mean > (40.0 if dataset.strip() == "digits" else 70.0), (dataset, name, mean)


def test_adaptive_switch_benchmark_tiny():
    from benchmarks import adaptive_switch

    text = adaptive_switch.main(["--tiny"])
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()[2:]}
    assert set(rows) == {"DEQ easy", "DEQ hard", "DEQ MLP", "lasso (diabetes)"}
    assert rows["DEQ easy"] == "(Picard)"
    assert rows["lasso (diabetes)"] == "(Picard, then Anderson)"
