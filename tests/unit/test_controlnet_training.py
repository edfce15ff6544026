"""Task "controlnet" on the embedded shapes model (trained here at 32 px so the steps are cheap):
the ControlNet starts as the official ``cldm`` makes it (the U-Net's encoder, zero convs, a zero
last hint conv), so the controlled U-Net equals the plain one at step 0; only the ControlNet
trains (U-Net, VAE, text encoder bit for bit as loaded); the saved file, read by
``unfog.load_controlnet`` into a fresh pipeline's ``controls=``, gives the trainer's prediction;
resume is bit-identical and a changed config refused; the loss falls when overfitting; the
data's hints are aligned with the objects (the analyzer's masks) and with their images' crops;
bad inputs are one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unfog
from unfog.conditioning import encode_prompt
from unfog.datasets.shapes import ShapesConfig, ShapesDataset, layout_hint, make_item, render
from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.metrics.shapes_analyzer import detect
from unfog.pipelines.controlnet import Control
from unfog.training import load_config, make_trainer, train
from unfog.training.controlnet import control_hints
from unfog.training.controlnet_data import make_controlnet_data
from unfog.training.finetune import frozen_forward
from training_checks import last_state_tensors, overfit_loss_ratio

BASE = ["task=controlnet", "data=shapes", "image_size=32", "data_size=8", "batch_size=2", "precision=fp32",
        "warmup_steps=0", "lr=0.001", "log_every=1", "sample_every=1000", "sample_steps=2",
        "controlnet.output_name=layout"]
PROMPTS = ["a red circle", "a blue square to the left of a green triangle", ""]


def cn_config(out, *extra):
    return load_config(None, [*BASE, f"out_dir={out}", *extra])


def model_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def inputs(n: int = 3, latent: int = 8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 4, latent, latent, generator=g), torch.tensor([100.0, 500.0, 900.0])[:n],
            torch.rand(n, 3, 8 * latent, 8 * latent, generator=g))


def test_init_is_the_unets_encoder_with_zero_outputs_so_step_0_is_the_plain_unet(tmp_path):
    trainer = make_trainer(cn_config(tmp_path), "cpu")
    cn, unet = trainer.net.controlnet, trainer.pipe.unet
    mine, theirs = cn.state_dict(), unet.state_dict()
    encoder = [k for k in theirs if k.startswith(("time_embed.", "input_blocks.", "middle_block."))]
    assert encoder and all(torch.equal(mine[k], theirs[k]) for k in encoder)  # every encoder tensor copied
    fresh = sorted(set(mine) - set(encoder))
    assert all(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in fresh)
    zero = [k for k in fresh if not k.startswith("input_hint_block.")] + \
           [k for k in fresh if k.startswith(f"input_hint_block.{len(cn.input_hint_block) - 1}.")]
    assert len(zero) == 2 * (len(cn.zero_convs) + 1) + 2 and all(float(mine[k].abs().max()) == 0 for k in zero)
    assert float(cn.input_hint_block[0].weight.detach().abs().max()) > 0  # the other hint convs are drawn
    x, t, hint = inputs()
    with torch.no_grad():
        residuals = cn(x, t, encode_prompt("sd1", [trainer.pipe.text_encoder], trainer.pipe.tokenizer,
                                           PROMPTS).context, hint)
        assert len(residuals) == len(unet.input_blocks) + 1 and all(float(r.abs().max()) == 0 for r in residuals)
        plain = frozen_forward(trainer.pipe, x, t, PROMPTS, None, text_grad=False)
        assert torch.equal(trainer.net(x, t, PROMPTS, hint=hint), plain)


def test_only_the_controlnet_trains_and_the_model_stays_bit_for_bit(tmp_path):
    trainer = make_trainer(cn_config(tmp_path), "cpu")
    before = model_tensors(trainer.pipe)
    cn = trainer.net.controlnet
    assert {id(p) for p in trainer.params} == {id(p) for p in cn.parameters()}
    assert all(k.startswith("controlnet.") for k in trainer.ema.model.state_dict())  # not the model
    start = {k: v.clone() for k, v in cn.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
    moved = [k for k, v in cn.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("zero_convs.") for k in moved) and any(k.startswith("input_blocks.") for k in moved)
    assert any(k.startswith("input_hint_block.") for k in moved)
    after = model_tensors(trainer.pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for name in ("unet", "vae", "text_encoder")
                   for p in getattr(trainer.pipe, name).parameters())


def test_saved_file_in_a_fresh_pipelines_controls_reproduces_the_trainers_prediction(tmp_path):
    """Oracle: the trainer's EMA network (hint resized by the trainer) against a fresh pipeline's
    own U-Net call with ``controls=[Control(unfog.load_controlnet(file), hint image)]`` (the hint as
    a PIL image at the image size, prepared by the pipeline): within 1e-5."""
    trainer = make_trainer(cn_config(tmp_path, "ema_decay=0.5", "lr=0.01"), "cpu")
    for _ in range(3):
        trainer.train_step()
    trainer.save_model()
    scene, _ = make_item(5, 32, 0)
    image = Image.fromarray(layout_hint(scene))  # 32 x 32; the ControlNet reads 64 x 64 (8 x the 8 x 8 latents)
    x, t, _ = inputs()
    hint = control_hints(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255, (8, 8))
    with torch.no_grad():
        ours = trainer.ema.model(x, t, PROMPTS, hint=hint.expand(3, -1, -1, -1))
        pipe = unfog.load(default_model_path(DEFAULT_TEXT_MODEL))
        c = encode_prompt("sd1", [pipe.text_encoder], pipe.tokenizer, PROMPTS).context
        controlnet = unfog.load_controlnet(tmp_path / "layout.safetensors")
        said = []
        run = pipe._control_run([Control(controlnet, image)], 32, 32, torch.tensor([10.0, 1.0, 0.0]), said.append)
        theirs = pipe._network(x, t, c, control=run).float()
        assert (pipe.unet(x, t, c) - ours).abs().max() > 1e-3  # the ControlNet changes the output: this can fail
    assert said == []  # a hint of the output size is not "resized", though this VAE's factor 4 makes it 64x64 inside
    assert (theirs - ours).abs().max() < 1e-5  # measured 0
    with pytest.raises(FileExistsError, match=r"is not from a training run.*controlnet\.output_name"):
        make_trainer(cn_config(tmp_path), "cpu")  # a ControlNet file without a run beside it


def test_init_from_a_controlnet_file_continues_it(tmp_path):
    first = make_trainer(cn_config(tmp_path / "a", "ema_decay=0"), "cpu")
    first.train_step()
    first.save_model()
    second = make_trainer(cn_config(tmp_path / "b"), "cpu")
    assert second.load_weights(tmp_path / "a" / "layout.safetensors") == ["ControlNet layout.safetensors"]
    want = first.net.controlnet.state_dict()
    for net in (second.net, second.ema.model):
        got = net.controlnet.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow  # 30 steps: about 10 s on a busy 2-core machine
def test_loss_falls_when_overfitting_two_images(tmp_path):
    trainer = make_trainer(cn_config(tmp_path, "data_size=2", "lr=0.0005"), "cpu")
    assert overfit_loss_ratio(trainer, steps=30, repeats=8) < 0.9


@pytest.mark.slow  # three runs of 2-4 steps and a sample grid
def test_resume_is_bit_identical_and_a_changed_config_is_refused(tmp_path):
    dropout = ["controlnet.caption_dropout=0.5"]  # draws from the run's generator
    assert train(cn_config(tmp_path / "a", "steps=4", "save_every=2", *dropout), progress=False) == \
        tmp_path / "a" / "layout.safetensors"
    train(cn_config(tmp_path / "b", "steps=2", "save_every=2", *dropout), progress=False)
    with pytest.raises(ValueError, match=r"controlnet\.caption_dropout: 0\.5 -> 0\.2"):
        train(cn_config(tmp_path / "b", "steps=4", "save_every=2", "controlnet.caption_dropout=0.2"),
              resume=True, progress=False)
    train(cn_config(tmp_path / "b", "steps=4", "save_every=2", *dropout), resume=True, progress=False)
    a, b = last_state_tensors(tmp_path / "a"), last_state_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "samples" / "step_00000004.png").is_file()


@pytest.mark.parametrize("style", ["filled", "outlined"])
def test_shapes_hints_cover_the_analyzers_object_masks(style):
    """The items are the shapes set's (same images and captions), and each hint is white where the
    analyzer finds an object on the image: every object pixel lies inside the hint, and each
    object's region (hint >= 128 for that object alone) and its analyzer mask agree (IoU >= 0.75:
    the analyzer keeps pixels covered by >= half an object, as the hint's threshold; measured
    worst 0.82 over 200 scenes)."""
    config = ShapesConfig(style=style)
    data = make_controlnet_data("shapes", 64, 40, 3, True, shapes_config=config)
    batch = data.batch(torch.arange(40))
    reference = ShapesDataset(40, size=64, seed=3, config=config)
    for i in range(40):
        scene, caption = make_item(i, 64, 3, config)
        assert torch.equal(batch.images[i], reference[i]["image"]) and batch.captions[i] == caption
        hint = (batch.hints[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(hint, layout_hint(scene))
        found = detect(render(scene, style=style))
        assert found
        for _, mask in found:
            assert not (mask & (hint[..., 0] == 0)).any()
        if style == "filled":
            assert len(found) == len(scene.objects)
            for k in range(len(scene.objects)):
                region = layout_hint(scene, only=k)[..., 0] >= 128
                assert max((region & m).sum() / (region | m).sum() for _, m in found) >= 0.75


def _write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_folder_hints_from_the_sibling_folder_and_metadata_follow_their_images_crops(tmp_path):
    """Each hint here is its own image, so with random crops the hint must equal (image + 1) / 2."""
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    for k, pixels in enumerate(pictures[:2]):
        _write(tmp_path / "images" / f"{k}.png", pixels)
        (tmp_path / "images" / f"{k}.txt").write_text(f"picture {k}")
        _write(tmp_path / "hint" / f"{k}.png", pixels)
    _write(tmp_path / "images" / "sub" / "2.png", pictures[2])
    _write(tmp_path / "elsewhere" / "two.png", pictures[2])
    (tmp_path / "images" / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "2.png", "text": "picture 2", "hint": "../../elsewhere/two.png"}) + "\n")
    data = make_controlnet_data(str(tmp_path / "images"), 32, 0, 0, False)
    seeds = data.crop_seeds(3, torch.Generator().manual_seed(1))
    batch = data.batch(torch.arange(3), seeds)
    assert batch.captions == ["picture 0", "picture 1", "picture 2"]
    assert torch.equal(batch.hints, ((batch.images + 1) * 127.5).round() / 255)
    assert len({tuple(s[2:4].tolist()) for s in batch.sizes}) > 1  # the crops differ, so this can fail


def test_bad_inputs_are_one_line_errors(tmp_path):
    _write(tmp_path / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "images" / "a.txt").write_text("a")
    with pytest.raises(FileNotFoundError, match=r"^no hint for .*images/a\.png: expected .*hint/a\.png \(a 'hint' "
                                                r"folder beside .*images, same name\) or a 'hint' in its metadata"):
        make_controlnet_data(str(tmp_path / "images"), 32, 0, 0, True)
    _write(tmp_path / "hint" / "a.png", np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"^hint .*hint/a\.png is 32x16 but its image .*a\.png is 32x32; a hint "
                                         r"must have its image's size$"):
        make_controlnet_data(str(tmp_path / "images"), 32, 0, 0, True)
    cases = [
        (["controlnet.caption_dropout=1"], r"controlnet\.caption_dropout must be in \[0, 1\), got 1"),
        (["controlnet.output_name=a/b"], r"controlnet\.output_name must be a file name without folders"),
        (["controlnet.base_dtype=fp8"], r"unknown controlnet\.base_dtype 'fp8'; valid choices: fp32, bf16, fp16"),
        (["controlnet.cache_latents=memory"], r"unknown config key\(s\) controlnet\.cache_latents; valid keys of "
                                              r"section controlnet: base_model, output_name"),
        (["cond_dropout=0.5"], r"task 'controlnet' does not read cond_dropout .*controlnet\.caption_dropout"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            cn_config(tmp_path / "run", *extra)
