"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from torch_conslaw.catalogue import scoped_registrations


@pytest.fixture(autouse=True)
def _registrations_stay_in_their_test():
    """register_* calls of a test do not leak into the next ones (or into the doctests)."""
    with scoped_registrations():
        yield


@pytest.fixture
def one_torch_thread():
    """Leave the asynchronous monitor's worker a free core (as its docs ask), for one test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
