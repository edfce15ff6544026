"""Training: batch order, config handling, exact resume, state files."""

import json
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from unfog.training import PixelTrainer, load_config, train
from unfog.training.config import config_differences
from unfog.training.data import EpochBatches
from unfog.training.state import list_states, save_state

TINY = ["image_size=8", "batch_size=6", "model_overrides={\"model_channels\": 32, \"channel_mult\": [1, 2], "
        "\"num_res_blocks\": 1, \"transformer_depth\": [0, 1], \"dropout\": 0.1}", "warmup_steps=2",
        "sample_steps=2", "log_every=1", "precision=fp32"]


def tiny_config(tmp_path, *extra):
    return load_config("configs/digits.json", TINY + [f"out_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("n,batch", [(10, 4), (10, 10), (7, 16), (1438, 128)])
def test_epoch_batches_cover_each_epoch_once(n, batch):
    b = EpochBatches(n, batch, seed=3)
    draws = torch.cat([b.next() for _ in range(6)])
    assert all(len(x) == batch for x in [b.next()])  # every batch has exactly batch_size indices
    for e in range(len(draws) // n):
        assert sorted(draws[e * n : (e + 1) * n].tolist()) == list(range(n))


def test_epoch_batches_resume_replays_order():
    a = EpochBatches(13, 5, seed=1)
    for _ in range(4):
        a.next()
    b = EpochBatches(13, 5, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next(), b.next()) for _ in range(5))


def test_unknown_key_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*valid keys: task, data, image_size"):
        load_config("configs/digits.json", ["learning_rate=1"])
    with pytest.raises(ValueError, match="valid choices: eps, v, x0"):
        load_config("configs/digits.json", ["prediction=epsilon"])
    with pytest.raises(ValueError, match="unknown sampler"):
        load_config("configs/digits.json", ["sample_sampler=fast"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("configs/digits.json", ["steps"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_overrides_parse_json_or_strings():
    c = load_config(None, ["steps=12", "min_snr_gamma=5.0", "zero_terminal_snr=true", "out_dir=runs/x"])
    assert (c.steps, c.min_snr_gamma, c.zero_terminal_snr, c.out_dir) == (12, 5.0, True, "runs/x")


def test_resume_is_bit_identical(tmp_path):
    """Train 4 steps straight, and 2 + (restart from the saved state) 2: same weights, EMA, RNG."""
    straight = PixelTrainer(tiny_config(tmp_path, "steps=4"))
    for _ in range(4):
        straight.train_step()

    first = PixelTrainer(tiny_config(tmp_path, "steps=4"))
    for _ in range(2):
        first.train_step()
    path = save_state(tmp_path / "states", first.step, first.state_dict(), keep=2)
    torch.manual_seed(12345)  # disturb the global RNG: the state must restore it
    second = PixelTrainer(tiny_config(tmp_path, "steps=4"))
    second.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(2):
        second.train_step()
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.state_dict().values(), second.ema.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_another_learning_rate_uses_it_from_the_first_step(tmp_path):
    """The scheduler's saved state holds the run's first lr; a (forced) resume with another lr,
    schedule or length must train with the new one, not silently keep the old."""
    from unfog.training.base import lr_factor

    first = PixelTrainer(tiny_config(tmp_path, "steps=6"))
    for _ in range(3):
        first.train_step()
    state = first.state_dict()
    changed = tiny_config(tmp_path, "steps=10", "lr=0.002")
    second = PixelTrainer(changed)
    second.load_state_dict(state)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * lr_factor(3, changed), rel=1e-12)
    assert second.lr_sched.get_last_lr() == [second.optimizer.param_groups[0]["lr"]]
    second.train_step()
    assert second.lr_sched.get_last_lr()[0] == pytest.approx(0.002 * lr_factor(4, changed), rel=1e-12)
    assert lr_factor(3, changed) > 0.5  # a real cosine value, not the end of the schedule


def test_train_writes_model_samples_states_and_refuses_to_clobber(tmp_path, capsys):
    config = tiny_config(tmp_path, "steps=3", "save_every=1", "sample_every=3", "keep_last=2")
    model = train(config, progress=False)
    run = tmp_path / "run"
    assert model.is_file() and (run / "samples" / "step_00000003.png").is_file()
    assert [p.name for p in list_states(run / "states")] == ["state_00000002.pt", "state_00000003.pt"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "config.json").read_text())["steps"] == 3
    assert not list((run / "states").glob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(config, progress=False)
    with pytest.raises(ValueError, match="lr: 0.0005 -> 0.001"):
        train(tiny_config(tmp_path, "steps=4", "lr=0.001"), resume=True, progress=False)
    train(tiny_config(tmp_path, "steps=4", "save_every=1", "sample_every=3"), resume=True, progress=False)
    assert list_states(run / "states")[-1].name == "state_00000004.pt"
    assert [json.loads(line)["changes"] for line in (run / "resumes.jsonl").read_text().splitlines()] \
        == [["keep_last: 2 -> 3", "steps: 3 -> 4"]]  # config.json is rewritten; the history of changes is kept
    changed = tiny_config(tmp_path, "steps=5", "save_every=1", "sample_every=3", "lr=0.001")
    train(changed, resume=True, force=True, progress=False)
    assert "resuming with a changed config (--force): lr: 0.0005 -> 0.001" in capsys.readouterr().err
    assert json.loads((run / "resumes.jsonl").read_text().splitlines()[-1]) \
        == {"step": 4, "time": ANY, "changes": ["lr: 0.0005 -> 0.001", "steps: 4 -> 5"]}
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001


def test_config_differences_ignores_cadence():
    assert config_differences({"steps": 1, "lr": 1.0, "save_every": 5}, {"steps": 9, "lr": 2.0, "save_every": 7}) \
        == ["lr: 1.0 -> 2.0"]


def test_train_on_an_image_folder_unconditional(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(5):
        arr = (torch.rand(12, 10, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    model = train(tiny_config(tmp_path, "steps=2", f"data={folder}", "sample_every=2", "sample_sampler=euler",
                              "sample_cfg_scale=1.5"), progress=False)
    from unfog.pipelines import PixelDiffusion

    pipe = PixelDiffusion.load(model)
    assert pipe.info.num_classes is None and pipe.unet.config.num_classes is None
    # the model recommends the settings its training grids were drawn with (`unfog sample`'s defaults)
    assert pipe.defaults == {"sampler": "euler", "steps": 2, "cfg_scale": 1.5}
    assert pipe.generate(num_images=2, steps=2).shape == (2, 3, 8, 8)


def test_empty_data_folder_is_a_one_line_error(tmp_path, capsys):
    from unfog.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["train", "configs/digits.json", f"data={tmp_path / 'empty'}", f"out_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err and err.count("\n") == 1
    code = main(["train", "configs/digits.json", f"data={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'r'}"])
    assert code == 2 and "neither 'digits' nor an existing folder" in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_another_runs_state(tmp_path, capsys):
    """A curriculum stage: the new run continues the first run's trajectory exactly (weights, EMA,
    optimizer, RNG streams, step) under its own config, and records where it came from and what
    changed; the first run is left as it was."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    base = TINY + ["save_every=1", "sample_every=100"]
    train(load_config("configs/digits.json", base + [f"out_dir={first_dir}", "steps=2"]), progress=False)
    first_states = [p.read_bytes() for p in list_states(first_dir / "states")]

    # the oracle: the same first run resumed in place with the new config (--resume --force)
    oracle_dir = tmp_path / "oracle"
    train(load_config("configs/digits.json", base + [f"out_dir={oracle_dir}", "steps=2"]), progress=False)
    changed = ["steps=4", "lr=0.001"]
    train(load_config("configs/digits.json", base + [f"out_dir={oracle_dir}", *changed]), resume=True, force=True,
          progress=False)

    second = load_config("configs/digits.json", base + [f"out_dir={second_dir}", *changed])
    with pytest.raises(ValueError, match="pass one of them"):
        train(second, resume=True, init_from=first_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="no training state to start from in .*missing"):
        train(second, init_from=tmp_path / "missing", progress=False)
    train(second, init_from=first_dir, progress=False)
    assert "starting from" in capsys.readouterr().err
    a = torch.load(list_states(second_dir / "states")[-1], weights_only=True)
    b = torch.load(list_states(oracle_dir / "states")[-1], weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["ema"]["decay"], a["ema"]["num_updates"]) == (b["ema"]["decay"], b["ema"]["num_updates"])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["model"].values(), b["ema"]["model"].values()))
    history = json.loads((second_dir / "resumes.jsonl").read_text())
    assert history["step"] == 2 and history["changes"][0] == f"started from {first_dir / 'states' / 'state_00000002.pt'}"
    assert history["changes"][1:] == ["lr: 0.0005 -> 0.001", f"out_dir: '{first_dir}' -> '{second_dir}'", "steps: 2 -> 4"]
    assert [p.read_bytes() for p in list_states(first_dir / "states")] == first_states  # untouched
    with pytest.raises(ValueError, match="this run's own state; use --resume"):
        train(second, overwrite=True, init_from=second_dir, progress=False)


@pytest.mark.parametrize("path", sorted(p.name for p in Path("configs").glob("*.json")))
def test_every_committed_config_is_valid(path):
    """A committed config with a misspelt key or a bad value would fail only hours into a run."""
    config = load_config(f"configs/{path}")
    assert config.out_dir.startswith("runs/") and config.steps > 0


def test_the_curriculum_stages_change_only_what_they_say():
    """configs/shapes_curriculum_*.json are run in a chain with --init-from (docs/training.md): the
    32 px position stage, the 64 px mixture, the anneal, round 2, and round 3 (started from round
    2's model file, so its steps count from 0). Each stage differs from the one before in exactly
    these fields; the step counts follow on."""
    names = ("32", "64", "anneal", "round2", "round3_large_batch")
    stages = [load_config(f"configs/shapes_curriculum_{name}.json").to_dict() for name in names]
    same = ("out_dir", "steps", "sample_every")  # where a stage writes, how long it runs, how often it samples
    assert set(config_differences(stages[0], stages[1], ignore=same)) == {
        "image_size: 32 -> 64", "ema_decay: 0.99 -> 0.995",
        "shapes_options: {'categories': ['position'], 'relation_word': 1.0, 'color_word': 1.0, 'frame': 0.0, "
        "'size_word': 0.0, 'textured_fraction': 0.0} -> {'weights': [1, 2, 1, 1, 4, 1]}",
        "sample_cfg_scale: 4.0 -> 2.0"}
    assert stages[0]["steps"] < stages[1]["steps"] < stages[2]["steps"]
    assert set(config_differences(stages[1], stages[2], ignore=same)) == {
        "lr_schedule: 'constant' -> 'cosine'",
        "shapes_options: {'weights': [1, 2, 1, 1, 4, 1]} -> {'weights': [1, 2, 1, 1, 4, 1], 'color_word': 0.5}"}
    assert stages[2]["steps"] < stages[3]["steps"]
    assert set(config_differences(stages[2], stages[3], ignore=same)) == {
        "sample_sampler: 'dpmpp_2m' -> 'euler_ancestral'",
        "shapes_options: {'weights': [1, 2, 1, 1, 4, 1], 'color_word': 0.5} -> {'weights': [1, 3, 1, 1, 3, 1], "
        "'color_word': 0.5}"}
    assert set(config_differences(stages[3], stages[4], ignore=same)) == {
        "batch_size: 64 -> 256", "lr: 0.0005 -> 0.0002", "warmup_steps: 100 -> 300", "ema_decay: 0.995 -> 0.999",
        "min_snr_gamma: None -> 5.0", "save_every: 250 -> 500",
        "shapes_options: {'weights': [1, 3, 1, 1, 3, 1], 'color_word': 0.5} -> {'weights': [1, 4, 1, 1, 3, 1], "
        "'color_word': 0.5}"}
