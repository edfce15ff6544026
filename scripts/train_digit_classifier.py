"""Train the digit classifier used for digits FID / accuracy and write the shipped weights.

    python scripts/train_digit_classifier.py [--seed 0] [--epochs 30] [--out PATH]

Writes ``src/unfog/weights/digits_classifier.safetensors`` by default, with the seed, the
held-out accuracy and both configs in the safetensors metadata. Takes a few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from unfog.datasets.digits import digits_tensors
from unfog.metrics.digits_classifier import (
    DigitClassifierConfig,
    DigitTrainConfig,
    accuracy,
    default_weights_path,
    read_metadata,
    save_digit_classifier,
    train_digit_classifier,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=default_weights_path())
    args = parser.parse_args()

    config, model_config = DigitTrainConfig(), DigitClassifierConfig()
    t0 = time.perf_counter()
    model = train_digit_classifier(args.seed, args.epochs, config=config, model_config=model_config, verbose=True)
    seconds = time.perf_counter() - t0
    train_acc = accuracy(model, *digits_tensors("train", model_config.image_size))
    test_acc = accuracy(model, *digits_tensors("test", model_config.image_size))
    metadata = {
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "train_config": json.dumps(asdict(config)),
        "train_accuracy": f"{train_acc:.6f}",
        "test_accuracy": f"{test_acc:.6f}",
        "split": "unfog.datasets.digits: stratified 80/20, SPLIT_SEED=0",
        "torch_version": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_digit_classifier(model, args.out, metadata)
    args.out.chmod(0o644)  # safetensors writes 0600; a shipped package file must be readable by all
    print(f"trained in {seconds:.1f}s; train accuracy {train_acc:.4f}, held-out accuracy {test_acc:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(json.dumps(read_metadata(args.out), indent=1))


if __name__ == "__main__":
    main()
