"""A LoRA trained by unfog (task "lora") on an official diffusers folder, loaded by diffusers' own
pipeline loader.

diffusers writes a tiny SD 1.x-like folder (``sd1_folder`` of ``test_diffusers_folder.py``).
unfog trains a LoRA on it for two steps: text-encoder adapters, LoCon convs (``conv_rank``) and
aspect buckets on a folder of noisy captioned images of two aspect ratios. The kohya file it writes
is loaded by ``StableDiffusionPipeline.from_pretrained(folder)`` + ``load_lora_weights`` +
``fuse_lora`` and by ``unfog.load(folder)`` + ``load_lora``: the U-Net outputs (same x, t,
context) and the text encoder's last hidden states agree within 1e-4 relative in float32, and so do
the trainer's own network on prompts and diffusers' pipeline (``encode_prompt`` + U-Net) with the
file (measured: 1.4e-6, 0 and 1.5e-6). Two steps at lr 0.01 move those outputs by 27-37% relative,
so a misplaced adapter fails by orders of magnitude more than the tolerance.

Also, on the same folder: every batch holds one bucket's images; gradient checkpointing recomputes
exactly (the adapters after two steps are bit for bit those without it); the latent cache trains
as the uncached run (within 1e-6; measured 0); a bf16 base with checkpointing trains fp32 adapters
with finite losses, saved in fp32, whose update points the fp32 run's way (cosine of the lora_up
tensors, which start at zero: 0.98 measured, > 0.9 required).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import unfog
from unfog.training import load_config, make_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: model_checks
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: the folder fixtures
from model_checks import rel_err  # noqa: E402
from test_diffusers_folder import WIDTH, sd1_folder, tokenizer  # noqa: E402, F401 (fixtures)

RTOL = 1e-4
BUCKETS = {(24, 40), (40, 24)}  # (h, w): the 48x32 and 32x48 images in buckets of area <= 32^2, sides % 8
PROMPTS = ["a photo of thing 1", "a red cat"]

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four noisy images (flat ones make GroupNorm, so the latents, batch-dependent), two 48x32
    and two 32x48 (w x h), each with a .txt caption."""
    root = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(48, 32), (32, 48), (48, 32), (32, 48)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a photo of thing {i}")
    return root


def lora_config(folder, images, out, *extra):
    return load_config(None, [
        "task=lora", f"lora.base_model={folder}", f"data={images}", "lora.aspect_buckets=true",
        "lora.aspect_bucket_step=8", "image_size=32", "batch_size=2", "precision=fp32", "warmup_steps=0",
        "lr=0.01", "ema_decay=0", "steps=2", "sample_every=1000", "lora.rank=4", "lora.alpha=4",
        "lora.conv_rank=2", "lora.conv_alpha=2", "lora.text_encoder_lora=true", f"out_dir={out}", *extra])


def run(config) -> tuple:
    """A trainer after two steps, the LoRA file it saved, its losses, the batches it drew, the
    shapes of the U-Net's inputs and how often its first ResBlock level started a forward (once
    per step, twice with gradient checkpointing's recomputation)."""
    trainer = make_trainer(config, "cpu")
    batches, shapes, calls = [], [], []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda idx, model: (batches.append(idx), compute_loss(idx, model))[1]
    trainer.pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    trainer.pipe.unet.input_blocks[1][0].register_forward_pre_hook(lambda module, args: calls.append(1))  # a ResBlock
    losses = [trainer.train_step() for _ in range(2)]
    trainer.save_model()
    return trainer, trainer.model_path, losses, batches, shapes, len(calls)


@pytest.fixture(scope="module")
def trained(sd1_folder, images, tmp_path_factory):
    return run(lora_config(sd1_folder[0], images, tmp_path_factory.mktemp("fp32")))


def test_every_batch_holds_one_bucket(trained):
    trainer, _, losses, batches, shapes, _ = trained
    factor = trainer.pipe.vae.config.downsample_factor
    seen = set()
    for idx, shape in zip(batches, shapes, strict=True):
        (h, w), = {trainer.data.target_of(int(i)) for i in idx}
        assert shape == (2, 4, h // factor, w // factor)
        seen.add((h, w))
    assert seen == BUCKETS  # one epoch: each bucket once
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("option", ["lora.gradient_checkpointing=true", "lora.cache_latents=memory"])
def test_checkpointing_and_the_latent_cache_train_the_same_adapters(trained, sd1_folder, images, tmp_path, option):
    """Checkpointing recomputes the same operations on the same inputs: the same bits. The cache
    encodes each bucket as one batch, training the batch it draws: equal to float summation order."""
    reference, _, _, _, _, calls = trained
    trainer, _, _, _, _, other_calls = run(lora_config(sd1_folder[0], images, tmp_path, option))
    assert calls == 2 and other_calls == (4 if "checkpointing" in option else 2)  # it does recompute
    ours, theirs = trainer.net.state_dict(), reference.net.state_dict()
    assert ours.keys() == theirs.keys()
    tolerance = 0 if "checkpointing" in option else 1e-6
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=tolerance)


def test_bf16_base_with_checkpointing_trains_fp32_adapters(trained, sd1_folder, images, tmp_path):
    config = lora_config(sd1_folder[0], images, tmp_path, "lora.base_dtype=bf16", "lora.gradient_checkpointing=true")
    trainer, path, losses, _, _, calls = run(config)
    pipe = trainer.pipe
    assert {p.dtype for p in trainer.net.parameters()} == {torch.float32}
    adapters = {id(p) for p in trainer.net.parameters()}
    for model in (pipe.unet, pipe.text_encoder):
        assert {p.dtype for p in model.parameters() if id(p) not in adapters} == {torch.bfloat16}
    assert calls == 4 and all(math.isfinite(loss) for loss in losses)
    ours, reference = load_file(str(path)), load_file(str(trained[1]))
    assert ours.keys() == reference.keys() and {t.dtype for t in ours.values()} == {torch.float32}
    ups = [k for k in ours if k.endswith("lora_up.weight")]  # zero at the start: the update itself
    a, b = torch.cat([ours[k].flatten() for k in ups]), torch.cat([reference[k].flatten() for k in ups])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_trained_file_loads_in_diffusers_as_in_unfog(trained, sd1_folder, tokenizer):
    trainer, path, *_ = trained
    folder = sd1_folder[0]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 12, 20, generator=g), torch.randn(2, 77, WIDTH, generator=g)
    t = torch.tensor([17.0, 803.0])
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    with torch.no_grad():
        before = theirs.unet(x, t, encoder_hidden_states=context).sample
        text_before = theirs.text_encoder(ids).last_hidden_state
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora()
    with torch.no_grad():
        expected = theirs.unet(x, t, encoder_hidden_states=context).sample
        expected_text = theirs.text_encoder(ids).last_hidden_state
        embeds, _ = theirs.encode_prompt(PROMPTS, "cpu", 1, False)
        expected_trained = theirs.unet(x, t, encoder_hidden_states=embeds).sample

    ours = unfog.load(folder)
    assert ours.load_lora(path).unmatched == ()
    with torch.no_grad():
        got, got_text = ours.unet(x, t, context), ours.text_encoder(ids).last_hidden_state
        got_trained = trainer.ema.model(x, t, PROMPTS)  # the network the trainer saved
    assert rel_err(expected, before) > 100 * RTOL and rel_err(expected_text, text_before) > 100 * RTOL
    assert rel_err(got, expected) <= RTOL
    assert rel_err(got_text, expected_text) <= RTOL
    assert rel_err(got_trained, expected_trained) <= RTOL
