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


@pytest.fixture(autouse=True)
def cpu_without_fast_bf16(request, monkeypatch):
    """``--dtype auto``, the CLI's and the server's default, picks bf16 on a CPU where bf16 beats
    float32 (``pipelines.precision.cpu_bf16_is_faster``: AMX). On such a machine a CLI or server
    test would draw in bf16 and differ from the float32 pipeline it is compared with, so every test
    runs as on a CPU without fast bf16, whatever machine it is on; tests marked ``real_cpu``
    (tests/unit/test_dtype_auto.py) see the real answer."""
    if request.node.get_closest_marker("real_cpu") is None:
        from unfog.pipelines import precision

        monkeypatch.setattr(precision, "cpu_bf16_is_faster", lambda: False)
