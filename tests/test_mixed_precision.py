"""Reduced precision with default settings: autocast and half-precision modules run, converge
without a warning, and stay close to float64 on the same rounded parameters and data."""

from __future__ import annotations

import pytest
import torch

from benchmarks.mixed_precision import argmin_case, deq_case


@pytest.mark.parametrize(
    ("dtype", "autocast", "solution_tol", "gradient_tol"),
    [
        (None, None, 1e-4, 1e-4),
        (None, torch.bfloat16, 3e-2, 5e-2),
        (torch.bfloat16, None, 3e-2, 5e-2),
        (torch.float16, None, 3e-3, 1e-2),
    ],
    ids=["float32", "autocast-bf16", "bf16-module", "fp16-module"],
)
def test_deq_in_reduced_precision(dtype, autocast, solution_tol, gradient_tol):
    result = deq_case(dtype, autocast, "cpu")
    assert result["converged"], result
    assert result["solution"] < solution_tol, result
    assert result["gradient"] < gradient_tol, result
    expected = "float32" if dtype is None else str(dtype).replace("torch.", "")
    assert result["output dtype"] == expected


@pytest.mark.parametrize(
    ("dtype", "solution_tol", "gradient_tol"),
    [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 5e-2, 0.5), (torch.float16, 5e-3, 0.1)],
    ids=["float32", "bf16", "fp16"],
)
def test_argmin_in_reduced_precision(dtype, solution_tol, gradient_tol):
    result = argmin_case(dtype, "cpu")
    assert result["converged"], result
    assert result["solution"] < solution_tol, result
    assert result["gradient"] < gradient_tol, result
