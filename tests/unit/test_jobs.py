"""Generation jobs on cached models (``unfog.jobs``): a cached pipeline serves job after job, each
job's adapters come off again (the weights bit-identical to the loaded ones, even when a job fails
half-way), and a job on a cached model draws exactly what it draws on a freshly loaded one. On the
embedded shapes model, 2 steps at 64 px."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unfog.cli import DEFAULT_TEXT_MODEL, default_model_path
from unfog.jobs import Job, ModelCache, generate
from unfog.pipelines.outputs import Settings
from unfog.pipelines.stable_diffusion import StableDiffusion

from test_hypernetwork import random_hypernetwork, save_hypernetwork
from test_lora_loading import snapshot, targets, write_lora


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "shapes.safetensors"
    shutil.copyfile(default_model_path(DEFAULT_TEXT_MODEL), path)
    return path


@pytest.fixture
def loads(monkeypatch) -> list:
    """The paths ``StableDiffusion.load`` is called with."""
    calls, real = [], StableDiffusion.load.__func__

    def counting(cls, path, **kw):
        calls.append(path)
        return real(cls, path, **kw)

    monkeypatch.setattr(StableDiffusion, "load", classmethod(counting))
    return calls


def job(model, prompt, seed=3, **kw) -> Job:
    return Job("txt2img", Settings(prompt=prompt, steps=2, seed=seed, width=64, height=64), model, **kw)


def pixels(drawn) -> list[np.ndarray]:
    return [np.asarray(d.image) for d in drawn]


def test_adapters_come_off_and_the_cached_model_draws_as_a_fresh_one(model, tmp_path, loads):
    cache = ModelCache()
    pipe, _ = cache.pipelines(job(model, "x"))
    before = snapshot(pipe)
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "blob.safetensors", targets(pipe), seed=5)
    widths = sorted({m.to_k.in_features for m in pipe.unet.modules() if hasattr(m, "context_transform")})
    save_hypernetwork(random_hypernetwork(widths, activation="relu"), tmp_path / "ink.pt")
    adapted = job(model, "a red circle <lora:blob:0.8> <hypernet:ink:0.5>", lora_dirs=(tmp_path / "loras",),
                  hypernetwork_dirs=(tmp_path,), batch_size=2)
    with_adapters = list(generate(adapted, cache, warn=lambda m: None))
    assert [d.seed for d in with_adapters] == [3, 4]
    assert "Lora hashes:" in with_adapters[0].parameters and "Hypernet hashes:" in with_adapters[0].parameters
    assert pipe.loras == [] and pipe.hypernetworks == [] and pipe.embeddings == []
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())

    plain = job(model, "a red circle", batch_size=2)
    cached = pixels(generate(plain, cache))
    assert len(loads) == 1  # every job above used the one loaded model
    fresh = pixels(generate(plain, ModelCache()))
    assert all(np.array_equal(a, b) for a, b in zip(cached, fresh))
    assert not np.array_equal(cached[0], pixels(with_adapters)[0])  # the adapters did act


def test_a_job_that_fails_half_way_leaves_the_model_as_loaded(model, tmp_path):
    cache = ModelCache()
    pipe, _ = cache.pipelines(job(model, "x"))
    before = snapshot(pipe)
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "blob.safetensors", targets(pipe), seed=5)
    broken = job(model, "a red circle <lora:blob:1> <lora:missing:1>", lora_dirs=(tmp_path / "loras",))
    with pytest.raises(ValueError, match="missing"):
        list(generate(broken, cache))
    assert pipe.loras == []
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())
    # an iterator closed after its first image takes the adapters off too
    run = generate(job(model, "a red circle <lora:blob:1>", lora_dirs=(tmp_path / "loras",), batch_size=3), cache)
    next(run)
    assert len(pipe.loras) == 1
    run.close()
    assert pipe.loras == [] and all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())


def test_the_cache_reloads_a_changed_file_and_keeps_at_most_its_size(model, tmp_path, loads):
    cache = ModelCache(size=1)
    first, _ = cache.pipelines(job(model, "x"))
    assert cache.pipelines(job(model, "x"))[0] is first
    assert cache.pipelines(job(model, "x", dtype="bf16"))[0] is not first  # loaded otherwise: another entry
    assert len(loads) == 2 and len(cache._pipes) == 1
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(model, copy)
    one = cache.pipelines(job(copy, "x"))[0]
    id_before = cache.model_id(copy)
    with safe_open(str(copy), framework="pt") as f:  # a new version saved under the same name
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(copy), metadata={**meta, "note": "saved again"})
    assert cache.pipelines(job(copy, "x"))[0] is not one
    assert cache.model_id(copy).hash != id_before.hash
    assert len(loads) == 4
    with pytest.raises(ValueError, match="at least 1"):
        ModelCache(size=0)
