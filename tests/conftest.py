"""Shared test fixtures. Set IL_TEST_DEVICE=cuda to run the device-agnostic tests on a GPU."""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("IL_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return DEVICE
