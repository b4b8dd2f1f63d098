"""Shared test fixtures. Set IL_TEST_DEVICE=cuda to run the device-agnostic tests on a GPU."""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("IL_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, restored afterwards.

    The test problems are tiny: on a shared machine more threads only add OpenMP overhead and
    contention. A module opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def captures(monkeypatch):
    """The number of capture runs (``implicit_layers._capture.capture`` as the functional API
    calls it) of the layer calls made with it."""
    from implicit_layers import functional

    count = [0]
    real = functional.capture

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "capture", counted)
    return count
