"""Evaluation: Fréchet distance (FID), the digit classifier whose features it uses here, the
deterministic analyzer of the ``shapes`` data set (GenEval-style prompt adherence), prompt
adherence over both (``adherence``), and the metric networks and formulas of FID (Inception-v3),
KID and the CLIP score (see docs/metrics.md). Runs over models: ``unfog.evaluation``."""

from unfog.metrics.digits_classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    DigitTrainConfig,
    accuracy,
    extract_features,
    load_digit_classifier,
    train_digit_classifier,
)
from unfog.metrics.digits_eval import DigitScores, draw_per_class, real_digits_floor, score_digits
from unfog.metrics.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from unfog.metrics.shapes_analyzer import AnalyzerConfig, DetectedObject, Score
from unfog.metrics.shapes_analyzer import analyze as analyze_shapes
from unfog.metrics.shapes_analyzer import score as score_shapes
from unfog.metrics.shapes_analyzer import score_batch as score_shapes_batch

# The metric networks and formulas of FID/KID/CLIP score are imported on first use (PEP 562), so
# `import unfog.metrics` stays light: name -> module that defines it.
_LAZY = {
    **dict.fromkeys(
        ("FIDInceptionV3", "FID_WEIGHTS_NAME", "FID_WEIGHTS_SHA256", "FID_WEIGHTS_URL", "load_fid_inception",
         "resize_for_inception"),
        "inception",
    ),
    **dict.fromkeys(("KIDResult", "kernel_inception_distance", "mmd2_unbiased", "polynomial_kernel"), "kid"),
    **dict.fromkeys(
        ("CLIPConfig", "CLIPModel", "CLIPVisionConfig", "CLIP_VIT_B16", "CLIP_VIT_B32", "CLIP_VIT_L14",
         "load_clip_model"),
        "clip_model",
    ),
    **dict.fromkeys(("AdherenceResult", "DOMAINS", "make_scorer", "measure_adherence", "parse_digit"), "adherence"),
    # the mean score stays `unfog.metrics.clip_score.clip_score`: its name is the submodule's
    **dict.fromkeys(("clip_preprocess", "clip_score_from_embeddings", "clip_scores"), "clip_score"),
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"unfog.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnalyzerConfig",
    "DetectedObject",
    "Score",
    "analyze_shapes",
    "score_shapes",
    "score_shapes_batch",
    "DigitClassifier",
    "DigitClassifierConfig",
    "DigitScores",
    "draw_per_class",
    "real_digits_floor",
    "score_digits",
    "DigitTrainConfig",
    "accuracy",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_digit_classifier",
    "load_statistics",
    "save_statistics",
    "train_digit_classifier",
    *_LAZY,
]
