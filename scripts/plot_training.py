"""Plot the loss curve of a training run (its log.jsonl) to a PNG.

    python scripts/plot_training.py runs/digits docs/images/digits_loss.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path, help="run folder holding log.jsonl")
    parser.add_argument("out", type=Path, help="output PNG")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, [r["loss"] for r in rows], lw=0.6, alpha=0.4, label="batch loss")
    ax.plot(steps, [r["loss_smooth"] for r in rows], lw=1.5, label="smoothed (EMA 0.98)")
    ax.set_xlabel("step")
    ax.set_ylabel("eps-prediction MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{args.run.name}: {len(rows)} log points, {rows[-1]['elapsed_s'] / 60:.0f} min")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
