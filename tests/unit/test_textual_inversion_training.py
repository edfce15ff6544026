"""Task "textual_inversion" on the embedded shapes model (trained here at 32 px so the steps are
cheap): only the vectors train and every weight of the model stays bit for bit as loaded; the
vectors start as A1111 spreads the initialization words; each saved format, loaded back by
``pipe.load_embedding`` (and the .pt by ``torch.load(weights_only=True)``), conditions exactly
as the trainer's EMA network; the loss falls when overfitting; resume is bit-identical and a
changed config is refused; bad options are one-line errors."""

from pathlib import Path

import pytest
import torch

import unfog
from unfog.conditioning import encode_prompt
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.training import load_config, make_trainer, train
from training_checks import last_state_tensors, overfit_loss_ratio

NAME = "<sks>"
BASE = ["task=textual_inversion", "data=shapes", "image_size=32", "data_size=8", "batch_size=2", "precision=fp32",
        "warmup_steps=0", "lr=0.02", "log_every=1", "sample_every=1000", "sample_steps=2",
        f"textual_inversion.name={NAME}", "textual_inversion.init_words=a square", "textual_inversion.num_vectors=3"]
PROMPTS = [f"a picture of {NAME}", f"a red circle and {NAME}", "a blue square"]


def ti_config(out, *extra):
    return load_config(None, [*BASE, f"out_dir={out}", *extra])


def model_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def test_only_the_vectors_train_and_every_weight_stays_bit_for_bit(tmp_path):
    trainer = make_trainer(ti_config(tmp_path), "cpu")
    pipe = trainer.pipe
    before = model_tensors(pipe)
    table = pipe.text_encoder.embeddings.token_embedding.weight
    ids = pipe.tokenizer.encode("a square")  # A1111: vector i is token i * k // n of the k = 2 tokens
    assert len(ids) == 2
    torch.testing.assert_close(trainer.net.vectors[0], table[[ids[0], ids[0], ids[1]]], rtol=0, atol=0)
    assert list(trainer.net.state_dict()) == ["vectors.0"]
    assert {id(p) for p in trainer.params} == {id(trainer.net.vectors[0])}
    assert len(trainer.ema.model.state_dict()) == 1  # the EMA holds the vectors, not the model
    start = trainer.net.vectors[0].detach().clone()
    for _ in range(3):
        trainer.train_step()
    assert (trainer.net.vectors[0] - start).abs().max() > 1e-4
    after = model_tensors(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for name in ("unet", "vae", "text_encoder")
                   for p in getattr(pipe, name).parameters())


def test_saved_files_loaded_with_load_embedding_reproduce_the_trainers_conditioning(tmp_path):
    """Oracle: the conditioning and U-Net output of the trainer's own EMA network, against a fresh
    pipeline that loads each written file (emb_params .safetensors, A1111 .pt, diffusers'
    learned_embeds) by ``load_embedding``: equal bit for bit (the same float32 vectors)."""
    config = ti_config(tmp_path, "ema_decay=0.5", "textual_inversion.save_pt=true",
                       "textual_inversion.save_diffusers=true")
    trainer = make_trainer(config, "cpu")
    for _ in range(2):
        trainer.train_step()
    trainer.save_model()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([100.0, 500.0, 900.0])
    files = {tmp_path / f"{NAME}.safetensors": None, tmp_path / f"{NAME}.pt": None,
             tmp_path / "learned_embeds.safetensors": NAME}
    with torch.no_grad():
        ours = trainer.ema.model(x, t, PROMPTS)
        pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
        plain = pipe.unet(x, t, encode_prompt("sd1", [pipe.text_encoder], pipe.tokenizer, PROMPTS).context)
        assert (ours[:2] - plain[:2]).abs().max() > 1e-3 and torch.equal(ours[2], plain[2])  # only where it's called
        for path, name in files.items():
            pipe.unload_embeddings()
            e = pipe.load_embedding(path, name=name)
            assert e.name == NAME and torch.equal(e.vectors[0], trainer.ema.model.vectors[0])
            c = encode_prompt("sd1", [pipe.text_encoder], pipe.tokenizer, PROMPTS, embeddings=pipe.embeddings)
            assert torch.equal(pipe.unet(x, t, c.context), ours)
    e = pipe.load_embedding(tmp_path / f"{NAME}.safetensors")
    assert (e.step, e.checkpoint_name) == (2, "shapes") and len(e.checkpoint) == 10
    pt = torch.load(tmp_path / f"{NAME}.pt", weights_only=True)
    assert pt["string_to_token"] == {"*": 265} and pt["name"] == NAME and pt["step"] == 2
    assert torch.equal(pt["string_to_param"]["*"], trainer.ema.model.vectors[0])
    with pytest.raises(FileExistsError, match=r"is not from a training run.*textual_inversion\.name"):
        make_trainer(ti_config(tmp_path), "cpu")  # an embedding file without a run beside it


@pytest.mark.slow  # 30 steps: about 20 s on a busy 2-core machine
def test_loss_falls_when_overfitting_two_images(tmp_path):
    """Three 128-wide vectors can explain far less of the noise than a LoRA: the loss on fixed
    noise falls by 9.5% here (measured; 10% at 2x the lr), and 5% is required."""
    trainer = make_trainer(ti_config(tmp_path, "data_size=2", "lr=0.1"), "cpu")
    assert overfit_loss_ratio(trainer, steps=30, repeats=8) < 0.95


@pytest.mark.slow  # three runs of 2-4 steps and a sample grid
def test_resume_is_bit_identical_and_a_changed_config_is_refused(tmp_path):
    straight = ti_config(tmp_path / "a", "steps=4", "save_every=2")
    assert train(straight, progress=False) == tmp_path / "a" / f"{NAME}.safetensors"
    train(ti_config(tmp_path / "b", "steps=2", "save_every=2"), progress=False)
    with pytest.raises(ValueError, match=r"textual_inversion\.num_vectors: 3 -> 2"):
        train(ti_config(tmp_path / "b", "steps=4", "save_every=2", "textual_inversion.num_vectors=2"), resume=True,
              progress=False)
    train(ti_config(tmp_path / "b", "steps=4", "save_every=2"), resume=True, progress=False)
    a, b = last_state_tensors(tmp_path / "a"), last_state_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "samples" / "step_00000004.png").is_file()


def test_templates_fill_name_and_filewords(tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a picture of [name]\n\n[filewords], by [name]\n")
    trainer = make_trainer(ti_config(tmp_path / "run", f"textual_inversion.templates={templates}",
                                     "textual_inversion.validation_prompts=[\"[name] on a white background\"]"), "cpu")
    assert trainer.templates == ("a picture of [name]", "[filewords], by [name]")
    assert trainer.make_prompts(["a red circle", "two squares"], (torch.tensor([0, 1]),)) == \
        [f"a picture of {NAME}", f"two squares, by {NAME}"]
    assert trainer.validation_prompts() == [f"{NAME} on a white background"]
    draws = trainer.prompt_draws(4000, torch.Generator().manual_seed(0))[0]
    assert set(draws.tolist()) == {0, 1} and abs(draws.float().mean().item() - 0.5) < 0.03


def test_bad_options_are_one_line_errors(tmp_path):
    cases = [
        (["textual_inversion.num_vectors=0"], r"num_vectors must be in 1\.\.75"),
        (["textual_inversion.name="], r"textual_inversion\.name is required"),
        (["textual_inversion.name=a/b"], r"must be one prompt word and a file name"),
        (["textual_inversion.templates=nosuchset"], r"neither a built-in set \(subject, subject_filewords, style"),
        (["cond_dropout=0.2"], r"task 'textual_inversion' does not read cond_dropout"),
        (["data=digits"], r"needs RGB data"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            ti_config(tmp_path, *extra)
    bad = tmp_path / "bad.txt"
    bad.write_text("a picture of [name]\na plain picture\n")
    with pytest.raises(ValueError, match=r"1 template\(s\) without \[name\], e\.g\. 'a plain picture'"):
        ti_config(tmp_path, f"textual_inversion.templates={bad}")
    built = [(["textual_inversion.name=triangle"], r"'triangle' is made of words the model knows.*\"<triangle>\""),
             (["textual_inversion.init_words= "], r"init_words ' ' has no tokens"),
             (["textual_inversion.init_words=a sphere"], r"sphere is not in the model's vocabulary; known words: a, "),
             (["prediction=x0"], r"model's own noise schedule and prediction type \('v'\)")]
    for extra, message in built:
        with pytest.raises(ValueError, match=message):
            make_trainer(ti_config(tmp_path, *extra), "cpu")


def test_shapes_only_shapes_and_colors_draw_one_concept_and_the_default_set_is_unchanged():
    from unfog.datasets.shapes import make_item
    from unfog.datasets.shapes_text import ShapesConfig

    one = ShapesConfig(categories=("single_object",), only_shapes=("triangle",), only_colors=("green",))
    scenes = [make_item(i, 32, 0, one)[0] for i in range(20)]
    assert {(o.shape, o.color) for s in scenes for o in s.objects} == {("triangle", "green")}
    # the default config draws from the full sets, with the draws of a config without the fields
    assert ShapesConfig().shapes == ("circle", "square", "triangle") and len(ShapesConfig().colors) == 6
    with pytest.raises(ValueError, match=r"only_shapes holds one shape, but categories color_attr, position"):
        ShapesConfig(only_shapes=("triangle",))
    with pytest.raises(ValueError, match=r"unknown shape 'star'; valid choices: circle, square, triangle"):
        ShapesConfig(categories=("single_object",), only_shapes=("star",))


def test_committed_config_loads():
    root = Path(__file__).resolve().parents[2]
    import os

    cwd = os.getcwd()
    os.chdir(root)  # the template file path is relative to the repository, as the config is run
    try:
        config = load_config(root / "configs" / "ti_shapes.json")
    finally:
        os.chdir(cwd)
    assert config.task == "textual_inversion" and config.options.name == NAME and config.data_size == 20
    assert config.shapes_config().shapes == ("triangle",)


def test_init_from_an_embedding_file_continues_its_vectors(tmp_path):
    first = make_trainer(ti_config(tmp_path / "a", "ema_decay=0"), "cpu")
    first.train_step()
    first.save_model()
    path = tmp_path / "a" / f"{NAME}.safetensors"
    second = make_trainer(ti_config(tmp_path / "b"), "cpu")
    assert second.load_weights(path) == [f"embedding {NAME} at step 1"]
    assert torch.equal(second.net.vectors[0], first.net.vectors[0])
    assert torch.equal(second.ema.model.vectors[0], first.net.vectors[0])
    with pytest.raises(ValueError, match=r"holds 3 vectors for a model with text width 128; this run trains "
                                         r"textual_inversion\.num_vectors=2"):
        make_trainer(ti_config(tmp_path / "c", "textual_inversion.num_vectors=2"), "cpu").load_weights(path)
