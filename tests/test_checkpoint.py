"""npmnv3.io.pth.load_pth: torch's files read exactly, malformed and malicious files refused.

torch is the reference for what a .pth file holds; it is imported only inside the tests that need
it (``require_torch``). The malformed and malicious files are assembled by hand from pickle
opcodes (``P`` below), so those tests run without torch.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from support import randomise, require_torch, require_torchvision

from npmnv3.io import pth_objects
from npmnv3.io.pth import CheckpointError, load_pth

REPO = Path(__file__).resolve().parents[1]


def assert_same(ours: np.ndarray, ref: np.ndarray, name=""):
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count); C-contiguous, native."""
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    assert ours.flags.c_contiguous and ours.dtype.isnative, name
    assert ours.tobytes() == np.ascontiguousarray(ref).tobytes(), f"{name}: values differ"


def to_numpy(t):
    import torch

    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def save(torch, obj, path: Path, legacy=False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


# --- hand-assembled pickles (protocol 2 opcodes) ------------------------------------------------


class P:
    """Tiny pickle assembler: enough opcodes to write torch's data.pkl by hand."""

    PROTO2, STOP, REDUCE, SETITEM, NEWFALSE, BINPERSID, BUILD = (
        b"\x80\x02", b".", b"R", b"s", b"\x89", b"Q", b"b")  # fmt: skip

    @staticmethod
    def text(s: str) -> bytes:  # BINUNICODE
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    @staticmethod
    def long(n: int) -> bytes:  # LONG1 (any size)
        b = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes([len(b)]) + b

    @staticmethod
    def glob(module: str, name: str) -> bytes:  # GLOBAL
        return b"c" + f"{module}\n{name}\n".encode()

    @staticmethod
    def tup(*items: bytes) -> bytes:  # MARK ... TUPLE
        return b"(" + b"".join(items) + b"t"

    @classmethod
    def odict(cls) -> bytes:  # OrderedDict()
        return cls.glob("collections", "OrderedDict") + b")" + cls.REDUCE

    @classmethod
    def call(cls, module: str, name: str, *args: bytes) -> bytes:
        """A whole pickle calling module.name(*args): GLOBAL, TUPLE, REDUCE, STOP."""
        return cls.PROTO2 + cls.glob(module, name) + cls.tup(*args) + cls.REDUCE + cls.STOP

    @classmethod
    def state_dict(cls, numel=6, offset=0, size=(2, 3), stride=(3, 1), storage="FloatStorage",
                   key="0", legacy=False, pid=None) -> bytes:
        """``OrderedDict(w=<tensor>)`` as torch writes it, with every field under control."""
        if pid is None:
            fields = [cls.text("storage"), cls.glob("torch", storage), cls.text(key),
                      cls.text("cpu"), cls.long(numel)] + ([b"N"] if legacy else [])
            pid = cls.tup(*fields)
        tensor = cls.glob("torch._utils", "_rebuild_tensor_v2") + cls.tup(
            pid + cls.BINPERSID, cls.long(offset), cls.tup(*map(cls.long, size)),
            cls.tup(*map(cls.long, stride)), cls.NEWFALSE, cls.odict()) + cls.REDUCE
        return cls.PROTO2 + cls.odict() + cls.text("w") + tensor + cls.SETITEM + cls.STOP


W = np.arange(6, dtype=np.float32)  # the storage of P.state_dict() by default


def write_zip(path: Path, pkl: bytes, storages: dict, prefix="archive", byteorder=b"little",
              compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
    return path


def legacy_stream(obj: bytes, storages: dict, head: bytes | None = None) -> bytes:
    """Legacy layout; ``storages`` maps key -> (element count, raw little-endian bytes)."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    if head is None:
        head = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    head += pickle.dumps(1001, protocol=2) + pickle.dumps(sys_info, protocol=2)
    data = b"".join(struct.pack("<q", n) + raw for _, (n, raw) in sorted(storages.items()))
    return head + obj + pickle.dumps(sorted(storages), protocol=2) + data


def write_legacy(path: Path, obj: bytes, storages: dict, head: bytes | None = None) -> Path:
    path.write_bytes(legacy_stream(obj, storages, head))
    return path


def test_hand_assembled_files_load(tmp_path):
    """The assembler is right: its zip and legacy files load, with any archive prefix."""
    z = write_zip(tmp_path / "a.pth", P.state_dict(), {"0": W.tobytes()}, prefix="my.model")
    leg = write_legacy(tmp_path / "b.pth", P.state_dict(legacy=True), {"0": (6, W.tobytes())})
    for path in (z, str(leg)):
        out = load_pth(path)
        assert list(out) == ["w"]
        assert_same(out["w"], W.reshape(2, 3))


# --- torch's own files, read exactly ------------------------------------------------------------


def randomised_state_dict(arch: str):
    torch, torchvision = require_torch(), require_torchvision()
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    randomise(torch, model, seed=0)          # running stats would be 0/1 otherwise
    return model.state_dict()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_torchvision_round_trip(tmp_path, arch, legacy):
    torch = require_torch()
    sd = randomised_state_dict(arch)
    path = save(torch, sd, tmp_path / "my.model.weights.pth", legacy=legacy)
    if not legacy:  # the archive prefix is the file stem, not 'archive/'
        assert "my.model.weights/data.pkl" in zipfile.ZipFile(path).namelist()
    out = load_pth(path)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert_same(out[k], v.numpy(), k)
    bn = next(k for k in sd if k.endswith("num_batches_tracked"))
    assert out[bn].shape == () and out[bn].dtype == np.int64 and out[bn] > 0


def dtype_zoo(torch):
    g = torch.Generator().manual_seed(1)
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.5])
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f32_special": special,
        "f16": torch.cat([torch.randn(5, generator=g), special]).half(),
        "bf16": torch.cat([torch.randn(2, 3, generator=g).flatten(), special]).bfloat16(),
        "f64": torch.randn(4, dtype=torch.float64, generator=g),
        "i64": torch.tensor([-(2**40), 7, 2**63 - 1]),
        "i32": torch.tensor([-5, 2**31 - 1, -(2**31)], dtype=torch.int32),
        "i16": torch.tensor([-300, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar_f": torch.tensor(2.5),
        "scalar_i": torch.tensor(7),
        "empty": torch.empty(0, 3),
        "base": base,
        "view": base[1:, ::2],  # shares base's storage: offset 8, strides (8, 2)
        "rows": base[2:4],  # storage offset 16, contiguous
        "transposed": base.t(),
        "column": base[:, 3],
        "alone": torch.arange(100.0)[10:30:3],  # view whose base is not saved
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dtypes_views_and_scalars(tmp_path, legacy):
    torch = require_torch()
    zoo = dtype_zoo(torch)
    out = load_pth(save(torch, zoo, tmp_path / "zoo.pth", legacy=legacy))
    assert list(out) == list(zoo)
    for k, t in zoo.items():
        assert_same(out[k], to_numpy(t), k)
    assert out["bf16"].dtype == np.float32 and out["scalar_i"].dtype == np.int64


def byteswap_members(src: Path, dst: Path, itemsizes: list, byteorder=b"big", drop=()):
    """Rewrite a torch zip: new byteorder record, data/<i> byte-swapped by itemsizes[i]."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            name, raw = info.filename, zin.read(info)
            prefix, _, rest = name.partition("/")
            if rest in drop:
                continue
            if rest == "byteorder":
                raw = byteorder
            elif rest.startswith("data/") and byteorder == b"big":
                n = itemsizes[int(rest[len("data/"):])]
                raw = np.frombuffer(raw, np.uint8).reshape(-1, n)[:, ::-1].tobytes()
            zout.writestr(name, raw)
    return dst


def test_big_endian_zip(tmp_path):
    torch = require_torch()
    zoo = {k: t for k, t in dtype_zoo(torch).items() if t._base is None and t.numel()}
    src = save(torch, zoo, tmp_path / "le.pth")
    members = [n for n in zipfile.ZipFile(src).namelist() if "/data/" in n]
    assert len(members) == len(zoo)  # one storage per tensor, keys 0..N-1 in dict order
    big = byteswap_members(src, tmp_path / "be.pth", [t.element_size() for t in zoo.values()])
    for k, t in torch.load(big).items():  # torch agrees the rewritten file is valid
        assert_same(to_numpy(t), to_numpy(zoo[k]), k)
    out = load_pth(big)
    for k, t in zoo.items():
        assert_same(out[k], to_numpy(t), k)


def test_byteorder_record_missing_or_bad(tmp_path):
    torch = require_torch()
    zoo = {"a": torch.randn(3), "b": torch.tensor([1, 2])}
    src = save(torch, zoo, tmp_path / "src.pth")
    old = byteswap_members(src, tmp_path / "old.pth", [], byteorder=None, drop=("byteorder",))
    assert_same(load_pth(old)["a"], zoo["a"].numpy())  # no record: little-endian
    bad = byteswap_members(src, tmp_path / "bad.pth", [], byteorder=b"middle")
    with pytest.raises(CheckpointError, match="byteorder"):
        load_pth(bad)


def tiny_model(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))


def wrapped(torch, sd, kind):
    model = tiny_model(torch)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    return {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "meta": {"arch": "x", "lr": 0.1}},
        "model": {"model": sd},
        "model_state_dict": {"epoch": 3, "model_state_dict": sd,
                             "optimizer": opt.state_dict(), "extra": [None, True, (1, 2.5)]},
        "module": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
        "wrapped_module": {"state_dict": {"module." + k: v for k, v in sd.items()}},
    }[kind]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "kind", ["bare", "state_dict", "model", "model_state_dict", "module", "wrapped_module"])
def test_wrappers_unwrapped(tmp_path, kind, legacy):
    torch = require_torch()
    sd = tiny_model(torch).state_dict()
    out = load_pth(save(torch, wrapped(torch, sd, kind), tmp_path / "w.pth", legacy=legacy))
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert_same(out[k], v.numpy(), k)


def test_prefix_kept_unless_on_every_key(tmp_path):
    torch = require_torch()
    sd = {"module.a": torch.ones(2), "b": torch.zeros(1)}
    assert list(load_pth(save(torch, sd, tmp_path / "m.pth"))) == ["module.a", "b"]


@pytest.mark.parametrize("obj, match", [
    ("both", "not a state_dict"),
    ("extra", "not a state_dict: entry 'epoch'"),
    ("list", "not a state_dict: the file holds a list"),
    ("tensor", "not a state_dict: the file holds a tensor"),
    ("int_keys", "keys must be strings"),
])  # fmt: skip
def test_not_a_state_dict(tmp_path, obj, match):
    torch = require_torch()
    t = torch.ones(2)
    obj = {"both": {"state_dict": {"a": t}, "model": {"a": t}}, "extra": {"a": t, "epoch": 3},
           "list": [t], "tensor": t, "int_keys": {0: t}}[obj]
    with pytest.raises(CheckpointError, match=match):
        load_pth(save(torch, obj, tmp_path / "x.pth"))


# --- malicious pickles: refused before anything runs --------------------------------------------


class Reduce:
    """Pickles as ``fn(*args)`` (GLOBAL fn, args, REDUCE) like any malicious payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(sentinel: Path) -> dict:
    from numpy.testing._private.utils import runstring

    code = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": P.call("os", "system", P.text(f"touch {sentinel}")),
        "posix.system": pickle.dumps(Reduce(os.system, f"touch {sentinel}"), protocol=2),
        "builtins.exec": pickle.dumps(Reduce(exec, code), protocol=2, fix_imports=False),
        "__builtin__.eval": pickle.dumps(Reduce(eval, code), protocol=2),  # Python 2 name
        "numpy.testing._private.utils.runstring":
            pickle.dumps(Reduce(runstring, code, {}), protocol=2),
        "subprocess.Popen": pickle.dumps(Reduce(subprocess.Popen, ["touch", str(sentinel)]),
                                         protocol=2, fix_imports=False),
    }


PAYLOADS = list(payloads(Path("x")))


@pytest.mark.parametrize("name", PAYLOADS)
def test_payloads_are_live(tmp_path, name):
    """Control: plain pickle.loads does run each payload, so the refusals below mean something."""
    sentinel = tmp_path / "SENTINEL"
    result = pickle.loads(payloads(sentinel)[name])
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert sentinel.exists()


@pytest.mark.parametrize("where", ["zip", "legacy_object", "legacy_magic"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_malicious_global_refused(tmp_path, name, where):
    sentinel = tmp_path / "SENTINEL"
    evil = payloads(sentinel)[name]
    if where == "zip":
        path = write_zip(tmp_path / "evil.pth", evil, {}, prefix="evil")
    elif where == "legacy_object":
        path = write_legacy(tmp_path / "evil.pth", evil, {})
    else:
        path = write_legacy(tmp_path / "evil.pth", P.state_dict(legacy=True), {}, head=evil)
    with pytest.raises(CheckpointError, match=f"refusing to load global '{name}'"):
        load_pth(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_payload_inside_torch_checkpoint(tmp_path, legacy):
    torch = require_torch()
    sentinel = tmp_path / "SENTINEL"
    obj = {"w": torch.ones(3), "x": Reduce(os.system, f"touch {sentinel}")}
    with pytest.raises(CheckpointError, match="refusing to load global 'posix.system'"):
        load_pth(save(torch, obj, tmp_path / "evil.pth", legacy=legacy))
    assert not sentinel.exists()


BUILD_ON_FUNCTION = (P.PROTO2 + P.glob("torch._utils", "_rebuild_tensor_v2")
                     + P.tup(b"N", b"}" + P.text("__defaults__") + P.tup(P.long(1)) + P.SETITEM)
                     + P.BUILD + P.STOP)  # fmt: skip
BUILD_ON_ODICT = P.PROTO2 + P.odict() + b"}" + P.text("update") + b"N" + P.SETITEM + P.BUILD + b"."


FORBIDDEN = {  # name: (data.pkl, expected message)
    "stack_global": (pickle.dumps(Reduce(os.system, "true"), protocol=4),
                     "refusing pickle opcode"),
    "binbytes": (pickle.dumps(b"bytes", protocol=3), "refusing pickle opcode SHORT_BINBYTES"),
    "os.system": (P.PROTO2 + b"cos\nsystem\n" + b"\x85" + P.STOP,
                  "refusing to load global 'os.system'"),
    "torch.load": (P.PROTO2 + b"ctorch\nload\n.", "refusing to load global 'torch.load'"),
    "numpy.load": (P.PROTO2 + b"cnumpy\nload\n.", "refusing to load global 'numpy.load'"),
    "build_function": (BUILD_ON_FUNCTION, "refusing to BUILD torch._utils._rebuild_tensor_v2"),
    "build_odict": (BUILD_ON_ODICT, "refusing to BUILD an OrderedDict"),
    "pid_module": (P.state_dict(pid=P.tup(P.text("module"), P.text("x"))),
                   "refusing persistent id"),
    "pid_int": (P.state_dict(pid=P.long(0)), "refusing persistent id"),
    "call_storage": (P.call("torch", "FloatStorage", P.long(1)), "not callable"),
}


@pytest.mark.parametrize("name", FORBIDDEN)
def test_forbidden_pickle_constructs(tmp_path, name):
    pkl, match = FORBIDDEN[name]
    with pytest.raises(CheckpointError, match=match):
        load_pth(write_zip(tmp_path / "x.pth", pkl, {"0": W.tobytes()}))
    assert pth_objects._rebuild_tensor_v2.__defaults__ == (None,)  # nothing was mutated


# --- malformed files: one clear CheckpointError naming the path ---------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated(tmp_path, legacy):
    torch = require_torch()
    full = save(torch, {"a": torch.randn(50), "b": torch.tensor(3)}, tmp_path / "f.pth",
                legacy=legacy).read_bytes()
    assert load_pth(tmp_path / "f.pth")
    n = len(full)
    for cut in sorted({1, 2, 3, 4, 10, 50, 100, n // 3, n // 2, n - 300, n - 100, n - 22,
                       n - 8, n - 1}):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ")):
            load_pth(path)


def test_garbage_files(tmp_path):
    rng = np.random.default_rng(0)
    files = {
        "empty": b"",
        "random": rng.bytes(1000),
        "random_pickle": b"\x80" + rng.bytes(1000),
        "random_zip": b"PK\x03\x04" + rng.bytes(1000),
        "text": b"just some text\nnot a checkpoint\n",
        "plain_pickle": pickle.dumps({"w": [1, 2]}, protocol=2),
    }
    for name, data in files.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ")) as info:
            load_pth(path)
        assert type(info.value) is CheckpointError
    with pytest.raises(FileNotFoundError):
        load_pth(tmp_path / "missing.pth")


def zip_with(path: Path, records: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("records, match", [
    ({"archive/version": b"3\n"}, "0 '<prefix>/data.pkl' records"),
    ({"data.pkl": P.state_dict(), "data/0": W.tobytes()}, "0 '<prefix>/data.pkl' records"),
    ({"a/data.pkl": P.state_dict(), "b/data.pkl": P.state_dict()}, "2 '<prefix>/data.pkl'"),
    ({"archive/data.pkl": P.state_dict()}, "no record 'archive/data/0'"),
    ({"archive/data.pkl": b"\x80\x02"}, "truncated"),
])  # fmt: skip
def test_bad_zip_layout(tmp_path, records, match):
    with pytest.raises(CheckpointError, match=match):
        load_pth(zip_with(tmp_path / "z.pth", records))


def test_compressed_record_refused(tmp_path):
    path = write_zip(tmp_path / "c.pth", P.state_dict(), {"0": W.tobytes()},
                     compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="compressed"):
        load_pth(path)


def test_huge_declared_numel_is_not_allocated(tmp_path):
    t0 = time.perf_counter()
    z = write_zip(tmp_path / "z.pth", P.state_dict(numel=10**12), {"0": W.tobytes()})
    with pytest.raises(CheckpointError, match=r"'archive/data/0' holds 24 bytes, expected "
                                              r"4000000000000 \(storage '0': 1000000000000 x"):
        load_pth(z)
    pkl = P.state_dict(numel=10**12, legacy=True)
    for count in (10**12, 6):  # the recorded count agrees with the pickle, or not
        leg = write_legacy(tmp_path / f"l{count}.pth", pkl, {"0": (count, W.tobytes())})
        with pytest.raises(CheckpointError, match="4000000000000 bytes declared"):
            load_pth(leg)
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("raw", [W.tobytes()[:20], W.tobytes() + b"\0" * 4, b""])
def test_storage_size_mismatch(tmp_path, raw):
    path = write_zip(tmp_path / "s.pth", P.state_dict(), {"0": raw})
    match = f"data/0' holds {len(raw)} bytes, expected 24 .storage '0'"
    with pytest.raises(CheckpointError, match=match):
        load_pth(path)
    leg = write_legacy(tmp_path / "l.pth", P.state_dict(legacy=True), {"0": (6, raw)})
    if len(raw) < 24:  # a longer legacy record just leaves trailing bytes, as torch allows
        with pytest.raises(CheckpointError, match="storage '0'"):
            load_pth(leg)


@pytest.mark.parametrize("view, match", [
    (dict(offset=1), "does not fit"),
    (dict(size=(3, 3)), "does not fit"),
    (dict(size=(2, 3), stride=(4, 1)), "does not fit"),
    (dict(size=(10**6, 10**6), stride=(0, 0)), "does not fit"),  # 10**12 elements from 6
    (dict(size=(2, 3), stride=(1,)), "bad view"),
    (dict(size=(2, 3), stride=(3, -1), offset=2), "bad view"),
    (dict(offset=-1), "bad view"),
    (dict(storage="ComplexFloatStorage"), "refusing to load global 'torch.ComplexFloatStorage'"),
    (dict(key="7"), "no record 'archive/data/7'"),
])  # fmt: skip
def test_view_outside_storage(tmp_path, view, match):
    with pytest.raises(CheckpointError, match=match):
        load_pth(write_zip(tmp_path / "v.pth", P.state_dict(**view), {"0": W.tobytes()}))


def test_views_inside_storage_and_empty(tmp_path):
    pkl = P.state_dict(offset=5, size=(), stride=())
    assert_same(load_pth(write_zip(tmp_path / "a.pth", pkl, {"0": W.tobytes()}))["w"],
                np.array(5, np.float32))
    pkl = P.state_dict(numel=0, size=(0, 4), stride=(4, 1))
    assert_same(load_pth(write_zip(tmp_path / "b.pth", pkl, {"0": b""}))["w"],
                np.empty((0, 4), np.float32))


def test_legacy_keys_must_match_storages(tmp_path):
    stream = legacy_stream(P.state_dict(legacy=True), {"1": (6, W.tobytes())})
    (tmp_path / "k.pth").write_bytes(stream)
    with pytest.raises(CheckpointError, match="key list"):
        load_pth(tmp_path / "k.pth")


def test_package_never_imports_torch(tmp_path):
    path = write_zip(tmp_path / "a.pth", P.state_dict(), {"0": W.tobytes()})
    code = ("import sys; from npmnv3.io.pth import load_pth; load_pth(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env, cwd=tmp_path)
