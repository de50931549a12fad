"""What the pickle of a torch checkpoint may build, without torch: storages, tensors, ``QTensor``.

Every global ``npmnv3.io.pth`` allows is one of these stand-ins, never the torch object:

* ``StorageType`` (``torch.FloatStorage``, ..., ``torch.QInt8Storage``): the element type of a
  storage's bytes. Not callable, not buildable.
* ``Name`` (``torch.per_tensor_affine``, ``torch.qint8``, ...): a qscheme or dtype, by name.
* ``Rebuild`` (``torch._utils._rebuild_tensor_v2`` and friends, ``collections.OrderedDict``):
  called by REDUCE with its arguments checked; a rebuilt tensor is a ``TensorRef`` (a strided
  view, in elements, of a ``StorageRef``) or a ``QTensorRef``: the bytes are read later.

After the pickle is interpreted, ``materialise_entry`` turns each state_dict entry into arrays.
A quantized model (torch.ao.nn.quantized, e.g. torchvision's quantized MobileNetV3) saves, per
torch/_tensor.py ``Tensor._reduce_ex_internal`` and torch/_utils.py ``_rebuild_qtensor``:

* conv / linear weights: qint8 tensors, per tensor (qnnpack) or per output channel (fbgemm,
  x86), returned as ``QTensor``; float32 biases and the ``scale`` / ``zero_point`` of every
  quantized module (float32 / int64 0-d tensors) as plain arrays;
* ``<linear>._packed_params._packed_params``: the tuple ``(weight, bias)``, returned as the tuple
  ``(QTensor, np.ndarray | None)``; ``<linear>._packed_params.dtype``: ``torch.qint8``, returned
  as the string ``"qint8"``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .unpickle import CheckpointError

__all__ = ["QTensor", "is_quantized_state_dict"]

MAX_NDIM = 64  # dims of a tensor view (torch allows 64 too: at::kMaxDims... in practice <= 6)


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor as torch saved it: integers and the affine map back to real numbers.

    Per tensor (``axis`` None): ``x = (int_repr - zero_point) * scale``; per channel:
    ``x[..., c, ...] = (int_repr[..., c, ...] - zero_point[c]) * scale[c]`` with ``c`` along
    ``axis``. The fields are torch's accessors: ``int_repr`` = ``q.int_repr()`` (int8 / uint8 /
    int32 for dtype ``"qint8"`` / ``"quint8"`` / ``"qint32"``); ``scale`` = ``q.q_scale()``
    (float) or ``q.q_per_channel_scales()`` (float64 array); ``zero_point`` = ``q.q_zero_point()``
    (int) or ``q.q_per_channel_zero_points()`` (int64 array); ``axis`` =
    ``q.q_per_channel_axis()``.
    """

    int_repr: np.ndarray
    scale: float | np.ndarray
    zero_point: int | np.ndarray
    axis: int | None
    dtype: str

    @property
    def qscheme(self) -> str:
        return "per_tensor_affine" if self.axis is None else "per_channel_affine"

    @property
    def shape(self) -> tuple:
        return self.int_repr.shape

    def dequantize(self) -> np.ndarray:
        """float32 real values, rounded as torch's ``q.dequantize()`` on CPU: per tensor in
        float32, ``(float(q) - zp) * float(scale)``; per channel in float64, then float32
        (aten/src/ATen/native/quantized/cpu/kernels/QuantizedOpKernels.cpp)."""
        q = self.int_repr
        if self.axis is None:
            return (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        shape = [1] * q.ndim
        shape[self.axis] = -1
        scale, zero = self.scale.reshape(shape), self.zero_point.reshape(shape)
        return ((q.astype(np.float64) - zero) * scale).astype(np.float32)


def is_quantized_state_dict(state_dict: dict) -> bool:
    """True if ``state_dict`` (as ``load_pth`` returns it) is a quantized model's: it holds
    ``QTensor`` entries, packed ``(QTensor, bias)`` params or quantized dtype names."""
    return any(isinstance(v, (QTensor, str))
               or (type(v) is tuple and any(isinstance(x, QTensor) for x in v))
               for v in state_dict.values())


# --- stand-ins for the globals -------------------------------------------------------------------


class StorageType:
    """``torch.<Name>Storage``: the dtype of a storage's bytes (and its quantized dtype)."""

    __slots__ = ("name", "dtype", "qdtype")

    def __init__(self, name: str, dtype: str, qdtype: str | None = None):
        self.name, self.dtype, self.qdtype = name, np.dtype(dtype), qdtype

    def decode(self, raw, byteorder: str) -> np.ndarray:
        """Raw storage bytes -> 1-D native-order array (bfloat16 widened to float32)."""
        file_dtype = self.dtype.newbyteorder("<" if byteorder == "little" else ">")
        a = np.frombuffer(raw, dtype=file_dtype).astype(self.dtype.newbyteorder("="), copy=False)
        if self.name == "BFloat16Storage":  # bfloat16 = high 16 bits of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        if self.name == "BoolStorage":
            return a != 0
        return a


STORAGE_TYPES = {
    name: StorageType(name, dtype, qdtype)
    for name, dtype, qdtype in [
        ("FloatStorage", "f4", None), ("DoubleStorage", "f8", None), ("HalfStorage", "f2", None),
        ("BFloat16Storage", "u2", None), ("LongStorage", "i8", None), ("IntStorage", "i4", None),
        ("ShortStorage", "i2", None), ("CharStorage", "i1", None), ("ByteStorage", "u1", None),
        ("BoolStorage", "u1", None), ("QInt8Storage", "i1", "qint8"),
        ("QUInt8Storage", "u1", "quint8"), ("QInt32Storage", "i4", "qint32"),
    ]
}  # fmt: skip


class Name:
    """A qscheme or dtype global (``torch.per_channel_affine``, ``torch.qint8``): just a name."""

    __slots__ = ("name", "kind")

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind  # kind: "qscheme" | "dtype"

    @property
    def short(self) -> str:
        return self.name.rpartition(".")[2]


class StorageRef(NamedTuple):
    """One storage of the file, as named by a persistent id; its bytes are read later."""

    stype: StorageType
    key: str
    numel: int


class TensorRef(NamedTuple):
    """A tensor as ``_rebuild_tensor_v2`` gives it: a strided view (in elements) of a storage."""

    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple


class QTensorRef(NamedTuple):
    """A quantized tensor before its bytes are read (scale / zero_point: numbers or tensors)."""

    tensor: TensorRef
    scale: float | TensorRef
    zero_point: int | TensorRef
    axis: int | None


class OrderedDict(collections.OrderedDict):
    """``collections.OrderedDict`` that accepts torch's ``BUILD {'_metadata': ...}``, only that."""

    def setstate(self, state):
        if not isinstance(state, dict) or set(state) - {"_metadata"}:
            raise CheckpointError("refusing to BUILD an OrderedDict with state other than "
                                  "_metadata")
        self.metadata = state.get("_metadata")


class Rebuild:
    """An allowlisted callable: REDUCE calls it with a checked number of arguments."""

    __slots__ = ("name", "fn", "nargs")

    def __init__(self, name: str, fn, nargs: tuple[int, int]):
        self.name, self.fn, self.nargs = name, fn, nargs

    def __call__(self, args: tuple):
        lo, hi = self.nargs
        if not lo <= len(args) <= hi:
            raise CheckpointError(f"{self.name} called with {len(args)} arguments")
        return self.fn(*args)


# --- the rebuild functions: check the arguments, record the view ---------------------------------


def _view(storage, offset, size, stride, quantized: bool) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError("tensor rebuilt from something that is not a storage")
    if (storage.stype.qdtype is not None) != quantized:
        raise CheckpointError(f"torch.{storage.stype.name} used by a "
                              f"{'quantized' if quantized else 'non-quantized'} tensor")
    if not (type(size) in (tuple, list) and type(stride) in (tuple, list)
            and len(size) <= MAX_NDIM and len(stride) <= MAX_NDIM):
        raise CheckpointError(f"tensor size and stride must be tuples of <= {MAX_NDIM} integers")
    size, stride = tuple(size), tuple(stride)
    if not all(type(v) is int and abs(v) < 2**62 for v in (offset, *size, *stride)):
        raise CheckpointError("tensor offset, size and stride must be integers")
    return TensorRef(storage, offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _view(storage, storage_offset, size, stride, quantized=False)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta=None):
    return _view(storage, storage_offset, size, stride, quantized=False)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, TensorRef):
        raise CheckpointError("nn.Parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_qtensor(storage, storage_offset, size, stride, qparams, requires_grad, hooks):
    """torch/_utils.py ``_rebuild_qtensor``: ``qparams`` is ``(per_tensor_affine, scale: float,
    zero_point: int)`` or ``(per_channel_affine, scales (C,) float64, zero_points (C,) int64,
    axis)`` (torch/_tensor.py writes float_qparams as per_channel_affine too)."""
    t = _view(storage, storage_offset, size, stride, quantized=True)
    if not (type(qparams) is tuple and qparams and isinstance(qparams[0], Name)
            and qparams[0].kind == "qscheme"):
        raise CheckpointError("quantized tensor without a qscheme")
    if qparams[0].short == "per_tensor_affine":
        if not (len(qparams) == 3 and type(qparams[1]) is float and type(qparams[2]) is int
                and -(2**63) <= qparams[2] < 2**63):
            raise CheckpointError("per_tensor_affine parameters are not (scale, zero_point)")
        return QTensorRef(t, qparams[1], qparams[2], None)
    if len(qparams) != 4:
        raise CheckpointError("per_channel_affine parameters are not (scales, zero_points, axis)")
    _, scales, zero_points, axis = qparams
    if not (type(axis) is int and 0 <= axis < len(t.size)):
        raise CheckpointError(f"per_channel_affine axis {describe(axis)} out of range for a "
                              f"{len(t.size)}-d tensor")
    checks = (("scales", scales, "f8"), ("zero points", zero_points, "i8"))
    for what, ref, _ in checks:
        if not isinstance(ref, TensorRef):
            raise CheckpointError(f"per_channel_affine {what} are {describe(ref)}")
        if ref.size != (t.size[axis],):
            raise CheckpointError(f"per_channel_affine {what} of shape {ref.size} for "
                                  f"{t.size[axis]} channels on axis {axis}")
    if zero_points.storage.stype.dtype.kind == "f":  # what torch writes for float_qparams
        raise CheckpointError("float zero points: unsupported qscheme "
                              "'torch.per_channel_affine_float_qparams'")
    for what, ref, dtype in checks:
        if ref.storage.stype.dtype != np.dtype(dtype):
            raise CheckpointError(f"per_channel_affine {what} stored as "
                                  f"torch.{ref.storage.stype.name}")
    return QTensorRef(t, scales, zero_points, axis)


def _ordered_dict():
    return OrderedDict()


ORDERED_DICT = Rebuild("collections.OrderedDict", _ordered_dict, (0, 0))

GLOBALS = {
    ("collections", "OrderedDict"): ORDERED_DICT,
    **{("torch._utils", f.__name__): Rebuild(f"torch._utils.{f.__name__}", f, nargs)
       for f, nargs in [(_rebuild_tensor, (4, 4)), (_rebuild_tensor_v2, (6, 7)),
                        (_rebuild_parameter, (3, 3)), (_rebuild_qtensor, (7, 7))]},
    **{("torch", name): stype for name, stype in STORAGE_TYPES.items()},
    **{("torch", name): Name(f"torch.{name}", "qscheme")
       for name in ("per_tensor_affine", "per_channel_affine")},
    **{("torch", name): Name(f"torch.{name}", "dtype") for name in ("qint8", "quint8", "qint32")},
}  # fmt: skip

UNSUPPORTED = {  # known torch globals refused with a clearer message than "refusing to load"
    **{("torch", q): "qscheme" for q in ("per_tensor_symmetric", "per_channel_symmetric",
                                          "per_channel_affine_float_qparams")},
    **{("torch", d): "quantized dtype" for d in ("quint4x2", "quint2x4")},
    **{("torch", s): "quantized storage" for s in ("QUInt4x2Storage", "QUInt2x4Storage")},
}  # fmt: skip


def describe(obj) -> str:
    """A short name for anything the pickle built, for error messages (never a full repr)."""
    if isinstance(obj, (StorageType, Name, Rebuild)):
        return obj.name if not isinstance(obj, StorageType) else f"torch.{obj.name}"
    if isinstance(obj, OrderedDict):
        return "an OrderedDict"
    if isinstance(obj, TensorRef):
        return "a tensor"
    if isinstance(obj, StorageRef):
        return "a storage"
    if isinstance(obj, QTensorRef):
        return "a quantized tensor"
    if type(obj) in (str, bytes):
        return repr(obj[:60])
    if type(obj) in (int, float, bool, type(None)):
        return repr(obj)[:40]
    return f"a {type(obj).__name__}"


# --- state_dict entries --------------------------------------------------------------------------


def is_entry(v) -> bool:
    """A tensor, a quantized tensor, packed ``(qweight, bias)`` params or a quantized dtype."""
    if isinstance(v, (TensorRef, QTensorRef)):
        return True
    if isinstance(v, Name):
        return v.kind == "dtype"
    return (type(v) is tuple and 1 <= len(v) <= 2 and isinstance(v[0], QTensorRef)
            and all(x is None or isinstance(x, TensorRef) for x in v[1:]))


def materialise_entry(name: str, v, tensor):
    """The entry with its data: ``tensor(name, TensorRef) -> ndarray`` reads and copies views."""
    if isinstance(v, TensorRef):
        return tensor(name, v)
    if isinstance(v, QTensorRef):
        scale, zero = v.scale, v.zero_point
        if v.axis is not None:
            scale, zero = tensor(f"{name} scales", scale), tensor(f"{name} zero points", zero)
        return QTensor(tensor(name, v.tensor), scale, zero, v.axis, v.tensor.storage.stype.qdtype)
    if isinstance(v, Name):
        return v.short
    return tuple(None if x is None else materialise_entry(f"{name}[{i}]", x, tensor)
                 for i, x in enumerate(v))
