"""scripts/plot_training.py: the stages of a run started with --init-from are drawn one after
the other, and the time adds up across resumed sessions."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_training.py"


def _script():
    spec = importlib.util.spec_from_file_location("plot_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, name: str, steps: list[int], elapsed: list[float]) -> Path:
    run = tmp_path / name
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / (s + 1), "loss_smooth": 1.0 / (s + 2), "elapsed_s": e}
            for s, e in zip(steps, elapsed)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_stage_that_starts_again_at_step_0_is_drawn_after_the_one_before(tmp_path):
    first = _run(tmp_path, "a", [20, 40, 60], [10, 20, 30])
    second = _run(tmp_path, "b", [20, 40], [12, 24])  # --init-from: a new run, from step 0
    a, b = _script().read_stages([first, second])
    assert a["steps"] == [20, 40, 60]
    assert b["steps"] == [80, 100]
    assert b["loss"] == [1.0 / 21, 1.0 / 41]  # the values are not shifted, only the steps
    assert a["minutes"] + b["minutes"] == pytest.approx((30 + 24) / 60)


def test_a_stage_that_goes_on_counting_is_not_shifted(tmp_path):
    first = _run(tmp_path, "a", [20, 40], [10, 20])
    second = _run(tmp_path, "b", [60, 80], [10, 20])
    assert _script().read_stages([first, second])[1]["steps"] == [60, 80]


def test_a_resumed_session_adds_its_time(tmp_path):
    run = _run(tmp_path, "a", [20, 40, 60, 80], [10, 20, 5, 15])  # the clock restarts at the resume
    assert _script().read_stages([run])[0]["minutes"] == pytest.approx((20 + 15) / 60)


def test_the_plot_is_written_and_a_folder_without_a_log_is_refused(tmp_path):
    first = _run(tmp_path, "a", [20, 40], [10, 20])
    second = _run(tmp_path, "b", [20, 40], [10, 20])
    out = tmp_path / "loss.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(first), str(second), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 log points, 1 min" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nothing"), str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "holds no log.jsonl" in bad.stderr
