"""What an evaluation run writes: ``report.json`` (every figure and setting), ``report.md``
(Markdown tables), and two plots drawn with matplotlib's Agg backend:

- ``steps.png``: each metric against the number of steps, one line per sampler (and guidance
  scale, when there are several);
- ``guidance.png``: the guidance trade-off, FID against the CLIP score (or adherence when no
  CLIP score was measured) as the guidance scale moves, one curve per sampler and step count,
  each point labelled with its scale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (key, column title, how to read the value from a cell's metrics)
COLUMNS: list[tuple[str, str, Callable[[dict], float | None]]] = [
    ("fid", "FID", lambda m: m["fid"]),
    ("kid", "KID x 1000", lambda m: 1000 * m["kid"]["mean"]),
    ("clip", "CLIP score", lambda m: m["clip"]["mean"]),
    ("adherence", "adherence", lambda m: m["adherence"]["overall"]),
]


def value(row: dict, key: str) -> float | None:
    metrics = row["metrics"]
    if key not in metrics:
        return None
    return dict((k, f) for k, _, f in COLUMNS)[key](metrics)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _cell_text(row: dict, key: str) -> str:
    m = row["metrics"]
    if key == "kid" and "kid" in m:
        return f"{1000 * m['kid']['mean']:.2f} ± {1000 * m['kid']['std']:.2f}"
    if key == "clip" and "clip" in m:
        return _fmt(m["clip"]["mean"], 2)
    if key == "fid" and "fid" in m:
        return _fmt(m["fid"], 2)
    return _fmt(value(row, key))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any]) -> str:
    s, rows = report["settings"], report["cells"]
    keys = [k for k, _, _ in COLUMNS if k in s["metrics"]]
    titles = {k: t for k, t, _ in COLUMNS}
    model = report["model"]
    lines = [f"# unfog eval: {model['name']}", "",
             f"Model `{model['path']}` ({model['kind']}, hash {model['hash']}); {report['created']}; "
             f"unfog {report['unfog_version']}.", ""]
    f, ref = report["features"], report["reference"]
    if f is not None:
        lines.append(f"FID / KID features: **{f['name']}** ({f['dim']}-d, input {f['input_size']}x{f['input_size']}, "
                     f"resize '{f['resize']}': {f['resize_method']}). Reference: {ref['source']} "
                     f"({ref['count'] or 'unknown number of'} images).")
    if report["kid"]:
        k = report["kid"]
        lines.append(f"KID: mean ± std over {k['num_subsets']} subsets of up to {k['subset_size']} features, seed "
                     f"{k['seed']}.")
    if report["adherence_domain"]:
        lines.append(f"Adherence: the {report['adherence_domain']} domain; 'overall' is the mean over categories.")
    lines += ["", "## Results", ""]
    lines += _table(["cell", "sampler", "steps", "cfg", "images", *(titles[k] for k in keys)],
                    [[r["cell"], str(r["sampler"] or ""), str(r["steps"] or ""),
                      "" if r["cfg_scale"] is None else f"{r['cfg_scale']:g}", str(r["images"]),
                      *(_cell_text(r, k) for k in keys)] for r in rows])
    if "adherence" in keys:
        categories = list(dict.fromkeys(c for r in rows for c in r["metrics"]["adherence"]["per_category"]))
        lines += ["", "## Adherence per category", ""]
        lines += _table(["cell", *categories, "overall", "scored", "skipped"],
                        [[r["cell"], *(_fmt(r["metrics"]["adherence"]["per_category"].get(c)) for c in categories),
                          _fmt(r["metrics"]["adherence"]["overall"]), str(r["metrics"]["adherence"]["scored"]),
                          str(r["metrics"]["adherence"]["skipped"])] for r in rows])
    for title, items in (("Warnings", report["warnings"]), ("Notes", report["notes"])):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {item}" for item in items]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report["plots"].values() if name]
    settings = [[k, f"`{json.dumps(v)}`"] for k, v in s.items() if k != "prompts"]
    prompts = s.get("prompts") or []
    settings.append(["prompts", f"{len(prompts)} ({s.get('prompts_source') or 'from the images'})"])
    lines += ["", "## Settings", ""] + _table(["setting", "value"], settings)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _groups(rows: list[dict], by: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in by), []).append(r)
    return out


def plot_steps(rows: list[dict], keys: list[str], path: Path) -> bool:
    """One panel per metric, value against steps, one line per sampler (x cfg); False if nothing to draw."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r["steps"] is not None]
    keys = [k for k in keys if any(value(r, k) is not None for r in rows)]
    if not keys:
        return False
    titles = {k: t for k, t, _ in COLUMNS}
    several_cfg = len({r["cfg_scale"] for r in rows}) > 1
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for (sampler, cfg), group in sorted(_groups(rows, ("sampler", "cfg_scale")).items(), key=str):
            group = sorted((r for r in group if value(r, key) is not None), key=lambda r: r["steps"])
            label = f"{sampler}, cfg {cfg:g}" if several_cfg else sampler
            ax.plot([r["steps"] for r in group], [value(r, key) for r in group], marker="o", label=label)
        ax.set_xlabel("steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(titles[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_guidance(rows: list[dict], path: Path) -> str | None:
    """FID against CLIP score (else adherence) as cfg moves; returns the x metric, or None."""
    import matplotlib.pyplot as plt

    x_key = next((k for k in ("clip", "adherence") if any(value(r, k) is not None for r in rows)), None)
    rows = [r for r in rows if r["cfg_scale"] is not None and value(r, "fid") is not None]
    if x_key is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for (sampler, steps), group in sorted(_groups(rows, ("sampler", "steps")).items(), key=str):
        group = sorted((r for r in group if value(r, x_key) is not None), key=lambda r: r["cfg_scale"])
        xs, ys = [value(r, x_key) for r in group], [value(r, "fid") for r in group]
        ax.plot(xs, ys, marker="o", label=f"{sampler}, {steps} steps")
        for r, x, y in zip(group, xs, ys):
            ax.annotate(f"cfg {r['cfg_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel({"clip": "CLIP score", "adherence": "adherence (overall)"}[x_key])
    ax.set_ylabel("FID")
    ax.set_title("guidance trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return x_key


def _plots(out: Path, report: dict, warn: Callable[[str], None]) -> dict[str, str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        message = ("matplotlib is not installed, so no plots were drawn: from a checkout, "
                   "`.venv/bin/pip install -e '.[eval]'` (`make demo` installs it; unfog is not on PyPI)")
        report["warnings"].append(message)
        warn(message)
        return {}
    keys = [k for k, _, _ in COLUMNS if k in report["settings"]["metrics"]]
    plots = {"steps": "steps.png" if plot_steps(report["cells"], keys, out / "steps.png") else None}
    x_key = plot_guidance(report["cells"], out / "guidance.png")
    plots["guidance"] = "guidance.png" if x_key else None
    if x_key is None:
        report["notes"].append("no guidance plot: it needs fid and clip or adherence, on generated cells")
    return plots


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_report(out: Path, report: dict[str, Any], warn: Callable[[str], None]) -> None:
    """Plots first (their names go into the report), then report.json and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(out, report, warn)
    _write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _write_text(out / "report.md", markdown(report))
