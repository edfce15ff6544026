"""The tidy of issue 22: one closed-set checker, one meaning per name, no import cycle."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from unfog.choices import check_choice

SRC = Path(__file__).resolve().parents[2] / "src" / "unfog"


def test_one_wording_listing_the_valid_values():
    assert check_choice("spacing", "karras", ("leading", "karras")) == "karras"
    with pytest.raises(ValueError, match=r"^unknown spacing 'cosine'; valid choices: leading, karras$"):
        check_choice("spacing", "cosine", ("leading", "karras"))
    with pytest.raises(ValueError, match=r"^unknown channels 4; valid choices: 1, 3$"):
        check_choice("channels", 4, (1, 3))


def test_no_other_closed_set_checker_is_left():
    """Outside training/ (its config switches later): no second helper, no hand-written wording."""
    other = re.compile(r"def check_choice|def _check\(|def _check_emphasis|def check_prediction|must be one of|"
                       r"choose one of")
    files = [p for p in SRC.rglob("*.py") if "training" not in p.parts and p.name != "choices.py"]
    found = [f"{p.relative_to(SRC)}:{i}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if other.search(line)]
    assert found == []


def test_family_names_one_thing_each():
    import unfog.conditioning as conditioning
    import unfog.pipelines.stable_diffusion as sd
    from unfog.checkpoint.detect import Family

    assert not hasattr(conditioning, "Family") and not hasattr(sd, "Family")
    assert sd.EncoderFamily is conditioning.EncoderFamily and isinstance(Family, type)


def test_latent_model_does_not_import_the_pipeline():
    code = ("import sys, unfog.pipelines.latent_model; "
            "print('unfog.pipelines.stable_diffusion' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "stable_diffusion" not in (SRC / "pipelines" / "latent_model.py").read_text().split('"""', 2)[2]
