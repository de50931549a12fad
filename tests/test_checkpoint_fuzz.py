"""Fuzzing ``npmnv3.load_pth``: every input gives a state_dict or ``CheckpointError``, fast, small.

The corpus is seeded and regenerated input by input from ``(seed, index)``: genuine ``torch.save``
files of small MobileNetV3-like models (float; quantized per tensor and per channel), zip and
legacy, mutated by byte flips, interesting-integer overwrites (length and memo fields),
insertions, deletions, truncations and splices; the zip's ``data.pkl`` mutated alone and
re-zipped into a valid container (so the mutation reaches the unpickler, not zipfile's CRC
check); and random bytes behind each format's magic.

The inputs are loaded in a worker process (this file run as a script) that imports only npmnv3:
per input it records the CPU time of the load and the peak resident memory above the resident
memory before it (the peak is reset through ``/proc/self/clear_refs``; without that, the peak of
the whole run is used, which is stricter). CPU time, not wall time, so that a busy machine does
not fail the bound. A cap on the address space (``RLIMIT_AS``) and a per-input alarm keep a
regression from taking the machine down with it.

The large offline run (numbers in the README) is this file as a script::

    python tests/test_checkpoint_fuzz.py run --count 20000 [--reader OLD/pth.py]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import os
import pickle
import pickletools
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SEED = 20240914
CI_COUNT = 3000  # inputs in the CI run (~15-25 s on this machine)
MAX_CPU_S = 0.5  # per input, the bound of issue 9
MAX_GROWTH_MB = 100  # per input, peak RSS above the RSS before the load
AS_CAP_MB = 1024  # address space the worker may add: a regression fails, it cannot eat the host
ALARM_S = 20  # wall-clock alarm per input (a hang fails the test instead of stalling CI)
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 808_350_565, 2**62, 2**63 - 1, 2**64 - 1]  # fmt: skip
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)


# --- genuine checkpoints written by torch.save ---------------------------------------------------


def tiny_config():
    """Three bneck rows (SE + ReLU stride 2, plain, SE + hard-swish k5) of torchvision's table."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as C

    return [C(16, 3, 16, 16, True, "RE", 2, 1, 1.0), C(16, 3, 48, 24, False, "RE", 2, 1, 1.0),
            C(24, 5, 64, 32, True, "HS", 1, 1, 1.0)]  # fmt: skip


def tiny_float(torch, seed=0):
    from support import randomise
    from torchvision.models.mobilenetv3 import MobileNetV3

    torch.manual_seed(seed)
    model = MobileNetV3(tiny_config(), last_channel=64, num_classes=10)
    randomise(torch, model, seed)
    return model.eval()


def tiny_quantized(torch, engine: str, seed=0):
    """torchvision's quantizable MobileNetV3, QAT-prepared for ``engine``, calibrated on two
    random batches, converted: what ``torch.save(model.state_dict())`` of an int8 model holds."""
    import warnings

    from support import randomise
    from torchvision.models.quantization import mobilenetv3 as qm

    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = qm.QuantizableMobileNetV3(tiny_config(), 64, num_classes=10,
                                      block=qm.QuantizableInvertedResidual)
    qm._replace_relu(model)
    randomise(torch, model, seed)
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for quantized dtypes
        torch.ao.quantization.prepare_qat(model, inplace=True)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(2, 3, 32, 32))
        model.eval()
        torch.ao.quantization.convert(model, inplace=True)
    return model


def write_bases(out: Path) -> list[Path]:
    """The genuine files the corpus mutates: float, qnnpack and fbgemm models, zip and legacy."""
    from support import require_torch, require_torchvision

    torch = require_torch()
    require_torchvision()
    engine = torch.backends.quantized.engine
    try:
        models = {"float": tiny_float(torch)}
        for name in ("qnnpack", "fbgemm"):  # per-tensor and per-channel weights
            if name in torch.backends.quantized.supported_engines:
                models[name] = tiny_quantized(torch, name)
    finally:
        torch.backends.quantized.engine = engine
    sd = models["float"].state_dict()
    objects = {**{k: m.state_dict() for k, m in models.items()},
               "wrapped": {"state_dict": sd, "epoch": 3, "meta": {"lr": 0.1, "tags": ["a", None]}}}
    paths = []
    for name, obj in objects.items():
        for legacy in (False, True):
            path = out / f"{name}_{'legacy' if legacy else 'zip'}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            paths.append(path)
    return paths


# --- the corpus: input i is a pure function of (seed, i) -----------------------------------------


class Base:
    """One genuine file and the byte range worth mutating (pickles, zip directory)."""

    def __init__(self, path: Path):
        self.name, self.data = path.stem, path.read_bytes()
        self.is_zip = self.data[:4] == b"PK\x03\x04"
        if self.is_zip:
            with zipfile.ZipFile(io.BytesIO(self.data)) as z:
                self.records = [(i.filename, z.read(i)) for i in z.infolist()]
                self.hot = (z.start_dir, len(self.data))  # central directory + end record
            self.pkl = next(raw for name, raw in self.records if name.endswith("/data.pkl"))
        else:  # legacy: five pickles, then raw storages
            f = io.BytesIO(self.data)
            for _ in range(5):
                for _op in pickletools.genops(f):
                    pass
            self.hot = (0, f.tell())


def rezip(base: Base, pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, raw in base.records:
            z.writestr(name, pkl if name.endswith("/data.pkl") else raw)
    return buf.getvalue()


def mutate_once(rng, b: bytearray, hot, donors) -> str:
    lo, hi = hot if rng.random() < 0.85 else (0, len(b))
    hi = max(hi, lo + 1)
    pos = int(rng.integers(lo, hi))
    kind = str(rng.choice(["flip", "interesting", "insert", "delete", "truncate", "splice"],
                          p=[0.25, 0.25, 0.15, 0.15, 0.05, 0.15]))
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            if b:
                b[int(rng.integers(lo, hi)) % len(b)] = int(rng.integers(256))
    elif kind == "interesting":
        n = int(rng.choice([1, 2, 4, 8]))
        v = int(rng.choice(INTERESTING)) % (1 << (8 * n))
        b[pos : pos + n] = v.to_bytes(n, str(rng.choice(["little", "big"])))
    elif kind == "insert":
        n = int(rng.integers(1, 17))
        b[pos:pos] = rng.bytes(n) if rng.random() < 0.5 else b[pos : pos + n]  # noise or a repeat
    elif kind == "delete":
        del b[pos : pos + int(rng.integers(1, 65))]
    elif kind == "truncate":
        del b[pos:]
    else:  # splice: a span of another (or the same) genuine file
        donor = donors[int(rng.integers(len(donors)))]
        start = int(rng.integers(len(donor)))
        b[pos : pos + int(rng.integers(0, 65))] = donor[start : start + int(rng.integers(1, 129))]
    return kind


def make_input(seed: int, i: int, bases: list[Base]) -> tuple[str, bytes]:
    """Input ``i`` of the corpus: (description, bytes)."""
    rng = np.random.default_rng([seed, i])
    zips = [b for b in bases if b.is_zip]
    donors = [b.pkl if b.is_zip else b.data[: b.hot[1]] for b in bases]
    r = rng.random()
    if r < 0.07:  # random bytes behind a magic
        prefix = [b"", b"PK\x03\x04", b"\x80\x02", LEGACY_MAGIC][int(rng.integers(4))]
        return f"random{len(prefix)}", prefix + rng.bytes(int(rng.integers(0, 4096)))
    n_mut = int(rng.choice([1, 1, 1, 2, 3]))
    if r < 0.50:  # the pickle alone, re-zipped into a valid container
        base = zips[int(rng.integers(len(zips)))]
        b = bytearray(base.pkl)
        kinds = [mutate_once(rng, b, (0, len(b)), donors) for _ in range(n_mut)]
        return f"{base.name}/pkl:{'+'.join(kinds)}", rezip(base, bytes(b))
    base = bases[int(rng.integers(len(bases)))]  # the whole file
    b = bytearray(base.data)
    kinds = [mutate_once(rng, b, base.hot, donors) for _ in range(n_mut)]
    return f"{base.name}/file:{'+'.join(kinds)}", bytes(b)


# --- the worker: load each input, measure CPU time and peak memory -------------------------------


class Alarm(BaseException):  # not an Exception: load_pth's handlers must not swallow it
    pass


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # kB


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _reader(path: str | None):
    if path is None:
        from npmnv3.io import pth
    else:  # another copy of the reader, e.g. the pre-interpreter one of commit 8da1efb
        spec = importlib.util.spec_from_file_location("reader_under_test", path)
        pth = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pth)
    return pth.load_pth, pth.CheckpointError


def measure(load, error_type, files, as_cap_mb=AS_CAP_MB) -> dict:
    """Load each ``(description, path)``; outcome, CPU seconds and peak growth (MB) of each."""
    def on_alarm(*_):
        raise Alarm

    signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("VmSize") * 1024 + as_cap_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))
    rows, peak_resettable = [], _reset_peak()
    base_rss = _status("VmRSS")
    for desc, path in files:
        rss = _status("VmRSS")
        _reset_peak()
        signal.alarm(ALARM_S)
        t0, w0 = time.process_time(), time.perf_counter()
        try:
            out = load(path)
            outcome, message = "ok", f"{len(out)} entries"
            del out
        except error_type as e:
            outcome, message = "refused", str(e).split(": ", 1)[-1]
        except (Exception, Alarm) as e:  # noqa: BLE001 - the failures this test looks for
            outcome, message = type(e).__name__, str(e)[:300]
        finally:
            signal.alarm(0)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        growth = (_status("VmHWM") - (rss if peak_resettable else base_rss)) / 1024
        rows.append((desc, outcome, message[:200], cpu, wall, growth))
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return {"rows": rows, "peak_resettable": peak_resettable}


def worker(args) -> None:
    load, error_type = _reader(args.reader)
    if args.files:
        result = measure(load, error_type, [(p, Path(p)) for p in args.files], args.as_cap_mb)
    else:
        bases = [Base(p) for p in sorted(Path(args.bases).glob("*.pth"))]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "input.pth"

            def inputs():
                for i in range(args.start, args.start + args.count):
                    desc, data = make_input(args.seed, i, bases)
                    path.write_bytes(data)
                    yield f"{i}:{desc}:{len(data)}B", path

            result = measure(load, error_type, inputs(), args.as_cap_mb)
    Path(args.out).write_text(json.dumps(result))


def run_worker(tmp: Path, *argv: str) -> dict:
    out = tmp / f"result{time.monotonic_ns()}.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, __file__, "worker", "--out", str(out), *argv],
                   check=True, env=env, cwd=tmp, timeout=900)
    return json.loads(out.read_text())


def summarise(result: dict) -> dict:
    rows = result["rows"]
    outcomes = collections.Counter(r[1] for r in rows)
    slow = sorted(rows, key=lambda r: -r[3])[:5]
    big = max(rows, key=lambda r: r[5])
    messages = collections.Counter(  # what is wrong, without where (the suffix in brackets)
        re.sub(r"\d+", "N", re.sub(r" \([A-Z_0-9]* ?at byte \d+ of .*\)$", "", r[2]))[:70]
        for r in rows if r[1] == "refused")
    return {"inputs": len(rows), "outcomes": dict(outcomes),
            "slowest_cpu_s": [(round(r[3], 4), round(r[4], 4), r[0]) for r in slow],
            "max_wall_s": round(max(r[4] for r in rows), 4),
            "peak_growth_mb": (round(big[5], 1), big[0]),
            "peak_resettable": result["peak_resettable"],
            "distinct_refusals": len(messages), "top_refusals": messages.most_common(12)}


# --- the tests -----------------------------------------------------------------------------------


def failures(result: dict) -> list:
    """Inputs that broke a rule: other exception, a catch-all message, too slow, too big."""
    return [r for r in result["rows"]
            if r[1] not in ("ok", "refused") or "unreadable checkpoint (" in r[2]
            or r[3] > MAX_CPU_S or r[5] > MAX_GROWTH_MB]


def require_proc():
    if not Path("/proc/self/status").is_file():
        pytest.skip("the memory bound is measured through Linux's /proc/self/status")


def test_fuzz_mutated_checkpoints(tmp_path):
    require_proc()
    (tmp_path / "bases").mkdir()
    write_bases(tmp_path / "bases")
    result = run_worker(tmp_path, "--bases", str(tmp_path / "bases"), "--count", str(CI_COUNT))
    summary = summarise(result)
    print(json.dumps(summary, indent=1))
    bad = failures(result)
    assert not bad, f"{len(bad)} inputs broke the rules, e.g. {bad[:5]}"
    # The corpus must reach the interpreter and the checks after it, not die at the container:
    # mutated tensor bytes still load, and the refusals name many different problems.
    assert summary["outcomes"].get("ok", 0) > 0.02 * CI_COUNT, summary["outcomes"]
    assert summary["distinct_refusals"] > 40, summary["top_refusals"]


def memo_bomb(torch, path: Path) -> Path:
    """A 1.4 KB genuine legacy checkpoint whose BINPUT 2 became LONG_BINPUT 808,350,565.

    The C unpickler grows its memo array to twice that index (12.9 GB, 54 s to zero it); the
    later ``BINGET 2`` then names an index that was never stored."""
    torch.manual_seed(0)
    sd = {"conv.weight": torch.randn(6, 3, 3, 3), "bn.weight": torch.rand(6),
          "bn.bias": torch.randn(6), "bn.running_var": torch.rand(6)}
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    f = io.BytesIO(data)
    for _ in range(3):  # magic, protocol, sys_info
        for _op in pickletools.genops(f):
            pass
    at = data.index(b"q\x02", f.tell())  # the object pickle's BINPUT 2
    bomb = data[:at] + b"r" + struct.pack("<I", 808_350_565) + data[at + 2 :]
    path.write_bytes(bomb)
    return path


def test_memo_index_808350565_refused_fast(tmp_path):
    from support import require_torch

    require_proc()
    path = memo_bomb(require_torch(), tmp_path / "memo_bomb.pth")
    assert 1300 < path.stat().st_size < 1500
    (row,) = run_worker(tmp_path, "--files", str(path))["rows"]
    _, outcome, message, cpu, _wall, growth = row
    assert outcome == "refused" and re.search(r"memo index 2\b.*never stored", message), row
    assert cpu < MAX_CPU_S and growth < MAX_GROWTH_MB, row


# --- command line: the worker, and the large offline run -----------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--out", required=True)
    w.add_argument("--bases")
    w.add_argument("--files", nargs="*")
    r = sub.add_parser("run", help="write the bases with torch, fuzz, print the summary")
    r.add_argument("--workdir", default=None)
    for p in (w, r):
        p.add_argument("--seed", type=int, default=SEED)
        p.add_argument("--start", type=int, default=0)
        p.add_argument("--count", type=int, default=CI_COUNT)
        p.add_argument("--reader", help="path of another pth.py to test (default: npmnv3's)")
        p.add_argument("--as-cap-mb", type=int, default=AS_CAP_MB)
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return worker(args)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="fuzz_pth_"))
    if not (tmp / "bases").is_dir():
        (tmp / "bases").mkdir(parents=True)
        write_bases(tmp / "bases")
    argv = ["--bases", str(tmp / "bases"), "--seed", str(args.seed), "--start", str(args.start),
            "--count", str(args.count), "--as-cap-mb", str(args.as_cap_mb)]
    argv += ["--reader", args.reader] if args.reader else []
    result = run_worker(tmp, *argv)
    (tmp / "rows.json").write_text(json.dumps(result))
    print(json.dumps(summarise(result), indent=1))
    bad = failures(result)
    print(f"{len(bad)} inputs broke the rules; rows in {tmp / 'rows.json'}")
    for row in bad[:20]:
        print("  ", row)


if __name__ == "__main__":
    main()
