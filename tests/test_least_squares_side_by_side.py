"""The curve-fit benchmark's side-by-side mode: its statistics on a clock whose readings are known."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.composite import alternate_pairs


def _fake_clock(durations: dict[str, list[float]], log: list[str]):
    """A clock that advances, during each call, by the next duration of the function called."""
    now = [0.0]
    iters = {k: iter(v) for k, v in durations.items()}

    def call(name: str):
        def fn() -> None:
            log.append(name)
            now[0] += next(iters[name])
        return fn

    return (lambda: now[0]), call


def test_alternate_pairs_medians_ratio_and_order():
    # 20 pairs: a takes 3, 3, 3, ... except one outlier; b takes 1 or 2 by turns.
    a = [3.0] * 20
    a[7] = 300.0
    b = [1.0, 2.0] * 10
    log: list[str] = []
    clock, call = _fake_clock({"a": a, "b": b}, log)
    out = alternate_pairs(call("a"), call("b"), calls=20, blocks=2, clock=clock)
    # The order within a pair is swapped every pair.
    assert log[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a_ms"] == pytest.approx(3e3) and out["b_ms"] == pytest.approx(1.5e3)
    # Per-pair ratios: ten 3/1, nine 3/2 and the outlier's 300/2; the median is 3, which the
    # outlier's pair alone would not give (its own ratio is 150).
    assert out["ratio"] == pytest.approx(3.0)
    # Blocks of 10 pairs: five 3/1 and five 3/2 give (1.5 + 3) / 2; the first block has the
    # outlier in place of a 3/2, so its median is 3.
    assert out["ratio_low"] == pytest.approx(2.25) and out["ratio_high"] == pytest.approx(3.0)


def test_alternate_pairs_rejects_fewer_calls_than_blocks():
    with pytest.raises(ValueError, match="calls must be at least blocks = 10, got 3"):
        alternate_pairs(lambda: None, lambda: None, calls=3, clock=itertools.count().__next__)
