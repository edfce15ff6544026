"""The server tests' shared fixture."""

from __future__ import annotations

import pytest
import webuiapi


@pytest.fixture(autouse=True)
def fresh_webuiapi_defaults():
    """webuiapi writes ControlNet units (and other scripts) into its methods' mutable default
    ``alwayson_scripts={}``, so they leak into every later call of any test: empty those defaults
    after each test."""
    yield
    for method in (webuiapi.WebUIApi.txt2img, webuiapi.WebUIApi.img2img):
        for default in method.__defaults__ or ():
            if isinstance(default, dict):
                default.clear()
