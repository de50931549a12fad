"""npmnv3.io.unpickle: pickle's semantics for the opcodes torch writes, a refusal for the rest.

Plain data pickled by ``pickle.dumps(protocol=2)`` must come back equal to ``pickle.loads`` (with
shared references still shared); hand-assembled streams check each bound and each refusal; the
two byte budgets of ``load_pth`` (overlapping views, overlapping zip records) are hit with files
made for them. No torch needed.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from test_checkpoint import P, write_zip

from npmnv3.io.pth import CheckpointError, load_pth
from npmnv3.io.unpickle import Limits, Policy, unpickle


def plain(rng, depth=0):
    """A random object of the types a checkpoint's metadata holds (no globals needed)."""
    if depth > 3 or rng.random() < 0.35:
        kind = rng.integers(7)
        if kind == 0:  # BININT1, BININT2, BININT and LONG1 ranges
            return int(rng.choice([0, 255, 256, 65535, 65536, -1, -(2**31), 2**31, -(2**70)]))
        if kind == 1:
            return float(rng.standard_normal()) if rng.random() < 0.8 else float("inf")
        if kind == 2:
            return "".join(map(chr, rng.integers(32, 0x2FF, int(rng.integers(0, 300)))))
        return [True, False, None, "", "x"][kind - 3]
    n = int(rng.integers(0, 5))
    kind = rng.integers(3)
    if kind == 0:
        return [plain(rng, depth + 1) for _ in range(n)]
    if kind == 1:
        return tuple(plain(rng, depth + 1) for _ in range(n))  # EMPTY_TUPLE, TUPLE1..3, TUPLE
    keys = ["a", 7, -3.5, None, (1, "b"), "ü" * 3, 2**80]
    return {keys[int(i)]: plain(rng, depth + 1) for i in rng.integers(0, len(keys), n)}


def test_plain_data_as_pickle_loads_it():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        obj = plain(rng)
        data = pickle.dumps(obj, protocol=2)
        seen |= {op.name for op, _, _ in pickletools.genops(data)}
        out, end = unpickle(data, Policy())
        assert out == pickle.loads(data) and end == len(data)
    assert {"BINFLOAT", "BININT", "BININT1", "BININT2", "LONG1", "BINUNICODE", "NEWTRUE",
            "NEWFALSE", "NONE", "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM",
            "SETITEMS", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "MARK",
            "BINPUT", "BINGET", "PROTO", "STOP"} <= seen  # fmt: skip


def test_shared_references_and_long_memo_indices():
    inner = [[i] for i in range(300)]  # > 256 memo entries: LONG_BINPUT / LONG_BINGET
    data = pickle.dumps([inner, inner[::-1]], protocol=2)
    assert {"LONG_BINPUT", "LONG_BINGET"} <= {op.name for op, _, _ in pickletools.genops(data)}
    a, b = unpickle(data, Policy())[0]
    assert a == inner and all(x is y for x, y in zip(a, b[::-1]))


def test_pickles_back_to_back():
    data = pickle.dumps(1, protocol=2) + pickle.dumps("two", protocol=2)
    one, end = unpickle(data, Policy())
    assert (one, unpickle(data, Policy(), start=end)) == (1, ("two", len(data)))


def nested_tuple_key(depth: int) -> bytes:
    """``{t: 1}`` with ``t = (t', t')`` nested ``depth`` deep through the memo: a few bytes,
    but hashing ``t`` visits 2**depth tuples."""
    body = b")" + b"q\x00h\x00\x86" * depth
    return b"\x80\x02}" + body + b"K\x01s."


PRO = b"\x80\x02"
REFUSED = {  # name: (pickle, limits, expected message)
    "huge_string": (PRO + b"X\xff\xff\xff\xff" + b"a" * 10 + b".", None,
                    "string of 4294967295 bytes, more than 16777216 .BINUNICODE at byte 2"),
    "short_string": (PRO + b"X\xff\xff\xff\x00" + b"a" * 10 + b".", None,
                     "truncated: needs 16777215 bytes, 11 left"),
    "long_string": (pickle.dumps("hello", protocol=2), Limits(string=4),
                    "string of 5 bytes, more than 4"),
    "memo": (pickle.dumps([[1], [2], [3]], protocol=2), Limits(memo=3), "more than 3 memo"),
    "marks": (PRO + b"((((" + b"t" * 4 + b".", Limits(marks=3), "nested more than 3 deep"),
    "stack": (PRO + b"(NNNNt.", Limits(stack=3), "more than 3 items on the stack"),
    "container": (pickle.dumps([1, 2, 3], protocol=2), Limits(container=2),
                  "container of more than 2 items"),
    "memo_get": (PRO + b"Nj\x05\x00\x00\x00.", None, "memo index 5 was never stored"),
    "put_empty": (PRO + b"q\x00N.", None, "stack underflow .BINPUT at byte 2"),
    "pop_empty": (PRO + b"t.", None, "no MARK"),
    "tuple2": (PRO + b"N\x86.", None, "stack underflow"),
    "odd_setitems": (PRO + b"}(K\x01u.", None, "odd number"),
    "append_dict": (PRO + b"}K\x01a.", None, "APPEND on a dict, not a list"),
    "setitem_list": (PRO + b"]K\x01K\x02s.", None, "SETITEM on a list, not a dict"),
    "list_key": (PRO + b"}]K\x01s.", None, "dict key is a list"),
    "tuple_key": (nested_tuple_key(22), None, "dict key is a tuple"),
    "not_an_opcode": (PRO + b"\xff.", None, "byte 0xff is not a pickle opcode .at byte 2"),
    "inst": (PRO + b"iposix\nsystem\n.", None, "refusing pickle opcode INST"),
    "long4": (PRO + b"\x8b\x01\x00\x00\x00\x01.", None, "refusing pickle opcode LONG4"),
    "frame": (pickle.dumps("x", protocol=4), None, "refusing pickle opcode FRAME"),
    "protocol": (b"\x80\x06N.", None, "unsupported pickle protocol"),
    "no_stop": (PRO + b"N", None, "ends before STOP"),
    "global_line": (PRO + b"c" + b"m" * 300 + b"\nx\n.", None, "not ended by a newline within"),
    "utf8": (PRO + b"X\x01\x00\x00\x00\xff.", None, "string is not UTF-8"),
    "global": (PRO + b"cos\nsystem\n.", None, "refusing to load global 'os.system'"),
    "persid": (PRO + b"NQ.", None, "refusing persistent id"),
    "reduce": (PRO + b"N)R.", None, "refusing to call a NoneType"),
    "newobj": (PRO + b"N)\x81.", None, "refusing to create an instance of a NoneType"),
    "build": (PRO + b"]}b.", None, "refusing to BUILD a list"),
    "reduce_args": (PRO + b"NNR.", None, "REDUCE arguments are not a tuple"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused(name):
    data, limits, match = REFUSED[name]
    t0 = time.process_time()
    with pytest.raises(CheckpointError, match=match):
        unpickle(data, Policy(), limits=limits or Limits())
    assert time.process_time() - t0 < 1, "a refusal must not need real work"
    if limits is not None:  # the same stream is fine within the default limits
        assert unpickle(data, Policy())[1] == len(data)


# --- load_pth's byte budgets ---------------------------------------------------------------------


def shared_views(n: int, numel: int) -> bytes:
    """``OrderedDict(w0=t, w1=t, ...)``: ``n`` keys, one tensor over all of storage '0'."""
    pid = P.tup(P.text("storage"), P.glob("torch", "FloatStorage"), P.text("0"),
                P.text("cpu"), P.long(numel))
    tensor = P.glob("torch._utils", "_rebuild_tensor_v2") + P.tup(
        pid + P.BINPERSID, P.long(0), P.tup(P.long(numel)), P.tup(P.long(1)), P.NEWFALSE,
        P.odict()) + P.REDUCE + b"q\x00"  # BINPUT 0
    items = [P.text(f"w{i}") + (tensor if i == 0 else b"h\x00") + P.SETITEM for i in range(n)]
    return P.PROTO2 + P.odict() + b"".join(items) + P.STOP


def test_shared_views_are_copied_within_a_budget(tmp_path):
    numel = 1 << 18  # 1 MiB of float32
    raw = np.arange(numel, dtype=np.float32).tobytes()
    tied = load_pth(write_zip(tmp_path / "tied.pth", shared_views(8, numel), {"0": raw}))
    assert len(tied) == 8 and all(np.array_equal(v, tied["w0"]) for v in tied.values())
    assert tied["w0"] is not tied["w1"]  # copies, as always: no aliasing between entries
    bomb = write_zip(tmp_path / "bomb.pth", shared_views(40, numel), {"0": raw})
    with pytest.raises(CheckpointError, match="views add up to more than 8 times the file"):
        load_pth(bomb)  # 40 MiB out of a 1 MiB file


def overlapping_zip(path, pkl: bytes, payload: bytes, k: int):
    """A zip whose records archive/data/0..k-1 are nested: record i's bytes hold record i+1's
    header and bytes (the overlapping-entry trick of D. Fifield's "A better zip bomb")."""
    def local(name: bytes, data: bytes) -> bytes:
        return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0,
                           zlib.crc32(data), len(data), len(data), len(name), 0) + name + data

    head = local(b"archive/data.pkl", pkl)
    names = [f"archive/data/{i}".encode() for i in range(k)]
    tails = [payload]
    for name in names[:0:-1]:  # innermost first: tails[j] = the bytes of record k-1-j
        tails.append(local(name, tails[-1]))
    tails = tails[::-1]  # tails[i] = bytes of record i
    body = head + local(names[0], tails[0])
    headers = [30 + len(name) for name in names]  # record i starts after the headers before it
    offsets = [0] + [len(head) + sum(headers[:i]) for i in range(k)]
    central = b""
    for (name, data), off in zip([(b"archive/data.pkl", pkl), *zip(names, tails)], offsets):
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, 0, 0, 0,
                               zlib.crc32(data), len(data), len(data), len(name), 0, 0, 0, 0,
                               0, off) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, k + 1, k + 1, len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return [len(t) for t in tails]


def byte_tensors(sizes) -> bytes:
    items = []
    for i, n in enumerate(sizes):
        pid = P.tup(P.text("storage"), P.glob("torch", "ByteStorage"), P.text(str(i)),
                    P.text("cpu"), P.long(n))
        items.append(P.text(f"t{i}") + P.glob("torch._utils", "_rebuild_tensor_v2") + P.tup(
            pid + P.BINPERSID, P.long(0), P.tup(P.long(n)), P.tup(P.long(1)), P.NEWFALSE,
            P.odict()) + P.REDUCE + P.SETITEM)
    return P.PROTO2 + P.odict() + b"".join(items) + P.STOP


def test_overlapping_zip_records_refused(tmp_path):
    payload = bytes(range(256)) * 64  # 16 KiB
    path = tmp_path / "nested.pth"
    sizes = overlapping_zip(path, b"", payload, 4)
    sizes = overlapping_zip(path, byte_tensors(sizes), payload, 4)
    with zipfile.ZipFile(path) as z:  # zipfile itself reads every nested record
        assert [len(z.read(f"archive/data/{i}")) for i in range(4)] == sizes
    assert sum(sizes) > path.stat().st_size
    with pytest.raises(CheckpointError, match="storages add up to more bytes than the file"):
        load_pth(path)
    sizes = overlapping_zip(path, byte_tensors(sizes[-1:]), payload, 1)  # one record: fine
    assert load_pth(path)["t0"].tobytes() == payload
