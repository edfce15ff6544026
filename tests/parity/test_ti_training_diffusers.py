"""An embedding trained by unfog (task "textual_inversion") on a diffusers-written SD 1.x-like
folder (``sd1_folder`` of ``test_diffusers_folder.py``), loaded by diffusers' own
``load_textual_inversion``: diffusers adds the name as new tokens and grows the text encoder's
table (a mechanism that shares nothing with ours), and its ``encode_prompt`` gives the context
that unfog's pipeline gives with the same file through ``load_embedding``, and that the trainer's
EMA vectors give, within 1e-5 (fp32). Both written formats: diffusers' ``learned_embeds.safetensors``
and A1111's ``.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import pytest
import torch
from PIL import Image

import unfog
from unfog.conditioning import encode_prompt
from unfog.training import load_config, make_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/parity: the folder fixtures
from test_diffusers_folder import sd1_folder, tokenizer  # noqa: E402, F401 (fixtures)

TOL = 1e-5
NAME = "sks-tri"
PROMPTS = [f"a photo of {NAME}", f"{NAME}, a red cat", "a plain prompt"]

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(2):  # noisy: flat images make GroupNorm, so the latents, batch-dependent
        pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a photo of thing {i}")
    out = tmp_path_factory.mktemp("run")
    config = load_config(None, [
        "task=textual_inversion", f"textual_inversion.base_model={sd1_folder[0]}", f"data={root}", "image_size=32",
        "batch_size=2", "precision=fp32", "warmup_steps=0", "lr=0.05", "ema_decay=0", "steps=2",
        f"textual_inversion.name={NAME}", "textual_inversion.init_words=a photo", "textual_inversion.num_vectors=2",
        "textual_inversion.templates=subject_filewords", "textual_inversion.save_pt=true",
        "textual_inversion.save_diffusers=true", f"out_dir={out}"])
    trainer = make_trainer(config, "cpu")
    start = trainer.net.vectors[0].detach().clone()
    for _ in range(2):
        trainer.train_step()
    trainer.save_model()
    assert (trainer.net.vectors[0] - start).abs().max() > 1e-3  # it trained
    return trainer, out


@pytest.mark.parametrize("file", ["learned_embeds.safetensors", f"{NAME}.pt"])
def test_trained_embedding_loads_in_diffusers_as_in_unfog(trained, sd1_folder, file):
    trainer, out = trained
    folder = sd1_folder[0]
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.load_textual_inversion(str(out / file), token=NAME)
    ours = unfog.load(folder)
    ours.load_embedding(out / file, name=NAME)
    with torch.no_grad():
        context, _ = theirs.encode_prompt(PROMPTS, "cpu", 1, False)
        mine = encode_prompt("sd1", [ours.text_encoder], ours.tokenizer, PROMPTS, embeddings=ours.embeddings)
        trainer_own = encode_prompt("sd1", [trainer.pipe.text_encoder], trainer.pipe.tokenizer, PROMPTS,
                                    embeddings=[trainer.ema.model.embedding(detached=True)])
        without = encode_prompt("sd1", [ours.text_encoder], ours.tokenizer, PROMPTS)
    assert context.shape == mine.context.shape
    assert (mine.context - context).abs().max().item() <= TOL
    assert (trainer_own.context - context).abs().max().item() <= TOL
    assert (mine.context[:2] - without.context[:2]).abs().max() > 1e-3  # the embedding is in use
