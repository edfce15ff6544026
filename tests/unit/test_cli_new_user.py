"""Issue 22, "What a new user hit": each item as the exact command, its exit status and its message.

The commands run on the tiny random checkpoints of ``test_cli_generate`` (its fixtures and ``cli``
helper), the tiny digits model of ``test_cli_pipeline``, and the built-in shapes model where the
item is about it (one sampling step)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from unfog import __version__
from unfog.cli import DEFAULT_TEXT_MODEL, build_parser, default_model_path, finite_float, sampler_summary
from unfog.diffusion.registry import SAMPLERS
from unfog.models.tokenizer import CLIPTokenizer, SubVocabTokenizer
from unfog.pipelines.draw import check_size, prompt_words
from unfog.pipelines.images import read_parameters, save_png
from unfog.pipelines.latent_model import recommended_settings
from unfog.pipelines.outputs import SEED_MAX, Settings, parse_parameters
from unfog.pipelines.stable_diffusion import StableDiffusion

from test_cli_generate import FAST, cli, models, tiny_families_and_one_thread, workdir  # noqa: F401
from test_cli_pipeline import model_file  # noqa: F401


def one_line_error(capsys, args, message: str) -> str:
    """Run ``unfog ARGS``: exit status 2 and ``message`` in a one-line stderr, no traceback."""
    capsys.readouterr()
    assert cli(*args) == 2, args
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    return err


# ---------------------------------------------------------------- tracebacks -> one-line errors


def test_device_errors_name_the_devices_this_torch_has(models, workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, whatever the machine
    gen = ("generate", "a cat", "--model", models["sd1"], *FAST)
    err = one_line_error(capsys, (*gen, "--device", "cuda"), "argument --device: device 'cuda' is not available; "
                         f"this torch ({torch.__version__}")
    assert err.rstrip().endswith("has: cpu (see --help)")
    one_line_error(capsys, (*gen, "--device", "foo"), "device 'foo' is not a device name; this torch")
    one_line_error(capsys, ("train", "configs/digits.json", "--device", "cuda"), "device 'cuda' is not available")
    one_line_error(capsys, ("eval", "--out", workdir / "e", "--device", "foo"), "device 'foo' is not a device name")
    assert not (workdir / "outputs").exists()


@pytest.mark.parametrize("classes,message", [
    ("7-3", "argument --classes: classes '7-3' is a reversed range; write 3-7"),
    ("1,9-2", "classes '9-2' is a reversed range; write 2-9"),
    ("", "classes must look like 0-9 or 1,4,7; got ''"),
])
def test_sample_classes_reversed_or_empty(classes, message, model_file, workdir, capsys):
    one_line_error(capsys, ("sample", "--model", model_file, "--classes", classes), message)


# ---------------------------------------------------------------- silent wrong results


def float_options():
    """(command, option) for every float option of every command: each must use ``finite_float``."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = []
    for command, sub in commands.items():
        for action in sub._actions:
            assert action.type is not float, f"{command} {action.option_strings}: use finite_float"
            if action.type is finite_float:
                found.append((command, action.option_strings[-1]))
    return found


def test_every_float_option_refuses_nan_and_inf(capsys):
    options = float_options()
    assert {("generate", "--cfg-scale"), ("sample", "--cfg-scale"), ("sample", "--eta"), ("img2img", "--strength"),
            ("generate", "--refiner-start"), ("eval", "--cfg-scales")} <= set(options)
    for command, option in options:
        for value in ("nan", "inf", "-inf"):
            one_line_error(capsys, (command, f"{option}={value}"), f"argument {option}: {value!r} is not a finite "
                           "number")


def test_cfg_scale_nan_writes_nothing(models, model_file, workdir, capsys):
    one_line_error(capsys, ("generate", "a cat", "--model", models["sd1"], "--cfg-scale", "nan", *FAST),
                   "argument --cfg-scale: 'nan' is not a finite number")
    one_line_error(capsys, ("sample", "--model", model_file, "--cfg-scale", "inf"), "'inf' is not a finite number")
    assert not (workdir / "outputs").exists() and not (workdir / "samples.png").exists()


def test_sample_seed_minus_one_is_random_and_recorded(model_file, workdir, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        assert cli("sample", "--model", model_file, "--steps", 1, "--classes", 3, "--per-class", 1,
                   "--seed", -1, "--out", name) == 0
        seeds.append(int(re.search(r"Seed: (\d+)", read_parameters(workdir / name)).group(1)))
        assert f"seed {seeds[-1]})" in capsys.readouterr().out
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize("seed", [-2, SEED_MAX + 1])
def test_seed_out_of_range_in_sample_and_generate(seed, models, model_file, workdir, capsys):
    message = f"seed {seed} is out of range; valid: -1 (a random one) or 0..18446744073709551615"
    one_line_error(capsys, ("sample", "--model", model_file, "--seed", seed), message)
    one_line_error(capsys, ("generate", "a cat", "--model", models["sd1"], "--seed", seed, *FAST), message)
    assert not (workdir / "outputs").exists() and not (workdir / "samples.png").exists()


def test_a_batch_past_the_last_seed_fails_before_drawing(models, workdir, capsys):
    one_line_error(capsys, ("generate", "a cat", "--model", models["sd1"], "--seed", SEED_MAX, "--batch-size", 2,
                            *FAST),
                   f"seed {SEED_MAX} with 2 images runs past the largest seed, {SEED_MAX}: the last image would need "
                   f"seed {SEED_MAX + 1}; give a seed <= {SEED_MAX - 1}")
    assert not (workdir / "outputs").exists()
    assert cli("generate", "a cat", "--model", models["sd1"], "--seed", SEED_MAX, *FAST) == 0  # the last seed works


def test_sample_scale_zero(model_file, workdir, capsys):
    one_line_error(capsys, ("sample", "--model", model_file, "--scale", 0), "--scale must be >= 1, got 0")


def test_sizes_far_from_the_trained_one_are_warned_about(models, workdir, capsys):
    """The tiny SD 1 family's default (trained) size is 512: 16x16 is under half of it."""
    assert cli("generate", "a cat", "--model", models["sd1"], "--steps", 1, "--width", 16, "--height", 16,
               "--seed", 1) == 0
    err = capsys.readouterr().err
    assert ("unfog: warning: this model was trained at 512x512; 16x16 is under half of that, so expect a poor image\n"
            == err)
    pipe = StableDiffusion.load(models["sd1"])
    warnings = []
    check_size(pipe, 1024, 1024, warnings.append)  # 4 times the pixels: not "far"
    check_size(pipe, 4096, 2048, warnings.append)  # 32 times
    unet = pipe.unet.config
    gib = 2 * unet.model_channels * (4096 // 8) * (2048 // 8) * 4 * (unet.num_res_blocks + 3) / 2**30
    assert warnings == [f"this model was trained at 512x512; 4096x2048 has 32 times its pixels: each step takes at "
                        f"least 32 times as long as at 512x512 (attention grows faster), and the U-Net needs at least "
                        f"{gib:.1f} GiB of memory; the image is drawn anyway (Ctrl-C stops it)"]
    with pytest.raises(ValueError, match="width 4 is not a multiple of 8"):  # an error first, not a warning
        check_size(pipe, 4, 8, warnings.append)


def test_domain_warning_reads_the_words_after_the_prompt_syntax():
    tok = SubVocabTokenizer.from_texts(CLIPTokenizer.from_bpe_file(), ["a red circle above a blue square"])
    prompt = "(red circle:1.5) BREAK [blue square]"
    assert tok.unknown_words(prompt) != []  # the raw text: "(", ":", "1", "5", "break", ...
    assert prompt_words(prompt) == "red circle blue square" and tok.unknown_words(prompt_words(prompt)) == []
    assert tok.unknown_words(prompt_words("((a cat:1.2)) BREAK a red circle")) == ["cat"]


def test_domain_warning_on_the_built_in_model(workdir, capsys):
    assert cli("generate", "(red circle:1.5) BREAK [blue square]", "--steps", 1, "--seed", 0) == 0
    assert capsys.readouterr().err == ""
    assert cli("generate", "(a red cat:1.2)", "--steps", 1, "--seed", 0) == 0
    assert "outside this model's training domain: cat (never seen" in capsys.readouterr().err


def test_png_writes_are_atomic(workdir, monkeypatch):
    """A write stopped half-way leaves the old file (or none) and no temporary file."""
    good = save_png(Image.new("RGB", (8, 8), "red"), workdir / "a.png", "old")
    before = good.read_bytes()

    def half_then_killed(self, fp, *args, **kwargs):
        Path(fp).write_bytes(before[:10])
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(Image.Image, "save", half_then_killed)
    for path, overwrite in ((good, True), (workdir / "new.png", False)):
        with pytest.raises(KeyboardInterrupt):
            save_png(Image.new("RGB", (8, 8), "blue"), path, "new", overwrite=overwrite)
    assert good.read_bytes() == before and sorted(p.name for p in workdir.iterdir()) == ["a.png"]
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        save_png(Image.new("RGB", (8, 8), "blue"), good, "new")
    save_png(Image.new("RGB", (8, 8), "blue"), good, "new", overwrite=True)
    assert read_parameters(good) == "new" and sorted(p.name for p in workdir.iterdir()) == ["a.png"]


# ---------------------------------------------------------------- messages that mislead


def test_bad_model_files_and_folders_say_what_they_are_not(workdir, capsys):
    (workdir / "empty.safetensors").write_bytes(b"")
    (workdir / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    (workdir / "folder").mkdir()
    gen = ("generate", "a cat", "--steps", 1, "--model")
    one_line_error(capsys, (*gen, workdir / "empty.safetensors"), "empty.safetensors is empty (0 bytes); unfog "
                   "expected a model file (safetensors or torch.save)")
    one_line_error(capsys, (*gen, workdir / "random.safetensors"), "random.safetensors is not a safetensors file "
                   "(no JSON header after its first 8 bytes")
    one_line_error(capsys, (*gen, workdir / "folder"), "folder is a folder but not a diffusers model folder (it has "
                   "no model_index.json, no config.json of one component, no unet/, vae/, text_encoder/ ... "
                   "sub-folder); unfog expected a .safetensors / .ckpt file or a diffusers folder")


def test_info_on_a_folder(workdir, capsys):
    one_line_error(capsys, ("info", workdir), f"{workdir} is a folder; give a PNG file")


# ---------------------------------------------------------------- set-up and docs


def test_version(capsys):
    assert cli("--version") == 0
    assert capsys.readouterr().out == f"unfog {__version__}\n"


def test_samplers_print_whole_sentences(capsys):
    assert cli("samplers") == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, fn in SAMPLERS.items():
        paragraph = " ".join(fn.__doc__.strip().split("\n\n")[0].split())
        summary = sampler_summary(fn)
        assert f"{name} {summary}" in out and paragraph.startswith(summary) and summary[-1] in ".)", name
        assert len(summary) == len(paragraph) or paragraph[len(summary)] == " ", name  # cut between sentences


def test_sample_shows_a_progress_bar(model_file, workdir, monkeypatch):
    from unfog.pipelines import outputs

    steps = []
    real = outputs.StepProgress.callback
    monkeypatch.setattr(outputs.StepProgress, "callback", lambda self, info: (steps.append(self.total),
                                                                              real(self, info)))
    assert cli("sample", "--model", model_file, "--steps", 3, "--classes", 1, "--per-class", 1) == 0
    assert steps == [3, 3, 3]


def test_generate_help_shows_the_models_defaults(capsys):
    """The oracle: the built-in model file's recommended settings, and ``Settings``' defaults."""
    own, other = recommended_settings(default_model_path(DEFAULT_TEXT_MODEL)), Settings()
    assert (own["sampler"], own["cfg_scale"]) == ("euler_ancestral", 2.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (f"(default: 'Euler a' for the built-in model, else the model file's or '{other.sampler}')" in text
            and f"(default: {own['cfg_scale']:g} for the built-in model, else the model file's or "
                f"{other.cfg_scale:g})" in text
            and "else the model's: leading for the built-in model" in text)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "generate.md").read_text()
    assert "| `--sampler NAME` | the model's: Euler a for the built-in model, DPM++ 2M Karras for checkpoints |" in docs
    assert "| `--cfg-scale X` | the model's: 2 for the built-in model, 7 for checkpoints |" in docs
