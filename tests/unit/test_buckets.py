"""Aspect-ratio buckets, recorded crops and SDXL-style size conditioning of text-to-image training."""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import unfog
from unfog.conditioning import pooled_output, sdxl_vector_cond
from unfog.datasets import ImageFolderDataset
from unfog.datasets.buckets import assign_buckets, log_aspect, make_buckets, nearest_bucket
from unfog.models.unet import UNet
from unfog.pipelines.latent_model import load_parts
from unfog.pipelines.stable_diffusion import StableDiffusion
from unfog.training import load_config, make_trainer, train
from unfog.training.data import BucketBatches, make_captioned_data
from unfog.training.distributed import World
from unfog.training.text2image import size_condition

pytestmark = pytest.mark.usefixtures("single_thread")

VAE = ["task=autoencoder", "data=shapes", "image_size=32", "data_size=16", "batch_size=2", "precision=fp32",
       'vae_overrides={"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}', "warmup_steps=1",
       "lr=0.001", "steps=1"]
T2I = ["task=text2image", "image_size=32", "data_size=16", "batch_size=2", "precision=fp32", "model=TINY",
       'text_encoder={"width": 32, "layers": 1, "heads": 2}', "prediction=v", "schedule=scaled_linear",
       "warmup_steps=1", "sample_steps=1", "sample_every=1000", "lr=0.001", "size_conditioning=true"]


# ---- buckets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("area, step", [(512 * 512, 64), (1024 * 1024, 64), (32 * 32, 8)])
def test_buckets_fill_the_area_in_multiples_of_step(area, step):
    buckets = make_buckets(area, step)
    assert (int(math.isqrt(area)) // step * step,) * 2 in buckets  # the square
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and h * w <= area and max(h, w) <= 4 * min(h, w)
        assert (w, h) in buckets
        assert (h + step) * w > area or h * (w + step) > area  # no side can grow
    assert len(set(buckets)) == len(buckets)


def test_nearest_bucket_has_the_closest_aspect_ratio():
    buckets = make_buckets(512 * 512, 64)
    rng = random.Random(0)
    for _ in range(200):
        size = (rng.randint(50, 3000), rng.randint(50, 3000))
        k = nearest_bucket(size, buckets)
        best = min(abs(log_aspect(b) - log_aspect(size)) for b in buckets)
        assert abs(log_aspect(buckets[k]) - log_aspect(size)) == best
    assert buckets[nearest_bucket((1080, 1920), buckets)] == (384, 640)  # 16:9 -> 3:5
    assert buckets[nearest_bucket((700, 700), buckets)] == (512, 512)
    assert buckets[nearest_bucket((100, 5000), buckets)] == (256, 1024)  # beyond 4:1, the widest


def test_small_buckets_merge_into_the_nearest_used_one():
    buckets = make_buckets(32 * 32, 8)
    sizes = [(64, 40)] * 3 + [(40, 64)] * 3 + [(50, 50)] * 3 + [(20, 80)]  # the last is alone in (16, 64)
    alone = assign_buckets(sizes, buckets)
    assert buckets[alone[-1]] == (16, 64) and buckets[alone[0]] == (40, 24) and buckets[alone[3]] == (24, 40)
    merged = assign_buckets(sizes, buckets, min_count=2)
    assert merged[:-1] == alone[:-1] and buckets[merged[-1]] == (24, 40)  # the nearest wide bucket in use
    assert len(set(assign_buckets(sizes, buckets, min_count=5))) == 1  # repeated until all fill a batch


def _grouped(n=23, seed=0):
    g = random.Random(seed)
    return [g.choice([0, 3, 5]) for _ in range(n)]


def test_bucket_batches_are_one_bucket_and_cover_each_epoch():
    groups, bs = _grouped(), 3
    sampler = BucketBatches(groups, bs, seed=7)
    per_epoch = sum(groups.count(k) // bs for k in set(groups))
    epochs = []
    for _ in range(3):
        batches = [sampler.next() for _ in range(per_epoch)]
        assert all(len({groups[int(i)] for i in b}) == 1 and len(b) == bs for b in batches)
        seen = torch.cat(batches).tolist()
        assert len(seen) == len(set(seen))  # no image twice in an epoch
        for k in set(groups):  # every image but the documented leftovers (fewer than bs per bucket)
            members = {i for i, g in enumerate(groups) if g == k}
            assert len(members - set(seen)) == len(members) % bs
        epochs.append(seen)
    assert sampler.epoch == 2 and epochs[0] != epochs[1]
    assert torch.equal(torch.cat(BucketBatches(groups, bs, seed=7).epoch_batches(1)), torch.tensor(epochs[1]))


def test_bucket_batches_resume_mid_epoch_replays_exactly():
    groups = _grouped()
    a = BucketBatches(groups, 2, seed=3)
    for _ in range(13):  # into the second epoch
        a.next()
    state = a.state_dict()
    b = BucketBatches(groups, 2, seed=3)
    b.load_state_dict(state)
    for _ in range(25):
        assert torch.equal(a.next(), b.next())


def test_bucket_batches_slice_per_rank_within_one_bucket():
    groups = _grouped()
    sampler = BucketBatches(groups, 4, seed=0)
    for _ in range(10):
        batch = sampler.next()  # the global batch, the same on every rank
        parts = [batch[World(rank, 2).local_slice(4)] for rank in range(2)]
        assert torch.equal(torch.cat(parts), batch)
        assert len({groups[int(i)] for p in parts for i in p}) == 1


def test_bucket_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match=r"fewer images than batch_size 4"):
        BucketBatches([0, 0, 0, 0, 1, 1], 4, seed=0)


# ---- crops ----------------------------------------------------------------------------------------------


def _noise_image(path, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (h, w), generator=g, dtype=torch.uint8).numpy(), "L").save(path)


def _find(crop, image):
    """Every (top, left) where ``crop`` (h, w) sits in ``image`` (H, W)."""
    h, w = crop.shape
    return [(t, l) for t in range(image.shape[0] - h + 1) for l in range(image.shape[1] - w + 1)
            if torch.equal(image[t : t + h, l : l + w], crop)]


@pytest.mark.parametrize("target", [None, (24, 40), (40, 24)])
def test_crop_coordinates_locate_the_crop(tmp_path, target):
    _noise_image(tmp_path / "a.png", 45, 60)  # (h, w)
    th, tw = target or (32, 32)
    scale = max(tw / 60, th / 45)
    with Image.open(tmp_path / "a.png") as img:  # the resize the data set makes: cover the target
        resized = img.resize((max(tw, round(60 * scale)), max(th, round(45 * scale))), Image.Resampling.BICUBIC)
    resized = torch.from_numpy(np.asarray(resized).copy())  # (H, W) uint8
    spare = (resized.shape[0] - th, resized.shape[1] - tw)
    to_pixels = lambda x: torch.round((x[0] + 1) * 127.5).to(torch.uint8)  # noqa: E731
    centred = ImageFolderDataset(tmp_path, 32, channels=1).item(0, target)
    assert centred["original_size"] == (45, 60) and centred["target_size"] == (th, tw)
    assert centred["crop_top_left"] == (spare[0] // 2, spare[1] // 2)
    assert _find(to_pixels(centred["image"]), resized) == [centred["crop_top_left"]]

    ds = ImageFolderDataset(tmp_path, 32, channels=1, center_crop=False)
    rng_before = torch.get_rng_state()
    found = set()
    for seed in range(12):
        item = ds.item(0, target, torch.Generator().manual_seed(seed))
        assert _find(to_pixels(item["image"]), resized) == [item["crop_top_left"]]
        assert ds.item(0, target, torch.Generator().manual_seed(seed))["crop_top_left"] == item["crop_top_left"]
        found.add(item["crop_top_left"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global generator is left alone
    assert len(found) > 3 and all(0 <= t <= spare[0] and 0 <= l <= spare[1] for t, l in found)


def test_original_size_follows_the_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 60 x 30 (w x h), shown 30 x 60
    Image.new("RGB", (60, 30), (200, 10, 10)).save(tmp_path / "a.jpg", exif=exif)
    ds = ImageFolderDataset(tmp_path, 16)
    assert ds.sizes == ((60, 30),) and ds[0]["original_size"] == (60, 30)


# ---- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return train(load_config(None, VAE + [f"out_dir={out}"]), progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of three aspect ratios (and one lone panorama), captioned."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(64, 40)] * 3 + [(40, 64)] * 3 + [(50, 50)] * 2 + [(20, 80)]  # (h, w)
    colours = ["red", "green", "blue"]
    for i, (h, w) in enumerate(sizes):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {colours[i % 3]} thing")
    return root


def t2i(vae_file, out, *extra):
    return load_config(None, T2I + [f"vae_model={vae_file}", f"out_dir={out}", *extra])


def test_size_conditioned_model_trains_saves_loads_and_generates(vae_file, tmp_path):
    path = train(t2i(vae_file, tmp_path / "run", "data=shapes", "steps=2"), progress=False)
    *_, info, meta = load_parts(path)
    assert info.size_conditioning and meta["unet"]["num_classes"] == "sequential"
    assert meta["unet"]["adm_in_channels"] == 32 + 6 * 256
    pipe = unfog.load(path)
    assert pipe.size_conditioning and pipe.family == "sd1"
    images = pipe(["a red circle", ""], steps=2, cfg_scale=3, seed=1, output="tensor")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    sized = pipe("a red circle", steps=2, seed=1, original_size=(64, 16), crops_coords_top_left=(8, 4),
                 target_size=(32, 32), output="tensor")
    assert not torch.equal(sized, images[:1])  # the sizes reach the U-Net

    # The y the pipeline builds is the y training builds for the same caption and sizes.
    te, tok = pipe.text_encoder, pipe.tokenizer
    captions = ["a red circle", "a blue square", ""]
    sizes = torch.tensor([[64, 16, 8, 4, 32, 32]] * 3, dtype=torch.float32)
    with torch.no_grad():
        trained = size_condition(pooled_output(te(tok(captions, pad="eos").input_ids)), sizes)
        y = dict(original_size=(64, 16), crop=(8, 4), target_size=(32, 32), aesthetic_score=6.0,
                 negative_aesthetic_score=2.5)
        cond, uncond = pipe._conditioning(captions[:2], "", None, 1, y)
    torch.testing.assert_close(cond["y"], trained[:2], rtol=0, atol=0)
    torch.testing.assert_close(uncond["y"], trained[2:].expand(2, -1), rtol=0, atol=0)  # a dropped caption: ""
    torch.testing.assert_close(sdxl_vector_cond(trained[:, :32], (64, 16), (8, 4), (32, 32)), trained,
                               rtol=0, atol=0)

    plain = UNet(replace(pipe.unet.config, num_classes=None, adm_in_channels=None))
    with pytest.raises(ValueError, match="size_conditioning needs a U-Net with num_classes='sequential'"):
        StableDiffusion(plain, pipe.vae, tok, "sd1", text_encoder=te, size_conditioning=True)


def test_bucketed_folder_run_resumes_bit_identically(vae_file, folder, tmp_path):
    run = ["data=" + str(folder), "buckets=true", "bucket_step=8", "center_crop=false", "save_every=2"]
    trainer = make_trainer(t2i(vae_file, tmp_path / "x", *run, "steps=2"))
    data = trainer.data
    targets = {data.target_of(i) for i in range(len(data))}
    assert targets == {(40, 24), (24, 40), (32, 32)}  # the panorama joined the nearest bucket
    batch = trainer.batches.next()
    seeds = data.crop_seeds(2, torch.Generator().manual_seed(0))
    loaded = data.batch(batch, seeds)
    h, w = data.target_of(int(batch[0]))
    assert loaded.images.shape == (2, 3, h, w) and loaded.sizes[:, 4:].tolist() == [[h, w]] * 2

    straight = train(t2i(vae_file, tmp_path / "a", *run, "steps=4"), progress=False)
    train(t2i(vae_file, tmp_path / "b", *run, "steps=2"), progress=False)
    # the second half loads its images in 2 worker processes: the same crops, the same weights
    resumed = train(t2i(vae_file, tmp_path / "b", *run, "steps=4", "data_workers=2"), resume=True, progress=False)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bucket_and_size_options_are_checked(vae_file, folder, tmp_path):
    with pytest.raises(ValueError, match="buckets need an image folder"):
        load_config(None, T2I + ["data=shapes", "buckets=true", "vae_model=x"])
    with pytest.raises(ValueError, match="buckets is an option of task 'text2image'"):
        load_config(None, ["task=autoencoder", f"data={folder}", "buckets=true"])
    with pytest.raises(ValueError, match="size_conditioning is an option of task 'text2image'"):
        load_config(None, ["size_conditioning=true"])
    with pytest.raises(ValueError, match="bucket_step 6 must be a multiple of 4"):
        make_trainer(t2i(vae_file, tmp_path / "x", f"data={folder}", "buckets=true", "bucket_step=6"))
    with pytest.raises(ValueError, match="aspect-ratio buckets need an image folder"):
        make_captioned_data("shapes", 32, 8, 0, bucket_step=8)


def test_two_processes_train_buckets_as_one(vae_file, folder, tmp_path):
    """torchrun with 2 processes slices each one-bucket global batch (random crops, size
    conditioning): the losses of one process with the same global batch, step by step."""
    run = ["data=" + str(folder), "buckets=true", "bucket_step=8", "center_crop=false", "steps=4", "log_every=1"]
    train(t2i(vae_file, tmp_path / "one", *run), progress=False)
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps(t2i(vae_file, tmp_path / "two", *run).to_dict()))
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "unfog.cli", "train", str(cfg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert len(one) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)


def test_autoencoder_random_crops_resume_bit_identically(folder, tmp_path):
    """The autoencoder stage crops from the trainer's seeds too (measuring the scaling factor and
    drawing the sample grid use fixed seeds, which leave the training generators alone)."""
    run = [f"data={folder}", "center_crop=false", "save_every=1"]
    straight = train(load_config(None, VAE + run + [f"out_dir={tmp_path / 'a'}", "steps=2"]), progress=False)
    train(load_config(None, VAE + run + [f"out_dir={tmp_path / 'b'}", "steps=1"]), progress=False)
    resumed = train(load_config(None, VAE + run + [f"out_dir={tmp_path / 'b'}", "steps=2", "data_workers=2"]),
                    resume=True, progress=False)  # the second half loads its crops in 2 worker processes
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
