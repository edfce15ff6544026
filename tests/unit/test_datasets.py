"""Digits (sklearn) and image-folder data sets."""

import json
import logging
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from unfog.datasets import DigitsDataset, ImageFolderDataset, digits_tensors
from unfog.datasets.folder import EXTENSIONS

# ---------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_types():
    ds = DigitsDataset("train")
    image, label = ds[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label <= 9
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0  # the full range is used


def test_digits_native_size_is_the_raw_data_scaled():
    from sklearn.datasets import load_digits

    x, y = digits_tensors("all", size=8)
    raw = load_digits()
    np.testing.assert_allclose(x[:, 0].numpy(), raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), raw.target)


def test_digits_other_sizes_and_bad_size():
    assert DigitsDataset("test", size=32)[0][0].shape == (1, 32, 32)
    for bad in (12, 0, -8, 16.0):
        with pytest.raises(ValueError, match="multiple of 8"):
            DigitsDataset("train", size=bad)


def test_digits_unknown_split_lists_choices():
    with pytest.raises(ValueError, match="valid choices: train, test, all"):
        DigitsDataset("val")


def test_digits_split_sizes_disjoint_and_covering():
    train, test, full = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    assert len(full) == 1797
    assert len(train) == 1438 and len(test) == 359  # round(0.2 * n) of each class held out
    # No image of one split appears in the other (the 1,797 digits are all distinct).
    key = lambda ds: {tuple(r) for r in ds.images.flatten(1).tolist()}  # noqa: E731
    assert len(key(full)) == 1797 and not key(train) & key(test)
    sorted_all = torch.sort(torch.cat([train.labels, test.labels])).values
    torch.testing.assert_close(sorted_all, torch.sort(full.labels).values)


def test_digits_split_indices_disjoint():
    from unfog.datasets.digits import _load_raw, split_indices

    labels = _load_raw()[1]
    tr, te = split_indices(labels, "train"), split_indices(labels, "test")
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.union1d(tr, te), np.arange(len(labels)))


def test_digits_deterministic():
    a, b = digits_tensors("test"), digits_tensors("test")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_digits_split_is_stratified():
    train, test, full = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    n_all, n_test = torch.bincount(full.labels, minlength=10), torch.bincount(test.labels, minlength=10)
    assert torch.equal(n_test, torch.round(0.2 * n_all).long())
    assert torch.equal(torch.bincount(train.labels, minlength=10), n_all - n_test)


def test_digits_missing_sklearn_message(monkeypatch):
    import builtins

    from unfog.datasets import digits

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    digits._load_raw.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"from a checkout, `\.venv/bin/pip install -e '\.\[digits\]'`"):
            digits._load_raw()
    finally:
        digits._load_raw.cache_clear()


# ---------------------------------------------------------------------------------------- folder


def _save(path, size, mode, fmt=None):
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    rgba = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    img = img.convert("RGB").quantize(16) if mode == "P" else img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "data"
    _save(root / "a.png", (40, 30), "RGB")
    _save(root / "b.jpg", (17, 64), "RGB")
    _save(root / "c.webp", (32, 32), "RGB")
    _save(root / "sub" / "d.png", (50, 20), "L")
    _save(root / "sub" / "e.png", (24, 24), "RGBA")
    _save(root / "sub" / "deeper" / "f.png", (33, 45), "P")
    _save(root / "g.JPEG", (100, 100), "L", fmt="JPEG")
    (root / "a.txt").write_text("a red square\n")
    (root / "sub" / "d.txt").write_text("grey")
    (root / "notes.md").write_text("not an image")
    _save(root / ".hidden" / "h.png", (20, 20), "RGB")
    return root


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_items(mixed_folder, channels):
    ds = ImageFolderDataset(mixed_folder, 16, channels=channels)
    assert [p.name for p in ds.files] == ["a.png", "b.jpg", "c.webp", "g.JPEG", "d.png", "f.png", "e.png"]
    assert len(ds) == 7 and ds.skipped == ()
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "caption", "original_size", "crop_top_left", "target_size"}
        assert item["original_size"] == ds.sizes[i] and item["target_size"] == (16, 16)
        x = item["image"]
        assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
    captions = dict(zip((p.name for p in ds.files), ds.captions))
    assert captions["a.png"] == "a red square" and captions["d.png"] == "grey" and captions["b.jpg"] == ""


def test_folder_collates_with_dataloader(mixed_folder):
    batch = next(iter(torch.utils.data.DataLoader(ImageFolderDataset(mixed_folder, 8), batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and len(batch["caption"]) == 4


def test_folder_resize_shorter_side_then_centre_crop(tmp_path):
    # 64x32: left half black, right half white; shorter side 32 -> 16 gives 32x16, crop the middle.
    a = np.zeros((32, 64), dtype=np.uint8)
    a[:, 32:] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    x = ImageFolderDataset(tmp_path, 16, channels=1)[0]["image"][0]  # (16, 16)
    assert torch.all(x[:, :6] == -1.0) and torch.all(x[:, -6:] == 1.0)
    # Upscaling a tiny image works too.
    Image.fromarray(np.full((3, 5), 255, np.uint8)).save(tmp_path / "tiny.png")
    ds = ImageFolderDataset(tmp_path, 16, channels=1)
    assert torch.allclose(ds[1]["image"], torch.ones(1, 16, 16))


def test_folder_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    x = ImageFolderDataset(tmp_path, 8)[0]["image"]
    assert torch.all(x == 1.0)


def test_folder_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "mid.png")
    x = ImageFolderDataset(tmp_path, 8, channels=1)[0]["image"]
    torch.testing.assert_close(x, torch.full_like(x, 128 / 127.5 - 1))


def test_folder_random_crop(tmp_path):
    a = np.tile(np.arange(0, 240, 5, dtype=np.uint8), (16, 1))  # (16, 48): a horizontal ramp
    Image.fromarray(a).save(tmp_path / "ramp.png")
    centred = ImageFolderDataset(tmp_path, 16, channels=1)[0]["image"]
    torch.testing.assert_close(centred[0, 0], torch.from_numpy(a[0, 16:32]).float() / 127.5 - 1)
    crop = ImageFolderDataset(tmp_path, 16, channels=1, center_crop=False)
    torch.manual_seed(0)
    lefts = {int(round((float(crop[0]["image"][0, 0, 0]) + 1) * 127.5)) // 5 for _ in range(40)}
    assert len(lefts) > 10 and lefts <= set(range(33))  # many windows, all inside the image


def test_folder_random_flip_mirrors(tmp_path):
    a = np.zeros((16, 16), dtype=np.uint8)
    a[:, :4] = 255
    Image.fromarray(a).save(tmp_path / "edge.png")
    ds = ImageFolderDataset(tmp_path, 16, channels=1, random_flip=True)
    torch.manual_seed(0)
    seen = {bool(ds[0]["image"][0, 0, 0] > 0) for _ in range(20)}
    assert seen == {True, False}


def test_folder_metadata_jsonl(tmp_path):
    _save(tmp_path / "train" / "x.png", (20, 20), "RGB")
    _save(tmp_path / "train" / "imgs" / "y.jpg", (20, 30), "RGB")
    _save(tmp_path / "train" / "z.webp", (20, 20), "RGB")
    (tmp_path / "train" / "z.txt").write_text("sidecar wins")
    rows = [
        {"file_name": "x.png", "text": "an x"},
        {"file_name": "imgs/y.jpg", "text": "a y"},
        {"file_name": "z.webp", "text": "from metadata"},
        {"file_name": "gone.png", "text": "no such file"},
    ]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ImageFolderDataset(tmp_path, 8)
    assert dict(zip((p.name for p in ds.files), ds.captions)) == {"x.png": "an x", "y.jpg": "a y", "z.webp": "sidecar wins"}
    assert ds[0]["caption"] in {"an x", "a y", "sidecar wins"}


def test_folder_bad_metadata_line_names_file_and_line(tmp_path):
    _save(tmp_path / "x.png", (8, 8), "RGB")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"text": "no name"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: each line needs a 'file_name'"):
        ImageFolderDataset(tmp_path, 8)


def test_folder_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    _save(tmp_path / "good.png", (20, 20), "RGB")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    good_jpg = _save(tmp_path / "whole.jpg", (64, 64), "RGB").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (tmp_path / "empty.webp").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="unfog.datasets.folder"):
        ds = ImageFolderDataset(tmp_path, 16)
    assert [p.name for p in ds.files] == ["good.png", "whole.jpg"]
    assert sorted(s.path.name for s in ds.skipped) == ["empty.webp", "garbage.png", "truncated.jpg"]
    assert all(s.reason for s in ds.skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 unreadable image file(s) of 5" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_folder_all_unreadable_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"none of the 2 image files under .* could be read"):
        ImageFolderDataset(tmp_path, 16)


def test_folder_empty_and_missing_paths(tmp_path):
    (tmp_path / "readme.txt").write_text("captions without images")
    with pytest.raises(ValueError, match="no image files under") as e:
        ImageFolderDataset(tmp_path, 16)
    assert str(tmp_path) in str(e.value) and all(ext in str(e.value) for ext in EXTENSIONS)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        ImageFolderDataset(missing, 16)
    assert str(missing) in str(e.value) and ".webp" in str(e.value)
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "readme.txt", 16)


def test_folder_argument_errors(mixed_folder):
    with pytest.raises(ValueError, match="unknown channels 4; valid choices: 1, 3"):
        ImageFolderDataset(mixed_folder, 16, channels=4)
    with pytest.raises(ValueError, match="positive int"):
        ImageFolderDataset(mixed_folder, 0)
