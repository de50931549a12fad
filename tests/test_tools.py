"""The tools around the model: ``summary``, ``convert``/``load_npz``/``load_model``, ``compare``
and their command lines.

Parameter and MAC counts are torchvision's, measured with ``torch.utils.flop_counter`` (FLOPs / 2,
conv + linear only) and written down here, so the summary tests run without
torch; one test re-measures them with torch at an odd input size, shape by shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import require_torch, require_torchvision

import npmnv3
from npmnv3.cli import main
from npmnv3.io.convert import convert
from npmnv3.io.load import load_model
from npmnv3.io.npz import FORMAT_VERSION, META_KEY, load_npz
from npmnv3.io.pth import CheckpointError, load_pth
from npmnv3.nn.config import MobileNetV3Config
from npmnv3.tools.compare import (
    compare_with_torchvision,
    first_failure,
    format_rows,
    npmnv3_twin,
    random_input,
    torchvision_model,
)
from npmnv3.tools.summary import summary

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

# (builder, kwargs, parameters, MACs at 224x224): torch 2.14.1 / torchvision 0.29.1 measurements.
VARIANTS = [
    ("large", {}, 5_483_032, 216_589_760),
    ("small", {}, 2_542_856, 56_510_400),
    ("large", {"width_mult": 0.75}, 3_377_576, 140_033_816),
    ("small", {"width_mult": 0.75}, 1_653_920, 39_115_576),
    ("large", {"width_mult": 0.5}, 1_734_576, 64_962_192),
    ("small", {"width_mult": 0.5}, 917_264, 18_970_736),
    ("large", {"width_mult": 1.25}, 8_164_744, 343_461_000),
    ("large", {"reduced_tail": True}, 2_569_352, 182_302_720),
    ("small", {"reduced_tail": True}, 1_099_672, 43_763_584),
    ("large", {"dilated": True}, 5_483_032, 354_816_800),
    ("large", {"reduced_tail": True, "dilated": True}, 2_569_352, 224_427_040),
    ("small", {"reduced_tail": True, "dilated": True}, 1_099_672, 59_131_552),
    ("small", {"num_classes": 10}, 1_528_106, 55_496_640),
]


def build(arch, **kwargs):
    return getattr(npmnv3, f"mobilenet_v3_{arch}")(**kwargs)


def run_cli(*args, code=""):
    """``python -m npmnv3 args`` (or ``python -c code args``) in a fresh interpreter."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "npmnv3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def assert_same_state_dict(ours: dict, ref: dict):
    assert list(ours) == list(ref), "keys or key order differ"
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, (
            f"{k}: {ours[k].dtype}{ours[k].shape} vs {v.dtype}{v.shape}")
        assert ours[k].tobytes() == v.tobytes(), f"{k}: values differ"


# --- summary -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kwargs,params,macs", VARIANTS,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
                              for a, kw, _, _ in VARIANTS])
def test_summary_totals_match_torchvision(arch, kwargs, params, macs):
    model = build(arch, **kwargs)
    s = summary(model, (224, 224))
    assert s.total_params == params, f"params {s.total_params:,} != {params:,}"
    assert s.total_macs == macs, f"MACs {s.total_macs:,} != {macs:,}"
    assert s.total_params == model.num_parameters()
    assert s.rows[-1].output_shape == (1, kwargs.get("num_classes", 1000))


def test_summary_odd_size_and_batch():
    # torch flop counter at 193x161: Large 158,509,624 MACs, Small 42,467,608.
    assert summary(build("large"), (193, 161)).total_macs == 158_509_624
    s = summary(build("small"), (193, 161), batch_size=3)
    assert s.total_macs == 3 * 42_467_608 and s.total_params == 2_542_856
    assert summary(build("small"), 224).total_macs == 56_510_400        # an int is H = W


def test_summary_matches_torch_shape_by_shape():
    torch, tv = require_torch(), require_torchvision()
    from torch.utils.flop_counter import FlopCounterMode

    size = (97, 130)
    ref = tv.models.mobilenet_v3_small(dilated=True).eval()
    shapes = {}
    for name, mod in ref.named_modules():
        if name:
            mod.register_forward_hook(lambda m, i, o, name=name: shapes.update(
                {name: tuple(o.shape)}))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ref(torch.zeros(1, 3, *size))
    s = summary(build("small", dilated=True), size)
    assert s.total_macs * 2 == fc.get_total_flops()
    for r in s.rows:
        assert r.output_shape == shapes[r.name], r.name


def test_summary_table_renders_rows_and_totals():
    s = summary(build("large"))
    text = str(s)
    assert text.startswith("mobilenet_v3_large(), input [1, 3, 224, 224]")
    for needle in ("features.16", "  features.4.block.2", "SE 72->24->72, Hardsigmoid",
                   "DW Conv 5x5/2, BN, ReLU", "InvertedResidual + residual",
                   "classifier.3", "Linear 1280->1000", "[1, 960, 7, 7]",
                   "Total params: 5,483,032", "Total MACs:   216,589,760 (216.59 M"):
        assert needle in text, needle
    assert s["features.4.block.2"].macs == 2 * 72 * 24                 # SE at 1x1
    assert s["features.0"].macs == 112 * 112 * 16 * 3 * 9
    compact = s.format(depth=0)
    assert "features.4.block" not in compact and "Total params: 5,483,032" in compact
    assert "dilated=True" in str(summary(build("small", dilated=True, width_mult=0.5)))


@pytest.mark.parametrize("size", [(0, 224), (224,), (1, 2, 3)])
def test_summary_bad_input_size(size):
    with pytest.raises(ValueError, match="input_size"):
        summary(build("small"), size)


# --- convert, load_npz, load_model -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    """A checkpoint written by torch.save from torchvision, with randomised batch-norm state."""
    torch = require_torch()
    tv = torchvision_model({"arch": "small"}, seed=1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked.fill_(123)
    path = tmp_path_factory.mktemp("ckpt") / "mobilenet_v3_small-test.pth"
    torch.save(tv.state_dict(), path)
    return path


def test_convert_round_trip(small_pth, tmp_path):
    dst = tmp_path / "small.npz"
    meta = convert(small_pth, dst)
    ref = load_pth(small_pth)
    sd, meta2 = load_npz(dst)
    assert_same_state_dict(sd, ref)
    assert meta2 == meta
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert meta["arch"] == MobileNetV3Config("small").to_dict() == {
        "arch": "small", "width_mult": 1.0, "reduced_tail": False, "dilated": False,
        "num_classes": 1000, "dropout": 0.2}
    assert meta["classes"] is None and meta["preprocessing"] is None
    assert meta["source_name"] == small_pth.name
    assert meta["source_sha256"] == hashlib.sha256(small_pth.read_bytes()).hexdigest()
    assert meta["source_bytes"] == small_pth.stat().st_size
    assert meta["npmnv3_version"] == npmnv3.__version__
    assert meta["num_parameters"] == 2_542_856
    with np.load(dst, allow_pickle=False) as z:                   # plain NumPy reads it
        assert z.files == [*ref, META_KEY]
        assert z[META_KEY].dtype == np.uint8
        assert json.loads(z[META_KEY].tobytes())["source_sha256"] == meta["source_sha256"]
        assert z["features.0.1.num_batches_tracked"].shape == ()
    assert sorted(os.listdir(tmp_path)) == ["small.npz"]           # no temporary file left


def test_load_model_from_npz_and_pth(small_pth, tmp_path):
    dst = tmp_path / "small.npz"
    convert(small_pth, dst, arch={"dilated": True})
    assert load_npz(dst)[1]["arch"]["dilated"] is True
    from_npz, from_pth = load_model(dst), load_model(small_pth)
    assert not from_npz.training and from_npz.config.dilated and not from_pth.config.dilated
    assert_same_state_dict(from_npz.state_dict(), from_pth.state_dict())
    assert_same_state_dict(from_pth.state_dict(), load_pth(small_pth))
    assert load_model(dst, dtype=np.float64).dtype == np.float64


def test_convert_infers_other_variants(tmp_path):
    torch = require_torch()
    tv = torchvision_model({"arch": "large", "width_mult": 0.75, "reduced_tail": True,
                            "num_classes": 10})
    torch.save(tv.state_dict(), tmp_path / "l.pth")
    meta = convert(tmp_path / "l.pth", tmp_path / "l.npz")
    assert MobileNetV3Config.from_dict(meta["arch"]) == MobileNetV3Config(
        "large", width_mult=0.75, reduced_tail=True, num_classes=10)


def test_convert_with_wrong_arch_names_the_right_one(small_pth, tmp_path):
    with pytest.raises(CheckpointError, match=r"does not fit mobilenet_v3_large\(\)(.|\n)*"
                                              r"hint: this checkpoint matches mobilenet_v3_small"):
        convert(small_pth, tmp_path / "x.npz", arch="large")
    assert not (tmp_path / "x.npz").exists()


def _boom_midway(file, *args, **kwargs):
    file.write(b"PK\x03\x04 half an archive")
    raise RuntimeError("disk full (simulated)")


def _boom_replace(src, dst):
    raise OSError("rename failed (simulated)")


@pytest.mark.parametrize("patch", ["savez", "replace"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_convert_is_atomic(small_pth, tmp_path, monkeypatch, patch, existing):
    dst = tmp_path / "out.npz"
    if existing:
        dst.write_bytes(b"old contents")
    if patch == "savez":
        monkeypatch.setattr(np, "savez", _boom_midway)
    else:
        monkeypatch.setattr(os, "replace", _boom_replace)
    with pytest.raises((RuntimeError, OSError), match="simulated"):
        convert(small_pth, dst)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == (["out.npz"] if existing else []), "temporary file left"
    if existing:
        assert dst.read_bytes() == b"old contents"


def test_convert_refuses_non_checkpoints(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="no such file"):
        convert(tmp_path / "missing.pth", tmp_path / "a.npz")
    with pytest.raises(CheckpointError, match=r"not a checkpoint: neither a PyTorch \.pth"):
        convert(tmp_path / "notes.pth", tmp_path / "a.npz")
    with pytest.raises(CheckpointError, match="not a regular file"):
        convert(tmp_path, tmp_path / "a.npz")
    assert sorted(os.listdir(tmp_path)) == ["notes.pth"]


@pytest.mark.parametrize("what", ["resnet18", "random dict", "empty"])
def test_convert_refuses_other_models(tmp_path, what):
    torch = require_torch()
    if what == "resnet18":
        sd = require_torchvision().models.resnet18().state_dict()
    elif what == "random dict":
        sd = {"classifier.3.weight": torch.randn(10, 4), "w": torch.randn(3)}
    else:
        sd = {}
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a MobileNetV3 checkpoint"):
        convert(tmp_path / "other.pth", tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="not a MobileNetV3 checkpoint"):
        load_model(tmp_path / "other.pth")
    assert os.listdir(tmp_path) == ["other.pth"]


def test_load_npz_refuses_bad_files(tmp_path):
    meta = {"format": "npmnv3-weights", "format_version": 99, "arch": {"arch": "small"}}
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **{"w": np.zeros(3), META_KEY: blob})
    with pytest.raises(CheckpointError, match="unknown format version 99"):
        load_npz(tmp_path / "future.npz")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match=f"no {META_KEY} entry"):
        load_npz(tmp_path / "plain.npz")
    with pytest.raises(CheckpointError, match="not a MobileNetV3 checkpoint"):
        load_model(tmp_path / "plain.npz")     # read as a state_dict of arrays: no match
    np.savez(tmp_path / "pickled.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_npz(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


# --- compare -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compare_agrees_and_flags_the_first_wrong_layer(dtype):
    require_torchvision()
    tv = torchvision_model({"arch": "small"}, dtype=dtype)
    model = npmnv3_twin(tv, {"arch": "small"}, dtype)
    x = random_input(seed=3, size=64)
    rows = compare_with_torchvision(model, tv, x)
    assert [r.name for r in rows][:4] == ["features.0.0", "features.0.1", "features.0.2",
                                         "features.0"]           # innermost first
    assert len(rows) == 208 and set(r.name for r in rows) == set(model.module_names())
    assert first_failure(rows) is None, format_rows(rows)
    assert all(r.tol == (1e-5 if dtype == "float32" else 1e-10) for r in rows)
    assert format_rows(rows)[-1] == f"all 208 modules within tolerance {rows[0].tol:.0e}"

    model.bn_eps = 1e-5                                           # torchvision uses 1e-3
    rows = compare_with_torchvision(model, tv, x)
    first = first_failure(rows)
    assert first.name == "features.0.1", first                    # the stem's batch norm
    assert next(r for r in rows if r.name == "features.0.0").ok   # its conv still agrees
    lines = format_rows(rows)
    marked = [ln for ln in lines if "FIRST OVER TOLERANCE" in ln]
    assert len(marked) == 1 and marked[0].startswith("features.0.1 ")
    assert lines[-1].endswith("the first is features.0.1")


def test_compare_cli_in_process_with_weights_and_plot(small_pth, tmp_path, capsys):
    require_torchvision()
    convert(small_pth, tmp_path / "w.npz")
    plot = tmp_path / "err.png"
    argv = ["compare", "--weights", str(tmp_path / "w.npz"), "--input-size", "48", "--plot",
            str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "all 208 modules within tolerance 1e-05" in out and "weights" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", "--weights", str(small_pth), "--model", "large"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "arch 'large' given, weights have 'small'" in err


def test_compare_without_torch_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)               # `import torch` now fails
    assert main(["compare", "--model", "small"]) == 2
    assert capsys.readouterr().err == ("npmnv3 compare needs torch and torchvision "
                                       "(pip install -e '.[test]')\n")


# --- command line in a fresh interpreter -------------------------------------------------------


def test_cli_summary():
    res = run_cli("summary", "--model", "small")
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in res.stdout.splitlines()
            if ln.lstrip().startswith(("features", "avgpool", "classifier"))}
    # features.0-12, avgpool, classifier; block layers (3 in blocks 1-3, 4 in 4-11); Linear...
    assert len(rows) == 13 + 2 + (3 * 3 + 8 * 4) + 4
    assert rows["features.11.block.2"].split() == [
        "SE", "576->144->576,", "Hardsigmoid", "[1,", "576,", "7,", "7]", "166,608", "165,888"]
    assert rows["features.12"].split()[-2:] == ["56,448", "2,709,504"]
    assert "Total params: 2,542,856" in res.stdout
    assert "Total MACs:   56,510,400 (56.51 M" in res.stdout
    res = run_cli("summary", "--model", "large", "--width-mult", "0.75", "--depth", "0",
                  "--input-size", "224", "224")
    assert res.returncode == 0 and "140,033,816" in res.stdout
    assert "features.1.block" not in res.stdout


def test_cli_convert_and_errors(small_pth, tmp_path):
    dst = tmp_path / "out.npz"
    res = run_cli("convert", str(small_pth), str(dst))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {dst}: mobilenet_v3_small(), 2,542,856 parameters")
    assert hashlib.sha256(small_pth.read_bytes()).hexdigest() in res.stdout
    assert_same_state_dict(load_npz(dst)[0], load_pth(small_pth))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    for args in (["convert", str(tmp_path / "missing.pth"), str(tmp_path / "a.npz")],
                 ["convert", str(tmp_path / "junk.pth"), str(tmp_path / "a.npz")],
                 ["convert", str(small_pth), str(tmp_path / "a.npz"), "--model", "large"]):
        res = run_cli(*args)
        assert res.returncode == 1 and res.stdout == "", res
        assert res.stderr.startswith("npmnv3 convert: error: ") and res.stderr.count("\n") == 1
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "a.npz").exists()


def test_cli_compare_small():
    require_torchvision()
    res = run_cli("compare", "--model", "small", "--input-size", "96")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("npmnv3 vs torchvision, random weights (seed 0)")
    assert any(ln.startswith("features.0.1 ") and "max rel" in ln for ln in lines)
    assert lines[-1] == "all 208 modules within tolerance 1e-05"


def test_tools_never_import_torch(small_pth, tmp_path):
    code = ("import sys, npmnv3; from npmnv3.cli import main; "
            "print(npmnv3.summary(npmnv3.mobilenet_v3_small()).total_macs); "
            "npmnv3.convert(sys.argv[1], sys.argv[2]); npmnv3.load_model(sys.argv[2]); "
            "main(['summary', '--model', 'large', '--depth', '0']); "
            "bad = [m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    res = run_cli(str(small_pth), str(tmp_path / "a.npz"), code=code)
    assert res.returncode == 0, res.stderr
