"""Plot the loss curve of a training run (its log.jsonl) to a PNG.

    python scripts/plot_training.py runs/digits docs/images/digits_loss.png
    python scripts/plot_training.py runs/shapes_vae docs/images/shapes_vae_loss.png --ylabel "L1 sum + KL"
    python scripts/plot_training.py runs/shapes_curriculum_32 runs/shapes_curriculum_64 \
        runs/shapes_curriculum_anneal docs/images/shapes_curriculum_loss.png --ylabel "v-prediction MSE"

A resumed run appends to the same log, with its clock restarting at 0; the total time adds the
sessions up. Several runs are the stages of a curriculum (each started with `--init-from` the
one before): they are drawn one after the other, each in its own colour.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="run folder(s) holding log.jsonl, in order")
    parser.add_argument("out", type=Path, help="output PNG")
    parser.add_argument("--ylabel", default="eps-prediction MSE", help="what the loss is")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    total, points = 0.0, 0
    for i, run in enumerate(args.runs):
        log = run / "log.jsonl"
        if not log.is_file():
            parser.error(f"{run} holds no log.jsonl: expected the folder of an `unfog train` run")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        name = f"{run.name}: " if len(args.runs) > 1 else ""
        ax.plot(steps, [r["loss"] for r in rows], lw=0.6, alpha=0.3, color=f"C{2 * i}",
                label=f"{name}batch loss")
        ax.plot(steps, [r["loss_smooth"] for r in rows], lw=1.5, color=f"C{2 * i + 1}",
                label=f"{name}smoothed (EMA 0.98)")
        last = 0.0
        for r in rows:  # a resumed session restarts elapsed_s at 0
            total += r["elapsed_s"] - last if r["elapsed_s"] >= last else r["elapsed_s"]
            last = r["elapsed_s"]
        points += len(rows)
    ax.set_xlabel("step")
    ax.set_ylabel(args.ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(args.runs) > 1 else None)
    title = args.runs[0].name if len(args.runs) == 1 else f"{len(args.runs)} stages"
    text = f"{title}: {points} log points, {total / 60:.0f} min"
    ax.set_title(text, fontsize=10 if len(text) > 45 else None)  # a long run name stays inside the figure
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({points} log points, {total / 60:.0f} min of training)")


if __name__ == "__main__":
    main()
