"""Read ``torch.save`` checkpoints (.ckpt / .pt / .pth / .bin) without running any code from them.

Since PyTorch 1.6, ``torch.save`` writes a zip archive::

    <name>/data.pkl        the object graph, pickled (protocol 2)
    <name>/data/<key>      one raw storage per key: the bytes of a flat array of one dtype
    <name>/byteorder       "little" or "big" (absent in old files, which are little-endian)
    <name>/version, ...    bookkeeping we do not need

Tensors appear in ``data.pkl`` as ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``, where
the storage is a *persistent id* ``('storage', <dtype>Storage, key, location, numel)``.

Files written before PyTorch 1.6 (or with ``_use_new_zipfile_serialization=False``) use the
*legacy* format, one stream of five pickles and the raw storages::

    pickle(magic number 0x1950a86a20f9469cfc6c)  pickle(protocol 1001)  pickle(sys_info dict)
    pickle(the object graph)      persistent ids ('storage', <dtype>Storage, key, location, numel, None)
    pickle(sorted list of storage keys)
    per key, in that order: int64 numel, then numel * itemsize raw bytes

pytorch-fid's FID Inception weights (2019) are such a file. Both formats go through the same
restricted unpickler; a legacy storage is allocated when the graph names it (only if the bytes
left in the file can hold it) and filled from the stream afterwards.

Why this is safe
----------------
A pickle can only run code by calling an object, and the only way for a pickle to name an object is
a GLOBAL / STACK_GLOBAL opcode (or an EXT code, which the unpickler turns into the same lookup),
which goes through ``find_class``. Ours never imports anything: it answers from a fixed table of
our own small objects and raises :class:`UnsafeCheckpointError` for every other name, as soon as
the name is read and before any REDUCE could call it. So:

- REDUCE, INST and OBJ can only call what ``find_class`` handed out: our functions, which build
  tensors from bytes and take no further action, or inert placeholders, which only record their
  arguments.
- NEWOBJ / NEWOBJ_EX need a class. The one class we hand out is :class:`PickledModule`, for the
  name ``torch.nn.modules.container.ParameterDict`` (``_MODULE_GLOBALS``; older A1111 embeddings
  hold one): it defines no ``__init__`` or ``__new__`` of its own, and its
  ``__setstate__`` only stores the state (the module's ``__dict__``: tensors and plain values made
  by the same restricted unpickler). BUILD aimed at the class itself fails (its ``__setstate__``
  then lacks an argument); every other class name is refused.
- BUILD calls ``__setstate__`` or sets attributes on the object below it. Our handed-out objects are
  immutable tuples (BUILD on them fails), so a file cannot rewrite our functions for later loads;
  the objects our functions return are plain tensors, ``OrderedDict`` (``state_dict()`` sets
  ``_metadata`` on it this way) and inert records that store the state without reading it.
- Storage bytes are read by our ``persistent_load`` into fresh buffers, and every tensor view is
  checked to lie inside its storage before it is made.

Two tables make up the allow-list. ``_TENSOR_GLOBALS``: what a state dict is made of.
``_INERT_GLOBALS``: names that CompVis-era Lightning training checkpoints carry *outside* the
weights (their ``callbacks`` entry is keyed by Lightning's ``ModelCheckpoint`` class and holds numpy
scalars); ``torch.load(weights_only=True)`` refuses such files, and the SD front-ends AUTOMATIC1111
and ComfyUI allow these same names for SD ``.ckpt`` files. Here they get placeholders that are
never imported or called: those entries are dropped anyway.

What comes back: ``(tensors, metadata)``, like ``load_safetensors``. An SD ``.ckpt`` holds
``{"state_dict": {...}, "global_step": ..., "epoch": ..., "optimizer_states": ...}``; the tensors
come from ``state_dict`` (or from the top-level dict if it has no ``state_dict`` entry), and
metadata holds the plain top-level values (int, float, str, bool, None) such as ``global_step``.
Everything else (optimizer state, callbacks, non-tensor values) is dropped, with one ``INFO`` log
line naming the dropped keys. Tensors are plain (not ``nn.Parameter``) with ``requires_grad=False``.
"""

from __future__ import annotations

import logging
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

log = logging.getLogger(__name__)

# First bytes of the pre-1.6 format: PROTO 2, LONG1 of 10 bytes, then MAGIC_NUMBER 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"


class UnsafeCheckpointError(ValueError):
    """The file asks to load a global that is not on the allow-list; nothing from it was run."""


# ---------------------------------------------------------------------------------------------
# The objects find_class hands out (immutable tuples: BUILD cannot modify them), and the record
# an inert placeholder returns when called.


class _StorageType(NamedTuple):
    """``torch.FloatStorage`` and friends: only ever used as a tag inside a persistent id."""

    name: str
    dtype: torch.dtype


class _Storage(NamedTuple):
    """One storage record of the archive, read into a flat tensor of its dtype."""

    key: str
    data: torch.Tensor  # (numel,)


class _Global(NamedTuple):
    """An allowed callable global: our own function, under the name the pickle uses for it."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _Inert(NamedTuple):
    """A placeholder for a global found outside the weights; calling it only records the call."""

    name: str

    def __call__(self, *args: Any) -> _InertValue:
        return _InertValue(self.name, args)


class _InertValue:
    """What a placeholder 'returns'. BUILD stores its state here; nothing reads it."""

    __slots__ = ("name", "args", "state")

    def __init__(self, name: str, args: tuple) -> None:
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name} placeholder>"


# ---------------------------------------------------------------------------------------------
# Our reconstruction functions, standing in for the torch ones the pickle names.


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: a strided view of a storage. The hooks (always empty
    in practice, see torch's note "Don't serialize hooks") and requires_grad are ignored."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"_rebuild_tensor_v2 expects a storage record, got {type(storage).__name__}")
    if metadata:  # conj / neg bits of lazy complex views; no diffusion checkpoint has them
        raise ValueError(f"tensor in storage {storage.key!r} carries unsupported metadata {metadata!r}")
    _check_view(storage, storage_offset, size, stride)
    return storage.data.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """``torch._utils._rebuild_parameter``: an ``nn.Parameter``; we keep the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
    return data


def _ordered_dict(*args):
    """``collections.OrderedDict``: REDUCE calls it with ``()``, then SETITEMS fills it."""
    return OrderedDict(*args)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_view(storage: _Storage, offset: Any, size: Any, stride: Any) -> None:
    """Refuse views that would reach outside their storage (a corrupt or crafted file)."""
    ok = (
        _is_int(offset)
        and offset >= 0
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_int(n) and n >= 0 for n in size)
        and all(_is_int(s) and s >= 0 for s in stride)
    )
    if not ok:
        raise ValueError(
            f"malformed tensor view of storage {storage.key!r}: offset={offset!r} size={size!r} stride={stride!r}"
        )
    if 0 in size:
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.data.numel():
        raise ValueError(
            f"tensor view (offset={offset}, size={size}, stride={stride}) reaches element {last} "
            f"of storage {storage.key!r}, which has {storage.data.numel()} elements"
        )


# ---------------------------------------------------------------------------------------------
# The allow-list.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_TENSOR_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    "torch._utils._rebuild_parameter": _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    "collections.OrderedDict": _Global("collections.OrderedDict", _ordered_dict),
    **{f"torch.{name}": _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}

# Seen in SD-era Lightning checkpoints outside the state dict (the ``callbacks`` entry); the same
# names AUTOMATIC1111's modules/safe.py allows. numpy 2 renamed numpy.core to numpy._core, so
# both spellings occur.
_INERT_GLOBALS = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.callbacks.model_checkpoint",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "_codecs.encode",
        "__builtin__.set",
        "builtins.set",
    }
)


class PickledModule:
    """A pickled ``torch.nn.ParameterDict``, never built: NEWOBJ makes an empty record and BUILD
    stores the ``__dict__`` the pickle gives it in ``state`` (``state["_parameters"]`` holds the
    tensors). Nothing else happens to it."""

    __slots__ = ("state",)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "<ParameterDict record>"


# Module classes a file may hold outside a model: older A1111 textual-inversion embeddings keep
# ``string_to_param`` as a ``ParameterDict`` (A1111 reads its ``_parameters``).
_MODULE_GLOBALS = {"torch.nn.modules.container.ParameterDict": PickledModule}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` answering global lookups from the allow-list only."""

    def __init__(self, file, read_storage: Callable[[str, torch.dtype, int], _Storage], source: Path):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[full]
        if full in _INERT_GLOBALS:
            return _Inert(full)
        if full in _MODULE_GLOBALS:
            return _MODULE_GLOBALS[full]
        raise UnsafeCheckpointError(
            f"{self._source}: refused. Its pickle asks for the global '{full}', which is not one of "
            f"the tensor-building globals unfog allows, so no code from the file was run. If you "
            f"trust the file, convert it to .safetensors with PyTorch and load that instead."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # zip format: 5 entries; legacy format: a 6th, the view metadata, None unless the file holds
        # a storage view (a pre-0.4 feature no model file uses).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r} (expected a 'storage' record)")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError(f"storage {pid[2]!r} is a view of another storage (pre-0.4 torch); not supported")
        _, storage_type, key, _location, numel = pid[:5]  # location ('cpu', 'cuda:0') is ignored: all on CPU
        if not isinstance(storage_type, _StorageType):
            raise ValueError(
                f"storage {key!r} has type {storage_type!r}; supported: {', '.join(_STORAGE_DTYPES)}"
            )
        if not (isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise ValueError(f"malformed storage record {pid!r}")
        return self._read_storage(key, storage_type.dtype, numel)


# ---------------------------------------------------------------------------------------------
# The zip archive.


class _StorageReader:
    """Reads ``<prefix>data/<key>`` records into flat tensors, once per key (views share them)."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, byteorder: str):
        self.zf, self.prefix, self.byteorder = zf, prefix, byteorder
        self.cache: dict[str, _Storage] = {}

    def __call__(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key in self.cache:
            cached = self.cache[key]
            if cached.data.dtype != dtype or cached.data.numel() != numel:
                raise ValueError(f"storage {key!r} is referenced with two different dtypes or sizes")
            return cached
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise ValueError(f"storage record {name!r} is missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        if info.file_size != nbytes:
            raise ValueError(f"storage record {name!r} has {info.file_size} bytes, expected {nbytes}")
        buf = bytearray(nbytes)  # our own buffer: the tensor shares nothing with the file
        with self.zf.open(info) as f:
            got = f.readinto(buf)
        if got != nbytes:
            raise ValueError(f"storage record {name!r} ended after {got} of {nbytes} bytes")
        if nbytes == 0:
            data = torch.empty(0, dtype=dtype)
        elif self.byteorder != sys.byteorder and itemsize > 1:
            raw = torch.frombuffer(buf, dtype=torch.uint8).view(numel, itemsize)  # (numel, itemsize)
            data = raw.flip(1).contiguous().view(dtype).view(numel)
        else:
            data = torch.frombuffer(buf, dtype=dtype)
        self.cache[key] = _Storage(key, data)
        return self.cache[key]


def _sniff(path: Path) -> str:
    """"zip" or "legacy"; a clear error for files that are neither."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head == _LEGACY_MAGIC:
        return "legacy"
    if head[:1] == b"\x80":
        raise ValueError(
            f"{path} is a bare pickle, not a torch.save zip archive; unfog does not read bare "
            f"pickles. Convert it to .safetensors if you trust it."
        )
    raise ValueError(f"{path} is not a torch.save checkpoint (no zip header; truncated or corrupt?)")


def _record_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The ``<name>/`` directory that holds data.pkl (``archive/`` in files from recent torch)."""
    names = zf.namelist()
    pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(pkls) == 1:
        return pkls[0][: -len("data.pkl")]
    if not pkls and any(n.endswith("/constants.pkl") for n in names):
        raise ValueError(f"{path} is a TorchScript archive (torch.jit.save), not a state dict; not supported")
    found = "none" if not pkls else ", ".join(pkls)
    raise ValueError(f"{path}: expected exactly one data.pkl in the archive, found {found}")


def _byteorder(zf: zipfile.ZipFile, prefix: str, path: Path) -> str:
    try:
        raw = zf.read(f"{prefix}byteorder")
    except KeyError:
        return "little"  # files from before the record existed were written on little-endian hosts
    order = raw.decode("ascii", errors="replace").strip()
    if order not in ("little", "big"):
        raise ValueError(f"{path}: byteorder record says {order!r}; valid: 'little', 'big'")
    return order


# ---------------------------------------------------------------------------------------------
# The legacy (pre-1.6) stream.

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LegacyStorages:
    """Allocates each storage the graph names (zero-filled, within the bytes left in the file),
    then fills them in key order from the stream that follows the pickles."""

    def __init__(self, budget: int):
        self.budget = budget  # bytes the file still has room for
        self.storages: dict[str, _Storage] = {}

    def __call__(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        if key in self.storages:
            cached = self.storages[key]
            if cached.data.dtype != dtype or cached.data.numel() != numel:
                raise ValueError(f"storage {key!r} is referenced with two different dtypes or sizes")
            return cached
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.budget -= nbytes + 8
        if self.budget < 0:
            raise ValueError(f"storage {key!r} of {nbytes} bytes does not fit in the rest of the file")
        data = torch.zeros(numel, dtype=dtype)  # filled in place by fill(); views made now see it
        self.storages[key] = _Storage(key, data)
        return self.storages[key]

    def fill(self, f, keys: Any, byteorder: str) -> None:
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError("the storage key list is malformed")
        if sorted(keys) != sorted(self.storages):
            raise ValueError(f"the file lists storages {sorted(keys)[:5]}..., its tensors use "
                             f"{sorted(self.storages)[:5]}...")
        for key in keys:
            data = self.storages[key].data
            numel = int.from_bytes(_read_exactly(f, 8), byteorder, signed=True)
            if numel != data.numel():
                raise ValueError(f"storage {key!r} holds {numel} elements in the stream, {data.numel()} in the pickle")
            raw = bytearray(_read_exactly(f, numel * data.element_size()))
            if numel == 0:
                continue
            if byteorder != sys.byteorder and data.element_size() > 1:
                view = torch.frombuffer(raw, dtype=torch.uint8).view(numel, data.element_size()).flip(1)
                data.copy_(view.contiguous().view(data.dtype).view(numel))
            else:
                data.copy_(torch.frombuffer(raw, dtype=data.dtype))


def _read_exactly(f, n: int) -> bytes:
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"the file ends {n - len(raw)} bytes early")
    return raw


def _load_legacy(path: Path) -> Any:
    """The object graph of a legacy ``torch.save`` file, tensors filled."""

    def no_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
        raise ValueError("a storage record appears outside the object graph")

    size = path.stat().st_size
    with open(path, "rb") as f:
        header = [_RestrictedUnpickler(f, no_storage, path).load() for _ in range(3)]
        magic, protocol, sys_info = header
        if magic != _LEGACY_MAGIC_NUMBER or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
            raise ValueError(f"unexpected legacy header (magic {magic!r}, protocol {protocol!r})")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        storages = _LegacyStorages(budget=size - f.tell())
        obj = _RestrictedUnpickler(f, storages, path).load()
        keys = _RestrictedUnpickler(f, no_storage, path).load()
        storages.fill(f, keys, byteorder)
    return obj


def _split(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of the state dict, plain top-level values as metadata; drop (and log) the rest."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a whole pickled model?)")
    nested = isinstance(obj.get("state_dict"), dict)
    weights = obj["state_dict"] if nested else obj
    tensors = {k: v for k, v in weights.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped = [f"state_dict[{k!r}]" for k in weights if nested and k not in tensors]
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if (nested and k == "state_dict") or (not nested and k in tensors):
            continue
        if isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))):
            meta[k] = v
        else:
            dropped.append(repr(k))
    if dropped:
        log.info("%s: kept %d tensors; dropped non-weight entries %s", path, len(tensors), ", ".join(dropped))
    return tensors, meta


def load_pickle_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and plain metadata of a ``torch.save`` checkpoint (zip, or the legacy pre-1.6
    format), read without running code.

    Raises :class:`UnsafeCheckpointError` if the pickle names any global outside the allow-list,
    and ``ValueError`` naming the file for bare-pickle, truncated or corrupt files.
    """
    return _split(load_pickle_object(path), Path(path))


def load_pickle_object(path: str | Path) -> Any:
    """The whole object graph of a ``torch.save`` file, read without running code: nested dicts
    (integer keys included), lists, tuples, tensors and plain values, as saved. For files whose
    layout is not a flat state dict (A1111's textual-inversion embeddings and hypernetworks).
    Raises as :func:`load_pickle_checkpoint` does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if _sniff(path) == "legacy":
        try:
            return _load_legacy(path)
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RuntimeError, OSError) as err:
            raise ValueError(
                f"{path} is not a readable legacy torch checkpoint (truncated or corrupt?): {err}"
            ) from err
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is not a readable zip archive (truncated or corrupt?): {err}") from None
    with zf:
        prefix = _record_prefix(zf, path)
        reader = _StorageReader(zf, prefix, _byteorder(zf, prefix, path))
        try:
            with zf.open(f"{prefix}data.pkl") as f:
                return _RestrictedUnpickler(f, reader, path).load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RuntimeError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{path} is not a readable torch checkpoint (corrupt?): {err}") from err
