"""Session fixtures of the unit tests: models trained once and shared by several test modules."""

import pytest

from pixel_models import BASE, SR
from unfog.training import load_config, train


@pytest.fixture(scope="session")
def pixel_base(tmp_path_factory):
    """A 16 px pixel-space text-to-image model (two steps)."""
    return train(load_config(None, BASE + ["steps=2", f"out_dir={tmp_path_factory.mktemp('pixel_base')}"]),
                 progress=False)


@pytest.fixture(scope="session")
def pixel_sr(tmp_path_factory):
    """A 16 -> 32 px super-resolution model (two steps; its sample grid drawn at step 2)."""
    return train(load_config(None, SR + ["steps=2", "sample_every=2",
                                         f"out_dir={tmp_path_factory.mktemp('pixel_sr')}"]), progress=False)
