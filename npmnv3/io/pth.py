"""Torch-free, restricted reader of PyTorch ``.pth`` checkpoints (what ``torch.save`` writes).

``load_pth(path)`` returns the state_dict as a plain ``dict[str, np.ndarray]``. The pickle inside
may name only an allowlist of globals: ``collections.OrderedDict``, ``torch._utils``'s
``_rebuild_tensor``/``_rebuild_tensor_v2``/``_rebuild_parameter`` (which here merely record a
strided view of a storage) and the storage classes ``torch.FloatStorage`` ... ``BoolStorage``
(dtype markers). Any other global raises ``CheckpointError`` in ``find_class``, before anything
is called, and each pickle is first scanned so it uses only the opcodes torch's ``weights_only``
unpickler accepts. Tensors are copied out only after unpickling, once storage sizes and view
bounds have been checked against the bytes actually in the file.

Formats (REFERENCE.md §5): zip (``<prefix>/data.pkl``, ``byteorder``, ``data/<key>``) and legacy
(pickles: magic, protocol 1001, sys_info, object, sorted storage keys; then per key an int64
count and raw bytes). Legacy storage bytes are always little-endian (torch's ``writeFileRaw``
converts on big-endian hosts and ``torch.load`` ignores ``sys_info``).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["CheckpointError", "load_pth"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # {'state_dict': sd, 'epoch': 3}

# Opcodes torch's weights_only unpickler accepts (torch/_weights_only_unpickler.py).
_ALLOWED_OPCODES = frozenset(
    "PROTO STOP GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 "
    "TUPLE2 TUPLE3 NONE NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT "
    "BININT1 BININT2 BINFLOAT BINUNICODE SHORT_BINSTRING LONG1 BINPERSID BINGET LONG_BINGET "
    "BINPUT LONG_BINPUT".split()
)


class CheckpointError(ValueError):
    """The file is not a readable torch checkpoint, or it asks for something not allowed."""


# --- objects the unpickler may hand out --------------------------------------------------------


class _StorageType:
    """Stands in for ``torch.<Name>Storage``: the dtype of the storage bytes, nothing callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, np.dtype(dtype)

    def __setstate__(self, state):  # pickle BUILD on a storage class
        raise CheckpointError(f"refusing to BUILD torch.{self.name}")

    def decode(self, raw, byteorder: str) -> np.ndarray:
        """Raw storage bytes -> 1-D native-order array (bfloat16 widened to float32)."""
        file_dtype = self.dtype.newbyteorder("<" if byteorder == "little" else ">")
        a = np.frombuffer(raw, dtype=file_dtype).astype(self.dtype.newbyteorder("="), copy=False)
        if self.name == "BFloat16Storage":  # bfloat16 = high 16 bits of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        if self.name == "BoolStorage":
            return a != 0
        return a


_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in [
        ("FloatStorage", "f4"), ("DoubleStorage", "f8"), ("HalfStorage", "f2"),
        ("BFloat16Storage", "u2"), ("LongStorage", "i8"), ("IntStorage", "i4"),
        ("ShortStorage", "i2"), ("CharStorage", "i1"), ("ByteStorage", "u1"),
        ("BoolStorage", "u1"),
    ]
}  # fmt: skip


class _StorageRef(NamedTuple):
    """One storage of the file, as named by a persistent id; its bytes are read later."""

    stype: _StorageType
    key: str
    numel: int


class _TensorRef(NamedTuple):
    """A tensor as ``_rebuild_tensor_v2`` gives it: a strided view (in elements) of a storage."""

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


class _OrderedDict(collections.OrderedDict):
    """``collections.OrderedDict`` that tolerates torch's ``BUILD {'_metadata': ...}``."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) - {"_metadata"}:
            raise CheckpointError("refusing to BUILD an OrderedDict with state but _metadata")
        self.metadata = state.get("_metadata")


class _Allowed:
    """An allowlisted callable: callable through REDUCE, immune to BUILD."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise CheckpointError(f"refusing to BUILD {self.name}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("tensor rebuilt from something that is not a storage")
    size, stride = tuple(size), tuple(stride)
    if not (_is_int(storage_offset) and all(map(_is_int, size + stride))):
        raise CheckpointError("tensor offset, size and stride must be integers")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRef):
        raise CheckpointError("nn.Parameter rebuilt from something that is not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _OrderedDict,
    **{("torch._utils", f.__name__): _Allowed(f"torch._utils.{f.__name__}", f)
       for f in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter)},
    **{("torch", name): stype for name, stype in _STORAGE_TYPES.items()},
}  # fmt: skip


# --- restricted unpickling ---------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``_ALLOWED_GLOBALS`` and ``('storage', ...)`` persistent ids.

    ``storages`` collects one ``_StorageRef`` per key; ``None`` forbids persistent ids.
    """

    def __init__(self, file, storages: dict | None):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"refusing to load global '{module}.{name}'") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"refusing persistent id {pid!r:.80} (only 'storage' allowed)")
        _, stype, key, _location, numel = pid[:5]  # location ('cpu', 'cuda:0') is ignored
        if not (isinstance(stype, _StorageType) and isinstance(key, str) and _is_int(numel)):
            raise CheckpointError(f"malformed storage persistent id {pid!r:.80}")
        if numel < 0 or (len(pid) == 6 and pid[5] is not None):
            raise CheckpointError(f"unsupported storage {key!r}: negative numel or legacy view")
        if self.storages is None:
            raise CheckpointError("unexpected storage reference outside the object pickle")
        ref = self.storages.setdefault(key, _StorageRef(stype, key, numel))
        if ref != (stype, key, numel):
            raise CheckpointError(f"storage {key!r} declared twice with different dtype/numel")
        return ref


def _unpickle(f, storages: dict | None = None):
    """Load one pickle from ``f`` after checking that it only uses allowed opcodes."""
    start = f.tell()
    for opcode, _arg, pos in pickletools.genops(f):
        if opcode.name not in _ALLOWED_OPCODES:
            raise CheckpointError(f"refusing pickle opcode {opcode.name} at byte {pos}")
    f.seek(start)
    return _RestrictedUnpickler(f, storages).load()


# --- the two container formats -----------------------------------------------------------------


def _read_zip(f, file_size: int):
    """Unpickle ``<prefix>/data.pkl``; return (object, storage loader)."""
    zf = zipfile.ZipFile(f)
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
        if info.header_offset + info.file_size > file_size:
            raise CheckpointError(f"record '{name}' extends past the end of the file")
        return zf.read(info)

    byteorder = "little"  # files older than torch 2.1 have no byteorder record
    if prefix + "byteorder" in members:
        byteorder = read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"unknown byteorder {byteorder!r}")
    storages: dict[str, _StorageRef] = {}
    obj = _unpickle(io.BytesIO(read(prefix + "data.pkl")), storages)

    def load_storage(ref: _StorageRef) -> np.ndarray:
        nbytes = ref.numel * ref.stype.dtype.itemsize
        what = f"(storage {ref.key!r}: {ref.numel} x {ref.stype.name})"
        return ref.stype.decode(read(f"{prefix}data/{ref.key}", nbytes, what), byteorder)

    return obj, load_storage


def _read_legacy(data: bytes):
    """Unpickle the object of a legacy (non-zip) stream; return (object, storage loader)."""
    f = io.BytesIO(data)
    magic = _unpickle(f)
    if not _is_int(magic) or magic != _LEGACY_MAGIC:
        raise CheckpointError("a pickle, but not a torch checkpoint (no legacy magic number)")
    protocol = _unpickle(f)
    if not _is_int(protocol) or protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy protocol version {protocol!r:.40}")
    if not isinstance(_unpickle(f), dict):  # sys_info; torch.load ignores it too
        raise CheckpointError("malformed legacy sys_info record")
    storages: dict[str, _StorageRef] = {}
    obj = _unpickle(f, storages)
    keys = _unpickle(f)
    if not isinstance(keys, list) or set(keys) != set(storages) or len(keys) != len(storages):
        raise CheckpointError("legacy storage key list does not match the storages referenced")
    spans = {}  # key -> (start, stop) of the raw bytes in `data`
    for key in keys:
        ref = storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"file ends before the element count of storage {key!r}")
        count, start = int.from_bytes(head, "little", signed=True), f.tell()
        nbytes = count * ref.stype.dtype.itemsize
        if count != ref.numel or start + nbytes > len(data):
            raise CheckpointError(
                f"storage {key!r}: {len(data) - start} bytes left in the file and {count} "
                f"elements recorded, but {ref.numel} x {ref.stype.name} "
                f"= {ref.numel * ref.stype.dtype.itemsize} bytes declared"
            )
        spans[key] = (start, start + nbytes)
        f.seek(start + nbytes)

    def load_storage(ref: _StorageRef) -> np.ndarray:
        start, stop = spans[ref.key]
        return ref.stype.decode(memoryview(data)[start:stop], "little")

    return obj, load_storage


# --- from unpickled object to state_dict -------------------------------------------------------


def _select_state_dict(obj) -> dict:
    """The dict of ``_TensorRef`` inside ``obj``: itself, or a single known wrapper entry."""

    def is_state_dict(d):
        return isinstance(d, dict) and all(isinstance(v, _TensorRef) for v in d.values())

    def kind(x):
        return "tensor" if isinstance(x, _TensorRef) else type(x).__name__

    if not isinstance(obj, dict):
        raise CheckpointError(f"not a state_dict: the file holds a {kind(obj)}")
    if not is_state_dict(obj):
        found = [k for k in _WRAPPER_KEYS if is_state_dict(obj.get(k))]
        if len(found) != 1:
            bad = next(k for k, v in obj.items() if not isinstance(v, _TensorRef))
            raise CheckpointError(
                f"not a state_dict: entry {bad!r:.60} is a {kind(obj[bad])}, and there "
                f"is not exactly one wrapper entry of tensors among {list(_WRAPPER_KEYS)}"
            )
        obj = obj[found[0]]
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError("not a state_dict: keys must be strings")
    if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _materialise(name: str, t: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """Copy the strided view ``t`` out of ``storage`` (1-D) after checking it fits."""
    size, stride, offset = t.size, t.stride, t.offset
    numel = math.prod(size)
    if len(size) != len(stride) or min(size + stride + (offset,)) < 0:
        raise CheckpointError(f"tensor {name!r}: bad view size={size} stride={stride}")
    if numel == 0:
        return np.empty(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size or numel > storage.size:
        raise CheckpointError(
            f"tensor {name!r}: view offset={offset} size={size} stride={stride} does not fit "
            f"in storage {t.storage.key!r} of {storage.size} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False
    )
    return view.copy(order="C")


def _load(f, file_size: int) -> dict[str, np.ndarray]:
    head = f.read(4)
    f.seek(0)
    if not head:
        raise CheckpointError("empty file")
    if head == _ZIP_MAGIC:
        obj, load_storage = _read_zip(f, file_size)
    elif head[0] == pickle.PROTO[0]:
        obj, load_storage = _read_legacy(f.read())
    else:
        raise CheckpointError("not a torch checkpoint (neither a zip archive nor a pickle)")
    state = _select_state_dict(obj)
    storages = {}  # key -> decoded 1-D array; read only the storages the state_dict uses
    for t in state.values():
        if t.storage.key not in storages:
            storages[t.storage.key] = load_storage(t.storage)
    return {k: _materialise(k, t, storages[t.storage.key]) for k, t in state.items()}


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch ``.pth`` state_dict without torch: ``{key: C-contiguous native ndarray}``.

    Accepts what ``torch.save`` writes (zip or legacy format), a bare state_dict or one wrapped
    as ``{'state_dict' | 'model_state_dict' | 'model': sd, ...}``; strips a common ``module.``
    prefix. Key order is the file's. Scalars (``num_batches_tracked``) come back as 0-d arrays,
    bfloat16 as float32. Raises ``CheckpointError`` (a ValueError) naming the file for anything
    malformed, truncated or not allowlisted; a missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _load(f, os.fstat(f.fileno()).st_size)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:  # zipfile/pickle/struct/EOF/... errors from a corrupt file
            raise CheckpointError(
                f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})"
            ) from e
