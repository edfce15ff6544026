"""Plot the loss curve of a training run (its log.jsonl) to a PNG.

    python scripts/plot_training.py runs/digits docs/images/digits_loss.png
    python scripts/plot_training.py runs/shapes_vae docs/images/shapes_vae_loss.png --ylabel "L1 sum + KL"

A resumed run appends to the same log, with its clock restarting at 0; the total time adds the
sessions up.
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
    parser.add_argument("--ylabel", default="eps-prediction MSE", help="what the loss is")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, [r["loss"] for r in rows], lw=0.6, alpha=0.4, label="batch loss")
    ax.plot(steps, [r["loss_smooth"] for r in rows], lw=1.5, label="smoothed (EMA 0.98)")
    ax.set_xlabel("step")
    ax.set_ylabel(args.ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    total, last = 0.0, 0.0
    for r in rows:  # a resumed session restarts elapsed_s at 0
        total += r["elapsed_s"] - last if r["elapsed_s"] >= last else r["elapsed_s"]
        last = r["elapsed_s"]
    ax.set_title(f"{args.run.name}: {len(rows)} log points, {total / 60:.0f} min")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
