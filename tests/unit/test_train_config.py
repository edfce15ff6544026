"""The training config: shared fields plus one typed section per task, the registry of tasks,
the type check of every value, and configs and saved states of the older, flat form."""

import dataclasses
import json

import pytest
import torch

from unfog.training import PixelTrainer, load_config, make_trainer, train
from unfog.training.base import BaseTrainer
from unfog.training.config import SHARED_KEYS, TASKS, TrainConfig, config_differences, config_from_dict, get_task
from unfog.training.sections import AutoencoderOptions, TaskOptions, Text2ImageOptions
from unfog.training.state import list_states, load_state, save_state

# What the code before the sections wrote as "config" in states and "train_config" in model files
# for configs/digits.json and configs/shapes.json: every key of every task, flat (copied from a run
# of that code, commit 305c79a).
OLD_FLAT_DIGITS = {
    "task": "pixel", "data": "digits", "image_size": 16, "data_size": 50000, "center_crop": True, "data_workers": 0,
    "shapes_options": {}, "buckets": False, "bucket_step": 64, "vae_overrides": {}, "kl_weight": 1e-06,
    "disc_weight": 0.0, "disc_start": 0, "vae_model": None, "text_encoder": {}, "train_text_encoder": True,
    "size_conditioning": False, "model_dtype": "fp32", "model": "DIGITS", "model_overrides": {}, "schedule": "linear",
    "num_timesteps": 1000, "zero_terminal_snr": False, "prediction": "eps", "min_snr_gamma": None,
    "offset_noise": 0.0, "timestep_bias": "none", "timestep_bias_multiplier": 1.0, "timestep_bias_portion": 0.25,
    "cond_dropout": 0.1, "steps": 2500, "batch_size": 128, "lr": 0.0005, "lr_schedule": "cosine",
    "warmup_steps": 200, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.999, "precision": "bf16", "seed": 0,
    "out_dir": "runs/digits", "log_every": 50, "sample_every": 1000, "save_every": 500, "keep_last": 3,
    "sample_sampler": "dpmpp_2m", "sample_steps": 20, "sample_cfg_scale": 2.0}
OLD_FLAT_SHAPES = {
    **OLD_FLAT_DIGITS, "task": "text2image", "data": "shapes", "image_size": 64, "data_size": 200000,
    "vae_model": "runs/shapes_vae/model.safetensors", "text_encoder": {"width": 128, "layers": 3, "heads": 4},
    "model_dtype": "fp16", "model": "SHAPES", "schedule": "scaled_linear", "prediction": "v", "min_snr_gamma": 5.0,
    "steps": 2000, "batch_size": 64, "warmup_steps": 100, "ema_decay": 0.998, "out_dir": "runs/shapes",
    "log_every": 10, "sample_every": 500, "save_every": 250, "sample_cfg_scale": 4.0}
TINY = ["image_size=8", "batch_size=6", "model_overrides={\"model_channels\": 32, \"channel_mult\": [1, 2], "
        "\"num_res_blocks\": 1, \"transformer_depth\": [0, 1]}", "warmup_steps=2", "sample_steps=2", "log_every=1",
        "precision=fp32", "save_every=1", "sample_every=100"]


def write(tmp_path, values, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


# ---- the registry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_frozen_section_and_a_trainer(name):
    task = TASKS[name]
    assert issubclass(task.options, TaskOptions) and task.options.__dataclass_params__.frozen
    assert issubclass(task.load_trainer(), BaseTrainer)
    keys = {f.name for f in dataclasses.fields(task.options)}
    # older flat configs move a key into its section by name: no key may be a shared one; a key of
    # two sections (the fine-tuning tasks' base_model, ...) moves into the config's own task's
    assert not keys & set(SHARED_KEYS) and name not in SHARED_KEYS


def test_a_key_of_two_fine_tuning_sections_moves_into_the_configs_own():
    for task, extra in (("lora", {}), ("textual_inversion", {"name": "<x>"}), ("hypernetwork", {})):
        flat = {"task": task, "data": "shapes", "base_model": "m.safetensors", "cache_latents": "memory", **extra}
        options = config_from_dict(flat).options
        assert (options.base_model, options.cache_latents) == ("m.safetensors", "memory")


def test_unknown_task_lists_the_tasks_and_a_trainer_refuses_another_tasks_config(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown task 'nope'; valid choices: pixel, autoencoder, text2image, lora, "
                                     r"textual_inversion, hypernetwork, controlnet$"):
        get_task("nope")
    config = load_config(None, ["task=autoencoder", "data=shapes"])
    with pytest.raises(ValueError, match="PixelTrainer cannot train task 'autoencoder', whose trainer is "
                                         "AutoencoderTrainer"):
        PixelTrainer(config)
    with pytest.raises(ValueError, match="the options of task 'autoencoder' were given to a config of task 'pixel'"):
        TrainConfig(options=AutoencoderOptions())


# ---- sections and overrides ---------------------------------------------------------------------------------


def test_a_section_holds_its_tasks_keys_and_dotted_overrides_reach_it(tmp_path):
    path = write(tmp_path, {"task": "text2image", "data": "shapes", "text2image": {"vae_model": "a.safetensors"}})
    c = load_config(path, ["text2image.size_conditioning=true", "text2image.text_encoder.width=64", "lr=1e-3"])
    assert c.options == Text2ImageOptions(vae_model="a.safetensors", size_conditioning=True,
                                          text_encoder={"width": 64})
    assert c.lr == 1e-3
    saved = c.to_dict()
    assert saved["text2image"]["vae_model"] == "a.safetensors" and "vae_model" not in saved and "options" not in saved
    assert config_from_dict(json.loads(json.dumps(saved))) == c  # config.json reads back
    # an old, flat override still names the section's key, and wins over the file's
    assert load_config(path, ["vae_model=b.safetensors"]).options.vae_model == "b.safetensors"
    assert load_config(None, ["model_overrides.dropout=0.1", "out_dir=2024"]).model_overrides == {"dropout": 0.1}
    assert load_config(None, ["out_dir=2024"]).out_dir == "2024"  # a string field keeps the text


def test_a_section_of_another_task_or_an_unknown_section_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"^config key autoencoder is the section of task 'autoencoder', not of this "
                                         r"config's task 'pixel' \(task=autoencoder trains that task\)$"):
        load_config(write(tmp_path, {"autoencoder": {"kl_weight": 1.0}}))
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) autoencoder.kl; valid keys of section "
                                         r"autoencoder: vae_overrides, kl_weight, disc_weight, disc_start, train_encoder$"):
        load_config(None, ["task=autoencoder", "data=shapes", "autoencoder.kl=1"])
    with pytest.raises(ValueError, match=r"^kl_weight is an option of task 'autoencoder' \(config key "
                                         r"autoencoder.kl_weight\), not of task 'pixel'$"):
        load_config(None, ["kl_weight=0.5"])
    with pytest.raises(ValueError, match=r"^config key text2image: expected a JSON object \(the options of task "
                                         r"'text2image'\), got 3$"):
        load_config(write(tmp_path, {"task": "text2image", "text2image": 3}))
    with pytest.raises(ValueError, match=r"^vae_model is given twice: at top level \(its place in older configs\) "
                                         r"and as text2image.vae_model; keep text2image.vae_model$"):
        load_config(write(tmp_path, {"task": "text2image", "data": "shapes", "vae_model": "a",
                                     "text2image": {"vae_model": "b"}}))
    with pytest.raises(ValueError, match=r"^autoencoder.vae_overrides: .*'width'.*; valid keys: in_channels"):
        load_config(None, ["task=autoencoder", "data=shapes", 'autoencoder.vae_overrides={"width": 3}'])
    with pytest.raises(ValueError, match=r"^text2image.text_encoder: .*'depth'.*; valid keys: vocab_size"):
        load_config(None, ["task=text2image", "data=shapes", "vae_model=a", 'text2image.text_encoder={"depth": 3}'])
    with pytest.raises(ValueError, match=r"^override 'lr.x=1': config key lr holds 0.0005, not keys$"):
        load_config("configs/digits.json", ["lr.x=1"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(None, ["text2image.=1"])


# ---- types --------------------------------------------------------------------------------------------------


def test_values_of_the_wrong_type_are_one_line_errors_naming_key_value_and_type(tmp_path):
    with pytest.raises(ValueError, match=r"^.*c.json: expected a JSON object of config keys, got a list$"):
        load_config(write(tmp_path, [1, 2, 3]))
    with pytest.raises(ValueError, match=r"^config key batch_size: expected an integer, got 'lots'$"):
        load_config(write(tmp_path, {"batch_size": "lots"}))
    with pytest.raises(ValueError, match=r"^config key steps: expected an integer, got 'abc'$"):
        load_config(None, ["steps=abc"])
    with pytest.raises(ValueError, match=r"^config key steps: expected an integer, got True$"):
        load_config(None, ["steps=true"])  # a bool is not an integer
    with pytest.raises(ValueError, match=r"^config key lr: expected a number, got None$"):
        load_config(None, ["lr=null"])  # None only where the field is optional
    with pytest.raises(ValueError, match=r"^config key model_overrides: expected a JSON object, got \[1\]$"):
        load_config(None, ["model_overrides=[1]"])
    with pytest.raises(ValueError, match=r"^config key autoencoder.kl_weight: expected a number, got 'big'$"):
        load_config(None, ["task=autoencoder", "data=shapes", "autoencoder.kl_weight=big"])
    with pytest.raises(ValueError, match=r"^config key text2image.buckets: expected true or false, got 1$"):
        load_config(write(tmp_path, {"task": "text2image", "data": "shapes", "vae_model": "a", "buckets": 1}))
    with pytest.raises(ValueError, match=r"^config key task: expected a string, got 3$"):
        config_from_dict({"task": 3})
    c = load_config(None, ["lr=1", "min_snr_gamma=5", "min_snr_gamma=null"])  # an int is a number
    assert (c.lr, c.min_snr_gamma) == (1, None)


def test_the_cli_prints_a_type_error_as_one_line_and_exits_2(tmp_path, capsys):
    from unfog.cli import main

    for args, message in (([str(write(tmp_path, [1, 2, 3]))], "expected a JSON object of config keys, got a list"),
                          (["configs/digits.json", "steps=abc"], "config key steps: expected an integer, got 'abc'")):
        assert main(["train", *args, f"out_dir={tmp_path / 'r'}"]) == 2
        err = capsys.readouterr().err
        assert err == f"unfog: error: {err.split('error: ')[1]}" and err.count("\n") == 1 and message in err


# ---- older, flat configs and saved states --------------------------------------------------------------------


def test_old_flat_configs_load_into_sections(tmp_path):
    digits, shapes = load_config(write(tmp_path, OLD_FLAT_DIGITS)), load_config(write(tmp_path, OLD_FLAT_SHAPES))
    # The committed digits config has since changed its grid's sampler (issue 22's fix of blank samples).
    assert digits == load_config("configs/digits.json", ["sample_sampler=dpmpp_2m"])
    assert shapes == load_config("configs/shapes.json")
    assert shapes.options == Text2ImageOptions(vae_model="runs/shapes_vae/model.safetensors", model_dtype="fp16",
                                               text_encoder={"width": 128, "layers": 3, "heads": 4})
    flat_vae = {"task": "autoencoder", "data": "shapes", "kl_weight": 1e-4, "disc_start": 5, "buckets": False}
    assert load_config(write(tmp_path, flat_vae)).options == AutoencoderOptions(kl_weight=1e-4, disc_start=5)
    assert config_differences(OLD_FLAT_DIGITS, load_config("configs/digits.json").to_dict()) == []
    assert config_differences(OLD_FLAT_SHAPES, load_config("configs/shapes.json").to_dict()) == []
    changed = load_config("configs/shapes.json", ["text2image.vae_model=b", "text2image.model_dtype=fp32"])
    assert config_differences(OLD_FLAT_SHAPES, changed.to_dict()) == [  # model_dtype is a resumable change
        "text2image.vae_model: 'runs/shapes_vae/model.safetensors' -> 'b'"]


@pytest.mark.slow
def test_a_state_saved_with_an_old_flat_config_resumes_and_starts_a_new_run(tmp_path):
    """A state of the code before the sections holds its config flat, every task's keys included:
    --resume takes it as the same config (no --force), and --init-from lists the real changes."""
    run = tmp_path / "run"
    config = load_config("configs/digits.json", TINY + [f"out_dir={run}", "steps=2"])
    train(config, progress=False)
    path = list_states(run / "states")[-1]
    state = load_state(path)
    state["config"] = {**OLD_FLAT_DIGITS, **{k: v for k, v in config.to_dict().items() if k != "pixel"}}
    save_state(run / "states", state["step"], state, keep=3)
    train(load_config("configs/digits.json", TINY + [f"out_dir={run}", "steps=3"]), resume=True, progress=False)
    assert [json.loads(line)["changes"] for line in (run / "resumes.jsonl").read_text().splitlines()] \
        == [["steps: 2 -> 3"]]
    with pytest.raises(ValueError, match="lr: 0.0005 -> 0.001"):
        train(load_config("configs/digits.json", TINY + [f"out_dir={run}", "steps=4", "lr=0.001"]), resume=True,
              progress=False)
    second = tmp_path / "second"
    train(load_config("configs/digits.json", TINY + [f"out_dir={second}", "steps=3"]), init_from=path, progress=False)
    history = json.loads((second / "resumes.jsonl").read_text())
    assert history["changes"] == [f"started from {path}", f"out_dir: '{run}' -> '{second}'", "steps: 2 -> 3"]
    a, b = (load_state(list_states(folder / "states")[-1])["model"] for folder in (second, run))
    assert all(torch.equal(a[k], b[k]) for k in b)  # the same step 3 as the resumed run


def test_make_trainer_builds_the_registered_trainer():
    trainer = make_trainer(load_config("configs/digits.json", TINY + ["steps=1"]))
    assert type(trainer) is TASKS["pixel"].load_trainer() and trainer.options == TASKS["pixel"].options()


def test_each_section_names_its_own_task():
    """A section's config key (``TaskOptions.section``) is the name it is registered under, so its
    errors and the JSON key agree with the registry."""
    assert {name: task.options.section for name, task in TASKS.items()} == {name: name for name in TASKS}
