"""Contracts of the non-executing torch checkpoint reader: it reads what ``torch.save`` writes
exactly as ``torch.load(weights_only=True)`` does, and refuses every pickle that names anything but
the tensor-building globals, before any of it runs (checked with marker files that a payload would
create)."""

from __future__ import annotations

import copyreg
import logging
import os
import pickle
import pickletools
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from unfog.checkpoint import (
    UnsafeCheckpointError,
    load_pickle_checkpoint,
    load_pickle_object,
    load_state_dict,
    save_safetensors,
)
from unfog.checkpoint import pickle_reader


def _weights() -> dict[str, torch.Tensor]:
    """Every dtype SD files use, views sharing one storage, a 0-dim and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "fp32": torch.randn(4, 5, generator=g),
        "fp16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "int64": torch.arange(10),
        "int32": torch.arange(-3, 3, dtype=torch.int32),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "base": base,
        "transposed": base.t(),
        "sliced": base[1:4, ::2],
        "column": base[:, 3],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(ref)
    for k, r in ref.items():
        t = ours[k]
        assert type(t) is torch.Tensor, k
        layout = lambda x: (x.dtype, x.shape, x.stride(), x.storage_offset())  # noqa: E731
        assert layout(t) == layout(r), k
        assert torch.equal(t, r.detach()), k


def _write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, byteorder=b"little") -> Path:
    """A checkpoint laid out as torch.save lays it out, with a data.pkl of our choosing."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", b"3\n")
    return path


def _globals_in(data: bytes) -> set[str]:
    """The globals a pickle names, read by pickletools without running anything."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return names


class _Reduce:
    """Pickles as a call to ``fn(*args)``: the classic pickle payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _FakeModelCheckpoint:
    """Stands in for Lightning's callback class; records any call the reader might make."""

    __module__ = "pytorch_lightning.callbacks.model_checkpoint"
    __qualname__ = "ModelCheckpoint"
    calls: list = []

    def __init__(self, *args):
        self.calls.append(args)


# ---------------------------------------------------------------------------------------------
# Reading what torch.save writes.


def test_round_trip_matches_torch_load(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_weights(), path)
    tensors, meta = load_pickle_checkpoint(path)
    _assert_same(tensors, torch.load(path, weights_only=True))
    assert meta == {}
    # views keep sharing their storage, as with torch.load
    ptr = tensors["base"].untyped_storage().data_ptr()
    assert all(tensors[k].untyped_storage().data_ptr() == ptr for k in ("transposed", "sliced", "column"))


def test_nested_state_dict_is_unwrapped_and_plain_values_become_metadata(tmp_path, caplog):
    path = tmp_path / "sd.ckpt"
    opt_state = [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}]
    torch.save({"state_dict": _weights(), "global_step": 5, "epoch": 2, "optimizer_states": opt_state}, path)
    with caplog.at_level(logging.INFO, logger=pickle_reader.__name__):
        tensors, meta = load_pickle_checkpoint(path)
    _assert_same(tensors, torch.load(path, weights_only=True)["state_dict"])
    assert meta == {"global_step": 5, "epoch": 2}
    assert "optimizer_states" in caplog.text


def test_whole_object_graph_keeps_nested_dicts_and_integer_keys(tmp_path):
    """A1111's hypernetwork files key by context width (int) and nest state dicts in lists;
    embedding files nest {'*': tensor} dicts: ``load_pickle_object`` returns the graph as
    ``torch.load(weights_only=True)`` does."""
    path = tmp_path / "hn.pt"
    obj = {768: [_weights(), _weights()], "layer_structure": [1, 2, 1], "name": "x", "step": 7,
           "string_to_param": {"*": torch.randn(2, 4)}, "pair": (1, None, 2.5)}
    torch.save(obj, path)
    ours, theirs = load_pickle_object(path), torch.load(path, weights_only=True)
    assert ours.keys() == theirs.keys() and isinstance(next(iter(ours)), int)
    for k in (768,):
        assert len(ours[k]) == 2
        for a, b in zip(ours[k], theirs[k]):
            _assert_same(a, b)
    assert ours["layer_structure"] == [1, 2, 1] and ours["pair"] == (1, None, 2.5) and ours["step"] == 7
    torch.testing.assert_close(ours["string_to_param"]["*"], theirs["string_to_param"]["*"], rtol=0, atol=0)


def test_module_state_dict_and_parameters(tmp_path):
    """``state_dict()`` is an OrderedDict with ``_metadata`` (set by BUILD); Parameters unwrap."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    path = tmp_path / "net.pth"
    torch.save({"state_dict": net.state_dict(), "param": torch.nn.Parameter(torch.ones(2))}, path)
    tensors, _ = load_pickle_checkpoint(path)
    _assert_same(tensors, torch.load(path, weights_only=True)["state_dict"])
    path = tmp_path / "params.pt"
    torch.save({"p": torch.nn.Parameter(torch.arange(4.0))}, path)
    tensors, _ = load_pickle_checkpoint(path)
    assert type(tensors["p"]) is torch.Tensor and not tensors["p"].requires_grad
    assert torch.equal(tensors["p"], torch.arange(4.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_big_endian_storages_are_swapped(tmp_path, dtype):
    ref = (torch.arange(-6, 6) * 0.75).to(dtype).view(3, 4)
    torch.save({"x": ref}, tmp_path / "le.pt")
    with zipfile.ZipFile(tmp_path / "le.pt") as z:  # records sit under "<file stem>/" or "archive/"
        (raw,) = [z.read(n) for n in z.namelist() if n.endswith("/data/0")]
        (pkl,) = [z.read(n) for n in z.namelist() if n.endswith("/data.pkl")]
    n = ref.element_size()
    swapped = b"".join(raw[i : i + n][::-1] for i in range(0, len(raw), n))
    path = _write_zip(tmp_path / "be.pt", pkl, {"0": swapped}, byteorder=b"big")
    tensors, _ = load_pickle_checkpoint(path)
    assert tensors["x"].dtype == dtype and torch.equal(tensors["x"], ref)


def test_lightning_checkpoint_with_callbacks_loads(tmp_path, monkeypatch):
    """SD-era Lightning files key ``callbacks`` by the ModelCheckpoint class and hold numpy
    scalars; those get inert placeholders (the class is never imported or called)."""
    np = pytest.importorskip("numpy")
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = _FakeModelCheckpoint
    path = tmp_path / "sd-v1-like.ckpt"
    callbacks = {_FakeModelCheckpoint: {"best_model_score": np.float64(0.25), "kth": np.arange(3)}}
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": callbacks, "global_step": 470000}, path)
    for name in names:
        monkeypatch.delitem(sys.modules, name)  # the reader must not need them
    _FakeModelCheckpoint.calls.clear()
    tensors, meta = load_pickle_checkpoint(path)
    assert list(tensors) == ["w"] and meta == {"global_step": 470000}
    assert _FakeModelCheckpoint.calls == []


# ---------------------------------------------------------------------------------------------
# load_state_dict: one entry point for every model file.


def test_load_state_dict_dispatches(tmp_path):
    w = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_safetensors(tmp_path / "m.safetensors", w, {"preset": "tiny"})
    tensors, meta = load_state_dict(tmp_path / "m.safetensors")
    assert meta == {"preset": "tiny"} and all(torch.equal(tensors[k], w[k]) for k in w)
    (tmp_path / "m.safetensors").rename(tmp_path / "renamed.ckpt")  # content decides the format
    assert torch.equal(load_state_dict(tmp_path / "renamed.ckpt")[0]["a"], w["a"])
    for ext in (".ckpt", ".pt", ".pth", ".bin"):
        torch.save({"state_dict": w, "global_step": 1}, tmp_path / f"m{ext}")
        tensors, meta = load_state_dict(tmp_path / f"m{ext}")
        assert meta == {"global_step": 1} and all(torch.equal(tensors[k], w[k]) for k in w)


def test_load_state_dict_unknown_extension_lists_accepted(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"'\.npz'.*\.safetensors, \.ckpt, \.pt, \.pth, \.bin"):
        load_state_dict(tmp_path / "m.npz")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.ckpt")


# ---------------------------------------------------------------------------------------------
# Refusing malicious files, with no side effect.


def _payloads(marker: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (the global the error must name, data.pkl)."""
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    wrap = lambda evil, protocol=2: pickle.dumps({"state_dict": {"w": evil}}, protocol=protocol)  # noqa: E731
    return {
        "os.system via __reduce__": (f"{os.system.__module__}.system", wrap(_Reduce(os.system, cmd))),
        "builtins.exec via __reduce__": ("__builtin__.exec", wrap(_Reduce(exec, code))),
        "builtins.exec, protocol 4": ("builtins.exec", wrap(_Reduce(exec, code), protocol=4)),
        # protocol 2 would spell it "commands.call" (the Python 2 name); 3 keeps "subprocess"
        "subprocess.call via __reduce__": (
            "subprocess.call",
            wrap(_Reduce(subprocess.call, ["touch", str(marker)]), protocol=3),
        ),
        "posix.system by hand": ("posix.system", b"cposix\nsystem\n(S'" + cmd.encode() + b"'\ntR."),
        "os.system by hand": (
            "os.system",
            b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd.encode() + b"\x85R.",
        ),
        "eval by hand": ("builtins.eval", b"cbuiltins\neval\n(S'" + code.encode() + b"'\ntR."),
        "unknown class via INST": ("collections.Counter", b"(icollections\nCounter\n."),
    }


@pytest.mark.parametrize("name", list(_payloads(Path("m"))))
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    forbidden, pkl = _payloads(marker)[name]
    assert forbidden in _globals_in(pkl) or name.endswith("INST")  # the payload really targets it
    path = _write_zip(tmp_path / "evil.ckpt", pkl)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"'{forbidden}'")) as err:
        load_state_dict(path)
    assert "refused" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_payload_hidden_next_to_real_weights_is_refused(tmp_path):
    """A trojan written by torch.save itself: valid tensors first, the payload after them."""
    marker = tmp_path / "pwned"
    path = tmp_path / "trojan.ckpt"
    torch.save({"state_dict": _weights(), "x": _Reduce(os.system, f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        load_pickle_checkpoint(path)
    assert not marker.exists()


def test_extension_codes_go_through_the_allow_list(tmp_path):
    """EXT1 names a global through copyreg's registry; it reaches find_class all the same."""
    marker = tmp_path / "pwned"
    copyreg.add_extension("posix", "system", 0xF0)
    try:
        pkl = b"\x80\x02\x82\xf0(S'touch " + str(marker).encode() + b"'\ntR."
        with pytest.raises(UnsafeCheckpointError, match=r"'posix\.system'"):
            load_pickle_checkpoint(_write_zip(tmp_path / "ext.pt", pkl))
    finally:
        copyreg.remove_extension("posix", "system", 0xF0)
    assert not marker.exists()


def test_allowed_globals_cannot_be_rewritten_by_build(tmp_path):
    """BUILD on a handed-out global would set attributes on it; ours are immutable tuples."""
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}S'fn'\nctorch._utils\n_rebuild_parameter\ns\x86b."
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_pickle_checkpoint(_write_zip(tmp_path / "build.pt", pkl))
    assert pickle_reader._TENSOR_GLOBALS["torch._utils._rebuild_tensor_v2"].fn is pickle_reader._rebuild_tensor_v2


def test_newobj_cannot_instantiate(tmp_path):
    pkl = b"\x80\x02ccollections\nOrderedDict\n)\x81."
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_pickle_checkpoint(_write_zip(tmp_path / "newobj.pt", pkl))


def test_out_of_bounds_view_is_refused(tmp_path):
    """A crafted view that would read past its storage; as_strided is never reached."""
    storage = b"((S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n" + storage + b"I0\n(I100\nt(I1\ntI00\n}tR"
    pkl = b"}(S'w'\n" + tensor + b"u."
    path = _write_zip(tmp_path / "oob.pt", pkl, {"0": bytes(16)})
    with pytest.raises(ValueError, match=r"reaches element 99 of storage '0', which has 4 elements"):
        load_pickle_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Files that are not torch zip checkpoints, or are damaged.


def test_bare_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "bare.pt"
    path.write_bytes(pickle.dumps({"w": _Reduce(os.system, f"touch {marker}")}, protocol=2))
    with pytest.raises(ValueError, match="bare pickle"):
        load_state_dict(path)
    assert not marker.exists()


def test_legacy_format_matches_torch_load(tmp_path):
    """The pre-1.6 stream format (pytorch-fid's Inception weights use it) reads like torch.load."""
    path = tmp_path / "old.pth"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save({**_weights(), **net.state_dict()}, path, _use_new_zipfile_serialization=False)
    tensors, meta = load_state_dict(path)
    _assert_same(tensors, torch.load(path, weights_only=True))
    assert meta == {}
    ptr = tensors["base"].untyped_storage().data_ptr()
    assert all(tensors[k].untyped_storage().data_ptr() == ptr for k in ("transposed", "sliced", "column"))


def test_legacy_format_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Reduce(os.system, f"touch {marker}")}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_legacy_format_truncated_or_oversized_names_the_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=False)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 100])  # storage bytes cut short
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*legacy.*ends 100 bytes early"):
        load_state_dict(path)
    path.write_bytes(whole[: len(whole) - 3000])  # the storage cannot fit: refused before allocating
    with pytest.raises(ValueError, match="does not fit in the rest of the file"):
        load_state_dict(path)


def test_truncated_zip_names_the_file(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": _weights()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*truncated or corrupt"):
        load_state_dict(path)


def test_corrupt_storage_bytes_name_the_file(tmp_path):
    path = tmp_path / "flip.ckpt"
    torch.save({"w": torch.full((64,), 1234.5)}, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(torch.tensor(1234.5).numpy().tobytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*corrupt"):
        load_state_dict(path)


def test_archive_without_data_pkl(tmp_path):
    path = tmp_path / "empty.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", b"3\n")
    with pytest.raises(ValueError, match="exactly one data.pkl.*found none"):
        load_pickle_checkpoint(path)


def test_parameter_dict_is_read_as_an_inert_record(tmp_path):
    """Older A1111 embeddings hold ``string_to_param`` as a ``ParameterDict``: it comes back as a
    ``PickledModule`` whose ``state["_parameters"]`` has the tensors torch.load gives."""
    vec = torch.randn(3, 8)
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}), "step": 7}, path)
    obj = load_pickle_object(path)
    record = obj["string_to_param"]
    assert isinstance(record, pickle_reader.PickledModule) and obj["step"] == 7
    assert torch.equal(record.state["_parameters"]["*"], vec)


def test_build_on_the_module_class_itself_fails(tmp_path):
    """The one class handed out cannot be given attributes: BUILD on it fails, and nothing else
    (no other module class) is found by NEWOBJ."""
    pkl = b"\x80\x02ctorch.nn.modules.container\nParameterDict\n}S'x'\nK\x01sb."
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_pickle_object(_write_zip(tmp_path / "build.pt", pkl))
    assert not hasattr(pickle_reader.PickledModule, "x")
    other = b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81."
    with pytest.raises(UnsafeCheckpointError):
        load_pickle_object(_write_zip(tmp_path / "linear.pt", other))
