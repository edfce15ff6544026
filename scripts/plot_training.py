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


def read_stages(runs: list[Path]) -> list[dict]:
    """Each run's logged steps, batch and smoothed losses, and minutes of training. A stage whose
    steps start again at 0 (``--init-from`` starts a new run at step 0) is shifted to begin where
    the stage before it ended, so the stages are drawn one after the other."""
    stages, end = [], 0
    for run in runs:
        log = run / "log.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"{run} holds no log.jsonl: expected the folder of an `unfog train` run")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{log} holds no logged steps yet")
        offset = end if rows[0]["step"] <= end else 0  # end is 0 before the first stage
        seconds, last = 0.0, 0.0
        for r in rows:  # a resumed session restarts elapsed_s at 0
            seconds += r["elapsed_s"] - last if r["elapsed_s"] >= last else r["elapsed_s"]
            last = r["elapsed_s"]
        steps = [r["step"] + offset for r in rows]
        stages.append({"name": run.name, "steps": steps, "loss": [r["loss"] for r in rows],
                       "smooth": [r["loss_smooth"] for r in rows], "minutes": seconds / 60})
        end = steps[-1]
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="run folder(s) holding log.jsonl, in order")
    parser.add_argument("out", type=Path, help="output PNG")
    parser.add_argument("--ylabel", default="eps-prediction MSE", help="what the loss is")
    args = parser.parse_args()
    try:
        stages = read_stages(args.runs)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    for i, stage in enumerate(stages):
        name = f"{stage['name']}: " if len(stages) > 1 else ""
        ax.plot(stage["steps"], stage["loss"], lw=0.6, alpha=0.3, color=f"C{2 * i}", label=f"{name}batch loss")
        ax.plot(stage["steps"], stage["smooth"], lw=1.5, color=f"C{2 * i + 1}",
                label=f"{name}smoothed (EMA 0.98)")
    total = sum(stage["minutes"] for stage in stages)
    points = sum(len(stage["steps"]) for stage in stages)
    ax.set_xlabel("step" if len(stages) == 1 else "step, the stages one after the other")
    ax.set_ylabel(args.ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(stages) > 1 else None)
    title = stages[0]["name"] if len(stages) == 1 else f"{len(stages)} stages"
    text = f"{title}: {points} log points, {total:.0f} min"
    ax.set_title(text, fontsize=10 if len(text) > 45 else None)  # a long run name stays inside the figure
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({points} log points, {total:.0f} min of training)")


if __name__ == "__main__":
    main()
