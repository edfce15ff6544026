"""`unfog eval`: evaluation runs over a grid of samplers, step counts and guidance scales, with
FID, KID, CLIP score and prompt adherence, written up as report.json, report.md and plots.

    settings.py     what a run is (EvalSettings), the prompts file
    generation.py   models behind one draw call, cell folders, resumable atomic generation
    image_sets.py   the images of a cell or of a given folder, with their prompts
    features.py     feature extractors for FID / KID, the reference and its statistics file
    run.py          the run: resolve, load every network, draw, measure
    report.py       report.json, report.md, plots

See docs/metrics.md, section "unfog eval".
"""

from .features import make_extractor, save_reference_statistics
from .run import run_evaluation
from .settings import FEATURES, METRICS, EvalSettings, read_prompts

__all__ = ["EvalSettings", "FEATURES", "METRICS", "make_extractor", "read_prompts", "run_evaluation",
           "save_reference_statistics"]
