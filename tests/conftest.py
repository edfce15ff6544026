"""Fixtures shared by the test modules (helper functions are in ``model_checks.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module, restored afterwards. These models are tiny and the ops
    many and small: more threads only add synchronisation, which on a busy 2-core machine made
    such modules 4-10x slower. Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
