"""load_pth on quantized checkpoints: torchvision's int8 MobileNetV3 read exactly, without torch.

References are torch's own accessors on the tensors torch.load(weights_only=True) gives back for
the same file (``q.int_repr()``, ``q.q_scale()``, ``q.q_per_channel_scales()``, ...), compared
for exact equality. The models are torchvision's quantized MobileNetV3-Large (``quantize=True``,
``weights=None``: QAT-prepared and converted, nothing downloaded), the Small one built the same
way through torchvision's own ``_mobilenet_v3_model``, and a small calibrated one (random batch
norm, two batches through the observers), on the qnnpack (per-tensor weights) and fbgemm / x86
(per-channel weights) engines.
"""

from __future__ import annotations

import functools
import struct
import warnings
import zipfile

import numpy as np
import pytest
from support import require_torch, require_torchvision
from test_checkpoint import P, assert_same, save, write_zip
from test_checkpoint_fuzz import tiny_quantized

import npmnv3
from npmnv3.io.pth import CheckpointError, QTensor, is_quantized_state_dict, load_pth

ENGINES = ["qnnpack", "fbgemm", "x86"]


@functools.cache
def quantized_state_dict(arch: str, engine: str) -> dict:
    torch = require_torch()
    require_torchvision()
    from torchvision.models.quantization import mobilenetv3 as qm

    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch has no {engine} engine on this machine")

    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # Linear weights are packed for this engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notices for quantized dtypes
            if arch == "tiny":
                return tiny_quantized(torch, engine).state_dict()
            conf = qm._mobilenet_v3_conf(f"mobilenet_v3_{arch}")
            torch.manual_seed(0)
            return qm._mobilenet_v3_model(*conf, weights=None, progress=False, quantize=True,
                                          backend=engine).state_dict()
    finally:
        torch.backends.quantized.engine = old


def torch_load(path):
    torch = require_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # _rebuild_qtensor: "TypedStorage is deprecated"
        return torch.load(path, weights_only=True)


def torch_name(x) -> str:  # torch.qint8 -> 'qint8', torch.per_channel_affine -> ...
    return str(x).rpartition(".")[2]


def assert_same_qtensor(ours, ref, name=""):
    assert isinstance(ours, QTensor), f"{name}: {type(ours).__name__}"
    assert_same(ours.int_repr, ref.int_repr().numpy(), name)
    assert (ours.dtype, ours.qscheme) == (torch_name(ref.dtype), torch_name(ref.qscheme())), name
    if ours.axis is None:
        assert (ours.scale, ours.zero_point) == (ref.q_scale(), ref.q_zero_point()), name
        assert type(ours.scale) is float and type(ours.zero_point) is int, name
    else:
        assert ours.axis == ref.q_per_channel_axis(), name
        assert_same(ours.scale, ref.q_per_channel_scales().numpy(), name)
        assert_same(ours.zero_point, ref.q_per_channel_zero_points().numpy(), name)
    assert_same(ours.dequantize(), ref.dequantize().numpy(), f"{name} dequantized")


def assert_same_entry(ours, ref, name):
    torch = require_torch()
    if isinstance(ref, torch.Tensor) and ref.is_quantized:
        assert_same_qtensor(ours, ref, name)
    elif isinstance(ref, torch.Tensor):
        assert_same(ours, ref.detach().numpy(), name)
    elif isinstance(ref, torch.dtype):  # <linear>._packed_params.dtype
        assert ours == torch_name(ref), name
    else:  # <linear>._packed_params._packed_params = (weight, bias or None)
        assert type(ours) is tuple and len(ours) == len(ref), name
        for i, (o, r) in enumerate(zip(ours, ref)):
            if r is None:
                assert o is None, f"{name}[{i}]"
            else:
                assert_same_entry(o, r, f"{name}[{i}]")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ["large", "small", "tiny"])
def test_quantized_mobilenet_v3_exact(tmp_path, arch, engine, legacy):
    torch = require_torch()
    sd = quantized_state_dict(arch, engine)
    path = save(torch, sd, tmp_path / "q.pth", legacy=legacy)
    ref = torch_load(path)
    out = load_pth(path)
    assert list(out) == list(sd) == list(ref)
    for k, v in ref.items():
        assert_same_entry(out[k], v, k)
    weights = [v for k, v in out.items() if isinstance(v, QTensor)]
    expected = "per_tensor_affine" if engine == "qnnpack" else "per_channel_affine"
    assert weights and {w.qscheme for w in weights} == {expected}
    assert {w.dtype for w in weights} == {"qint8"} and is_quantized_state_dict(out)
    fc = out["classifier.0._packed_params._packed_params"]
    assert isinstance(fc[0], QTensor) and fc[1].dtype == np.float32
    assert out["classifier.0._packed_params.dtype"] == "qint8"
    assert out["quant.scale"].shape == (1,) and out["quant.zero_point"].dtype == np.int64


def test_float_state_dict_is_not_quantized(tmp_path):
    torch, torchvision = require_torch(), require_torchvision()
    sd = torchvision.models.mobilenet_v3_small().state_dict()
    out = load_pth(save(torch, sd, tmp_path / "f.pth"))
    assert not is_quantized_state_dict(out)
    assert all(type(v) is np.ndarray for v in out.values())


def quantized_zoo(torch) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    s4 = torch.rand(4, dtype=torch.float64, generator=g) / 10 + 0.01
    s6 = torch.rand(6, dtype=torch.float64, generator=g) / 10 + 0.01
    pt8 = torch.quantize_per_tensor(x, 0.02, 3, torch.qint8)
    pc8 = torch.quantize_per_channel(x, s4, torch.randint(-3, 3, (4,), generator=g), 0,
                                     torch.qint8)
    zoo = {
        "pt_qint8": pt8,
        "pt_quint8": torch.quantize_per_tensor(x, 0.03, 128, torch.quint8),
        "pt_qint32": torch.quantize_per_tensor(x * 1e4, 0.001, -7, torch.qint32),
        "pc_qint8": pc8,
        "pc_quint8_axis1": torch.quantize_per_channel(
            x, s6, torch.randint(100, 150, (6,), generator=g), 1, torch.quint8),
        "pc_qint32": torch.quantize_per_channel(
            x * 1e4, s6, torch.randint(-5, 5, (6,), generator=g), 1, torch.qint32),
        "pt_view": pt8[1:, ::2],  # storage offset and strides
        "pt_transposed": pt8.t(),
        "pc_rows": pc8[1:3],  # two of the four channels, and their scales
        "scalar": torch.quantize_per_tensor(torch.tensor(1.5), 0.1, 0, torch.qint8),
    }
    linear = torch.ao.nn.quantized.Linear(6, 3, bias_=False)  # packed (weight, None)
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(6, 2)))
    return {**zoo, **{f"linear.{k}": v for k, v in linear.state_dict().items()},
            **{f"dynamic.{k}": v for k, v in dynamic.state_dict().items()}}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_quantized_dtypes_schemes_and_views(tmp_path, legacy):
    torch = require_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save(torch, quantized_zoo(torch), tmp_path / "zoo.pth", legacy=legacy)
    ref = torch_load(path)
    out = load_pth(path)
    assert list(out) == list(ref)
    for k, v in ref.items():
        assert_same_entry(out[k], v, k)
    assert out["linear._packed_params._packed_params"][1] is None
    assert {out[k].dtype for k in ("pt_qint8", "pt_quint8", "pt_qint32")} == {
        "qint8", "quint8", "qint32"}


# --- refusals -------------------------------------------------------------------------------------


def rewrite_pkl(src, dst, old: bytes, new: bytes):
    """Copy a torch zip with ``old`` replaced by ``new`` in its data.pkl (e.g. a GLOBAL name)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            raw = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert old in raw
                raw = raw.replace(old, new)
            zout.writestr(info.filename, raw)
    return dst


def test_unsupported_qschemes_and_dtypes_named(tmp_path):
    torch = require_torch()
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qparams = torch.quantize_per_channel(x, torch.rand(4) + 0.1, torch.rand(4), 0,
                                             torch.quint8)  # float zero points (embeddings)
        q4 = torch.quantize_per_channel(x, torch.rand(4) + 0.1, torch.rand(4), 0, torch.quint4x2)
        pt = torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)
    assert torch_name(qparams.qscheme()) == "per_channel_affine_float_qparams"
    cases = {
        "float_qparams": ({"w": qparams}, "unsupported qscheme "
                                          "'torch.per_channel_affine_float_qparams'"),
        "quint4x2": ({"w": q4}, "unsupported quantized storage 'torch.QUInt4x2Storage'"),
        "float16_dtype": ({"w": pt, "d": torch.float16},
                          "refusing to load global 'torch.float16'"),
    }
    for name, (obj, match) in cases.items():
        with pytest.raises(CheckpointError, match=match):
            load_pth(save(torch, obj, tmp_path / f"{name}.pth"))
    src = save(torch, {"w": pt}, tmp_path / "pt.pth")
    sym = rewrite_pkl(src, tmp_path / "sym.pth", b"per_tensor_affine", b"per_tensor_symmetric")
    with pytest.raises(CheckpointError, match="unsupported qscheme 'torch.per_tensor_symmetric'"):
        load_pth(sym)
    as_float = rewrite_pkl(src, tmp_path / "f.pth", b"QInt8Storage", b"FloatStorage")
    with pytest.raises(CheckpointError, match="torch.FloatStorage used by a quantized tensor"):
        load_pth(as_float)
    i8 = save(torch, {"w": torch.tensor([1, -2], dtype=torch.int8)}, tmp_path / "i8.pth")
    as_q = rewrite_pkl(i8, tmp_path / "q.pth", b"CharStorage", b"QInt8Storage")
    with pytest.raises(CheckpointError, match="QInt8Storage used by a non-quantized tensor"):
        load_pth(as_q)


def qtensor_pickle(qparams: bytes, storage="QInt8Storage") -> bytes:
    """``OrderedDict(w=<2x3 quantized tensor of storage '0'>)`` with hand-written qparams."""
    pid = P.tup(P.text("storage"), P.glob("torch", storage), P.text("0"), P.text("cpu"),
                P.long(6))
    q = P.glob("torch._utils", "_rebuild_qtensor") + P.tup(
        pid + P.BINPERSID, P.long(0), P.tup(P.long(2), P.long(3)), P.tup(P.long(3), P.long(1)),
        qparams, P.NEWFALSE, P.odict()) + P.REDUCE
    return P.PROTO2 + P.odict() + P.text("w") + q + P.SETITEM + P.STOP


def per_channel(n=2, axis=0, scales="DoubleStorage", zeros="LongStorage") -> bytes:
    def vec(key, storage):
        pid = P.tup(P.text("storage"), P.glob("torch", storage), P.text(key), P.text("cpu"),
                    P.long(n))
        return P.glob("torch._utils", "_rebuild_tensor_v2") + P.tup(
            pid + P.BINPERSID, P.long(0), P.tup(P.long(n)), P.tup(P.long(1)), P.NEWFALSE,
            P.odict()) + P.REDUCE
    return P.tup(P.glob("torch", "per_channel_affine"), vec("1", scales), vec("2", zeros),
                 P.long(axis))


def binfloat(v: float) -> bytes:
    return b"G" + struct.pack(">d", v)


INT8 = np.array([-128, -1, 0, 1, 7, 127], np.int8)
QPARAMS = {  # name: (qparams, storage of the tensor, expected message or None)
    "per_tensor": (P.tup(P.glob("torch", "per_tensor_affine"), binfloat(0.5), P.long(-3)),
                   "QInt8Storage", None),
    "per_channel": (per_channel(), "QInt8Storage", None),
    "int_scale": (P.tup(P.glob("torch", "per_tensor_affine"), P.long(1), P.long(0)),
                  "QInt8Storage", "per_tensor_affine parameters are not"),
    "no_qscheme": (P.tup(P.text("per_tensor_affine"), binfloat(0.5), P.long(0)),
                   "QInt8Storage", "quantized tensor without a qscheme"),
    "axis": (per_channel(axis=2), "QInt8Storage", "axis 2 out of range for a 2-d tensor"),
    "channels": (per_channel(n=3), "QInt8Storage", r"scales of shape \(3,\) for 2 channels"),
    "float_scales": (per_channel(scales="FloatStorage"), "QInt8Storage",
                     "scales stored as torch.FloatStorage"),
    "int_zeros": (per_channel(zeros="IntStorage"), "QInt8Storage",
                  "zero points stored as torch.IntStorage"),
    "float_zeros": (per_channel(zeros="FloatStorage"), "QInt8Storage",
                    "unsupported qscheme 'torch.per_channel_affine_float_qparams'"),
    "call_qscheme": (P.glob("torch", "per_tensor_affine") + P.tup() + P.REDUCE, "QInt8Storage",
                     "refusing to call torch.per_tensor_affine: not callable"),
}


@pytest.mark.parametrize("name", QPARAMS)
def test_hand_written_qparams(tmp_path, name):
    qparams, storage, match = QPARAMS[name]
    records = {"0": INT8.tobytes(), "1": np.array([0.5, 0.25]).tobytes(),
               "2": np.array([-3, 4], np.int64).tobytes()}
    path = write_zip(tmp_path / "q.pth", qtensor_pickle(qparams, storage), records)
    if match is not None:
        with pytest.raises(CheckpointError, match=match):
            load_pth(path)
        return
    w = load_pth(path)["w"]
    assert_same(w.int_repr, INT8.reshape(2, 3))
    zero = np.array([[-3], [4]]) if w.axis == 0 else -3
    scale = np.array([[0.5], [0.25]]) if w.axis == 0 else 0.5
    real = (INT8.reshape(2, 3).astype(np.float64) - zero) * scale  # exact in float64 and float32
    assert_same(w.dequantize(), real.astype(np.float32))


def test_tuples_only_as_packed_params(tmp_path):
    """A tuple entry is a state_dict entry only as quantized packed params."""
    torch = require_torch()
    t = torch.ones(2)
    with pytest.raises(CheckpointError, match="not a state_dict: entry 'a' is a tuple"):
        load_pth(save(torch, {"a": (t, t)}, tmp_path / "t.pth"))


def test_quantized_checkpoint_into_the_float_model_says_which_is_which(tmp_path):
    """read_weights / load_state_dict of a quantized checkpoint: one line naming it quantized
    and pointing to the int8 model, not a list of key mismatches."""
    torch = require_torch()
    sd = quantized_state_dict("small", "qnnpack")
    path = save(torch, sd, tmp_path / "q.pth")
    with pytest.raises(CheckpointError, match=r"q\.pth: a quantized \(int8\) checkpoint, not a "
                                              r"float one.*quantized_mobilenet_v3_large"):
        npmnv3.read_weights(path)
    with pytest.raises(ValueError, match="a quantized .int8. checkpoint, not a float one"):
        npmnv3.mobilenet_v3_small().load_state_dict(load_pth(path))
