"""Evaluation: Fréchet distance (FID) and the digit classifier whose features it uses here."""

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

__all__ = [
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
]
