"""Torch-free, restricted reader of PyTorch ``.pth`` checkpoints (what ``torch.save`` writes).

``load_pth(path)`` returns the state_dict: ``{key: np.ndarray}`` for a float model; a quantized
model's entries come back as ``QTensor`` and friends (``npmnv3.io.pth_objects``). The pickle
inside is run by ``npmnv3.io.unpickle``, an allowlisted opcode interpreter, and may name only:
``collections.OrderedDict``; ``torch._utils``'s ``_rebuild_tensor``, ``_rebuild_tensor_v2``,
``_rebuild_parameter`` and ``_rebuild_qtensor`` (which here merely record a strided view of a
storage); the storage classes ``torch.FloatStorage`` ... ``BoolStorage`` and ``QInt8Storage``,
``QUInt8Storage``, ``QInt32Storage`` (dtype markers); ``torch.per_tensor_affine``,
``torch.per_channel_affine`` and ``torch.qint8`` / ``quint8`` / ``qint32`` (names). Anything else
raises ``CheckpointError`` before any of it is built. Tensor bytes are read only after the pickle
is interpreted, once every storage size and view has been checked against the bytes in the file.

Formats (torch/serialization.py: ``_save`` and ``_legacy_save``): zip (``<prefix>/data.pkl``,
``byteorder``, ``data/<key>``; records stored, not compressed) and legacy (pickles: magic,
protocol 1001, sys_info, object, sorted storage keys; then per key an int64 count and raw bytes).
Legacy storage bytes are always little-endian (torch's ``writeFileRaw`` converts on big-endian
hosts and ``torch.load`` ignores ``sys_info``).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from . import pth_objects as T
from .pth_objects import QTensor, is_quantized_state_dict
from .unpickle import CheckpointError, Policy, unpickle

__all__ = ["CheckpointError", "QTensor", "is_quantized_state_dict", "load_pth"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # {'state_dict': sd, 'epoch': 3}
# Copies made from the storages may exceed the file (bfloat16 is widened to float32, tied weights
# and views share a storage) but not by much: this bounds what overlapping views can make.
_OUTPUT_FACTOR, _OUTPUT_SLACK = 8, 16 << 20


def _is_int(x) -> bool:
    return type(x) is int


class _TorchPolicy(Policy):
    """The allowlist: torch's rebuild functions, storage types and quantization names.

    ``storages`` collects one ``StorageRef`` per key; ``None`` forbids persistent ids.
    """

    def __init__(self, storages: dict | None):
        self.storages = storages

    def find_global(self, module, name):
        found = T.GLOBALS.get((module, name))
        if found is not None:
            return found
        if (module, name) in T.UNSUPPORTED:
            what = T.UNSUPPORTED[module, name]
            raise CheckpointError(f"unsupported {what} {f'{module}.{name}'!r}")
        return super().find_global(module, name)

    def call(self, func, args):
        if isinstance(func, T.Rebuild):
            return func(args)
        raise CheckpointError(f"refusing to call {T.describe(func)}: not callable")

    def newobj(self, cls, args):
        if cls is T.ORDERED_DICT:  # Lib/copyreg.py __newobj__ of an OrderedDict
            return cls(args)
        return super().newobj(cls, args)

    def build(self, inst, state):
        if type(inst) is T.OrderedDict:
            return inst.setstate(state)
        return super().build(inst, state)

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"refusing persistent id {T.describe(pid)}: only "
                                  f"('storage', ...) is allowed")
        _, stype, key, _location, numel = pid[:5]  # location ('cpu', 'cuda:0') is ignored
        if not (isinstance(stype, T.StorageType) and type(key) is str and _is_int(numel)):
            raise CheckpointError(f"malformed storage persistent id {T.describe(pid)}")
        if len(key) > 64:  # torch's keys are decimal numbers
            raise CheckpointError(f"storage key of {len(key)} characters")
        if not 0 <= numel < 2**62 or (len(pid) == 6 and pid[5] is not None):
            raise CheckpointError(f"unsupported storage {key!r}: bad numel or legacy view")
        if self.storages is None:
            raise CheckpointError("unexpected storage reference outside the object pickle")
        ref = self.storages.setdefault(key, T.StorageRef(stype, key, numel))
        if ref != (stype, key, numel):
            raise CheckpointError(f"storage {key!r} declared twice with different types")
        return ref

    def describe(self, obj):
        return T.describe(obj)


# --- the two container formats -----------------------------------------------------------------


def _open_zip(f):
    try:
        return zipfile.ZipFile(f)
    except Exception as e:  # zipfile's parser: BadZipFile, EOFError, OSError, ValueError, ...
        raise CheckpointError(f"corrupt zip archive ({type(e).__name__}: {e})") from None


def _read_zip(f, file_size: int):
    """Interpret ``<prefix>/data.pkl``; return (object, storage loader)."""
    zf = _open_zip(f)
    members = {info.filename: info for info in zf.infolist()}
    pickles = [name for name in members if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"zip archive has {len(pickles)} '<prefix>/data.pkl' records, not 1")
    prefix = pickles[0][: -len("data.pkl")]  # the saved file's stem + '/', or 'archive/'

    def read(name: str, expected_size: int | None = None, what: str = "") -> bytes:
        info = members.get(name)
        if info is None:
            raise CheckpointError(f"zip archive has no record '{name}' {what}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"record '{name}' is compressed; torch stores records as is")
        if expected_size is not None and info.file_size != expected_size:
            raise CheckpointError(
                f"record '{name}' holds {info.file_size} bytes, expected {expected_size} {what}"
            )
        if info.compress_size != info.file_size:
            raise CheckpointError(f"record '{name}' is stored, but its directory entry gives "
                                  f"{info.compress_size} and {info.file_size} bytes")
        if info.header_offset + info.file_size > file_size:
            raise CheckpointError(f"record '{name}' extends past the end of the file")
        try:
            return zf.read(info)
        except Exception as e:  # zipfile: bad local header, CRC mismatch, truncation
            raise CheckpointError(f"corrupt record '{name}' ({type(e).__name__}: {e})") from None

    byteorder = "little"  # files older than torch 2.1 have no byteorder record
    if prefix + "byteorder" in members:
        byteorder = read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"unknown byteorder {byteorder[:20]!r}")
    storages: dict[str, T.StorageRef] = {}
    obj, _ = unpickle(read(prefix + "data.pkl"), _TorchPolicy(storages),
                      where=f"'{prefix}data.pkl'")

    def load_storage(ref: T.StorageRef) -> np.ndarray:
        nbytes = ref.numel * ref.stype.dtype.itemsize
        what = f"(storage {ref.key!r}: {ref.numel} x {ref.stype.name})"
        return ref.stype.decode(read(f"{prefix}data/{ref.key}", nbytes, what), byteorder)

    return obj, load_storage


def _read_legacy(data: bytes):
    """Interpret the pickles of a legacy (non-zip) stream; return (object, storage loader)."""
    header = Policy()  # magic, protocol, sys_info and the key list hold no globals at all
    magic, pos = unpickle(data, header, where="the legacy magic-number pickle")
    if not _is_int(magic) or magic != _LEGACY_MAGIC:
        raise CheckpointError("a pickle, but not a torch checkpoint (no legacy magic number)")
    protocol, pos = unpickle(data, header, start=pos, where="the legacy protocol pickle")
    if not _is_int(protocol) or protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy protocol version {T.describe(protocol)}")
    sys_info, pos = unpickle(data, header, start=pos, where="the legacy sys_info pickle")
    if not isinstance(sys_info, dict):  # torch.load ignores its contents too
        raise CheckpointError("malformed legacy sys_info record")
    storages: dict[str, T.StorageRef] = {}
    obj, pos = unpickle(data, _TorchPolicy(storages), start=pos, where="the legacy object pickle")
    keys, pos = unpickle(data, header, start=pos, where="the legacy storage-key pickle")
    if (type(keys) is not list or len(keys) != len(storages)
            or not all(type(k) is str for k in keys) or set(keys) != set(storages)):
        raise CheckpointError("legacy storage key list does not match the storages referenced")
    spans = {}  # key -> (start, stop) of the raw bytes in `data`
    for key in keys:
        ref = storages[key]
        if pos + 8 > len(data):
            raise CheckpointError(f"file ends before the element count of storage {key!r}")
        count, start = int.from_bytes(data[pos : pos + 8], "little", signed=True), pos + 8
        nbytes = count * ref.stype.dtype.itemsize
        if count != ref.numel or start + nbytes > len(data):
            raise CheckpointError(
                f"storage {key!r}: {len(data) - start} bytes left in the file and {count} "
                f"elements recorded, but {ref.numel} x {ref.stype.name} "
                f"= {ref.numel * ref.stype.dtype.itemsize} bytes declared"
            )
        spans[key] = (start, start + nbytes)
        pos = start + nbytes

    def load_storage(ref: T.StorageRef) -> np.ndarray:
        start, stop = spans[ref.key]
        return ref.stype.decode(memoryview(data)[start:stop], "little")

    return obj, load_storage


# --- from the interpreted object to a state_dict -------------------------------------------------


def _select_state_dict(obj) -> dict:
    """The dict of entries inside ``obj``: itself, or a single known wrapper entry."""

    def is_state_dict(d):
        return isinstance(d, dict) and all(T.is_entry(v) for v in d.values())

    if not isinstance(obj, dict):
        raise CheckpointError(f"not a state_dict: the file holds {T.describe(obj)}")
    if not is_state_dict(obj):
        found = [k for k in _WRAPPER_KEYS if is_state_dict(obj.get(k))]
        if len(found) != 1:
            bad = next(k for k, v in obj.items() if not T.is_entry(v))
            raise CheckpointError(
                f"not a state_dict: entry {T.describe(bad)} is {T.describe(obj[bad])}, and "
                f"there is not exactly one wrapper entry of tensors among {list(_WRAPPER_KEYS)}"
            )
        obj = obj[found[0]]
    if not all(type(k) is str for k in obj):
        raise CheckpointError("not a state_dict: keys must be strings")
    if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _materialise(name: str, t: T.TensorRef, storage: np.ndarray) -> np.ndarray:
    """Copy the strided view ``t`` out of ``storage`` (1-D) after checking it fits."""
    size, stride, offset = t.size, t.stride, t.offset
    numel = math.prod(size)
    if len(size) != len(stride) or min(size + stride + (offset,)) < 0:
        raise CheckpointError(f"tensor {T.describe(name)}: bad view size={size} stride={stride}")
    if numel == 0:
        return np.empty(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size or numel > storage.size:
        raise CheckpointError(
            f"tensor {T.describe(name)}: view offset={offset} size={size} stride={stride} does "
            f"not fit in storage {t.storage.key!r} of {storage.size} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False
    )
    return view.copy(order="C")


class _Tensors:
    """Reads each storage once (and only those used) and copies views out, within budgets."""

    def __init__(self, load_storage, file_size: int):
        self.load_storage, self.file_size = load_storage, file_size
        self.storages: dict[str, np.ndarray] = {}
        self.stored = self.copied = 0  # bytes read from storages, bytes copied out

    def tensor(self, name: str, t: T.TensorRef) -> np.ndarray:
        ref = t.storage
        if ref.key not in self.storages:  # each fits in the file; together they must too
            # (zip records can overlap: one record's bytes can hold another whole record)
            self.storages[ref.key] = self.load_storage(ref)
            self.stored += ref.numel * ref.stype.dtype.itemsize
            if self.stored > self.file_size:
                raise CheckpointError("the storages add up to more bytes than the file holds")
        out = _materialise(name, t, self.storages[ref.key])
        self.copied += out.nbytes
        if self.copied > _OUTPUT_FACTOR * self.file_size + _OUTPUT_SLACK:
            raise CheckpointError(f"the tensors' views add up to more than {_OUTPUT_FACTOR} "
                                  f"times the file's {self.file_size} bytes (overlapping views)")
        return out


def _load(f, file_size: int) -> dict:
    head = f.read(4)
    f.seek(0)
    if not head:
        raise CheckpointError("empty file")
    if head == _ZIP_MAGIC:
        obj, load_storage = _read_zip(f, file_size)
    elif head[0] == 0x80:  # pickle's PROTO opcode
        obj, load_storage = _read_legacy(f.read())
    else:
        raise CheckpointError("not a torch checkpoint (neither a zip archive nor a pickle)")
    state = _select_state_dict(obj)
    tensors = _Tensors(load_storage, file_size)
    return {k: T.materialise_entry(k, v, tensors.tensor) for k, v in state.items()}


def load_pth(path: str | os.PathLike) -> dict:
    """Read a torch ``.pth`` state_dict without torch: ``{key: C-contiguous native ndarray}``.

    Accepts what ``torch.save`` writes (zip or legacy format), a bare state_dict or one wrapped
    as ``{'state_dict' | 'model_state_dict' | 'model': sd, ...}``; strips a common ``module.``
    prefix. Key order is the file's. Scalars (``num_batches_tracked``) come back as 0-d arrays,
    bfloat16 as float32. A quantized model's state_dict (``is_quantized_state_dict``) also holds
    ``QTensor`` entries, ``(QTensor, bias)`` tuples and dtype names (``npmnv3.io.pth_objects``).
    Raises ``CheckpointError`` (a ValueError) naming the file for anything malformed, truncated
    or not allowlisted; a missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _load(f, os.fstat(f.fileno()).st_size)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (MemoryError, RecursionError):
            raise
        except Exception as e:  # a case the checks above missed: still one line, but a bug
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({type(e).__name__}: {e})"
            ) from e
