"""The command line as a user meets it: help and defaults, exit codes, argument checks, one
loader (and one set of messages) for every ``--weights``, convert's overwrite rule, the
compile notice, ``selfcheck`` and ``python -m npmnv3``. Ctrl-C: tests/test_interrupt.py; the
train -> classify/evaluate loop: tests/test_cli_train.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from support import require_torchvision

import npmnv3
from npmnv3.cli import build_parser, main
from npmnv3.data.preprocess import imagenet_preprocessing
from npmnv3.io.load import save_weights
from npmnv3.tools import jitcache
from npmnv3.tools.selfcheck import run_selfcheck

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
PHOTO = DATA / "coffee.jpg"
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", "http://127.0.0.1:9/unused")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """An npmnv3 weights file: small width 0.5, 3 named classes, trained-at-32 preprocessing."""
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=3, seed=0)
    path = tmp_path_factory.mktemp("w") / "model.npz"
    save_weights(path, model, classes=["cat", "dog", "owl"],
                 preprocessing=imagenet_preprocessing(None, 32))
    return path


# ----------------------------------------------------------------------------- help, codes


def _subparsers(parser, prefix=()):
    yield prefix, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield from _subparsers(p, prefix + (name,))


def test_every_option_has_help_and_shows_its_default():
    checked = 0
    for names, p in _subparsers(build_parser()):
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                              argparse._SubParsersAction)):
                continue
            text = fmt._format_action(a)
            assert a.help, f"npmnv3 {' '.join(names)} {a.option_strings or a.dest}: no help"
            meaningful = a.default not in (None, False) or (a.default is None and "default" in
                                                            (a.help or ""))
            if a.option_strings and meaningful:
                assert "default" in text, f"npmnv3 {' '.join(names)} {a.option_strings}: {text}"
            checked += 1
    assert checked > 60
    helps = build_parser().format_help()
    for cmd in ("selfcheck", "summary", "convert", "compare", "weights", "classify", "evaluate",
                "train"):
        assert f"    {cmd}" in helps


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"npmnv3 {npmnv3.__version__}"


USAGE = [
    (["summary", "--model", "small", "--input-size", "0"],
     "argument --input-size: must be a positive integer, got 0"),
    (["summary", "--model", "small", "--input-size", "1", "2", "3"],
     "argument --input-size: takes H or H W, got 3 numbers"),
    (["summary", "--model", "small", "--width-mult", "-1"], "argument --width-mult: must be > 0"),
    (["compare", "--model", "small", "--input-size", "0"], "argument --input-size: must be a "
                                                           "positive integer, got 0"),
    (["compare", "--model", "small", "--input-size", "-3"], "argument --input-size: must be a "
                                                            "positive integer, got -3"),
    (["compare", "--model", "small", "--image", PHOTO, "--input-size", "64", "48"],
     "argument --input-size: an --image is center-cropped to a square"),
    (["compare"], "--model large|small is needed unless --weights is given"),
    (["classify", PHOTO, "--batch-size", "0"], "argument --batch-size: must be a positive"),
    (["evaluate", DATA, "--workers", "-1"], "argument --workers: must be an integer >= 0, got -1"),
    (["selfcheck", "--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    (["no-such-command"], "invalid choice"),
    (["weights"], "the following arguments are required"),
]


@pytest.mark.parametrize("argv, message", USAGE, ids=[" ".join(map(str, a[:3])) for a in USAGE])
def test_usage_errors_exit_2_naming_the_option(argv, message, capsys):
    if argv[0] == "compare":
        require_torchvision()
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", err
    assert err.startswith("usage: npmnv3") and message in err, err
    assert "Traceback" not in err


def test_input_errors_exit_1_with_one_line(tmp_path, capsys):
    for argv, message in ((["convert", tmp_path / "none.pth", tmp_path / "o.npz"], "no such file"),
                          (["classify", PHOTO, "--weights", tmp_path / "none.npz"],
                           "no such file; --weights takes"),
                          (["evaluate", tmp_path, "--weights", "small"], "no class folders"),
                          (["weights", "fetch", "medium"], "unknown weights 'medium'")):
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"npmnv3 {argv[0]}: error: ") and message in err, err


def test_topk_beyond_the_models_classes_is_a_usage_error(tiny_npz, capsys):
    code, out, err = run(capsys, "classify", PHOTO, "--weights", tiny_npz, "--topk", "4")
    assert code == 2 and out == "" and err.startswith("usage: npmnv3 classify"), err
    assert err.splitlines()[-1] == (f"npmnv3 classify: error: argument --topk: 4 is more than "
                                    f"the 3 classes of {tiny_npz}")
    code, out, _ = run(capsys, "classify", PHOTO, "--weights", tiny_npz, "--topk", "3")
    assert code == 0 and len(out.splitlines()) == 4             # the path, then 3 classes


def test_summary_takes_a_config_and_allocates_no_weights(capsys):
    """--width-mult 100 would need 55 GB of weights: summary only does the arithmetic."""
    tracemalloc.start()
    code, out, _ = run(capsys, "summary", "--model", "small", "--width-mult", "100",
                       "--input-size", "64", "48", "--depth", "0")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 0 and "Total params: 14,482,063,200" in out
    assert peak < 50e6, f"summary allocated {peak / 1e6:.0f} MB"
    assert "input [1, 3, 64, 48]" in out                                # H != W honoured


def test_compare_honours_input_size_with_an_image(tiny_npz, capsys):
    require_torchvision()
    code, out, _ = run(capsys, "compare", "--weights", tiny_npz, "--image", PHOTO)
    assert code == 0 and f"image {PHOTO} [1, 3, 32, 32]" in out      # the weights' own size
    code, out, _ = run(capsys, "compare", "--weights", tiny_npz, "--image", PHOTO,
                       "--input-size", "64")
    assert code == 0 and f"image {PHOTO} [1, 3, 64, 64]" in out
    code, out, _ = run(capsys, "compare", "--model", "small", "--width-mult", "0.5",
                       "--input-size", "40", "56")
    assert code == 0 and "random input (seed 0) [1, 3, 40, 56]" in out


def test_weights_path_prints_nothing_on_stdout_when_missing(capsys):
    code, out, err = run(capsys, "weights", "path", "small")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "npmnv3 weights fetch small-v1" in err


# ----------------------------------------------------------------------------- one loader


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Files a user may pass as --weights: good ones other libraries wrote, and wrong ones."""
    torchvision = require_torchvision()
    import timm
    import torch

    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(width_mult=0.5)
    torch.save(tv.state_dict(), d / "tv_small.pth")
    np.savez(d / "savez_small.npz", **{k: v.numpy() for k, v in tv.state_dict().items()})
    torch.save(timm.create_model("mobilenetv3_small_100").state_dict(), d / "timm_small.pth")
    torch.save({"foo": torch.zeros(3)}, d / "foo.pth")
    np.savez(d / "random.npz", a=np.zeros(3), b=np.ones((2, 2)))
    (d / "notes.txt").write_text("not a checkpoint\n")
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=2)
    from npmnv3.train.checkpoint import save_checkpoint
    from npmnv3.train.optim import SGD
    save_checkpoint(d / "checkpoint.npz", model, SGD(model, 0.1), epoch=1,
                    rng=np.random.default_rng(0), history={}, sched_epoch=1,
                    config={"optimizer": "sgd"}, classes=["a", "b"])
    return d


def _folder(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (60 * i, 90, 120 if c == "a" else 20)).save(
                root / c / f"{i}.png")
    return root


def test_every_weights_option_reads_the_same_files_with_the_same_messages(checkpoints, tmp_path,
                                                                          capsys):
    d = checkpoints
    data = _folder(tmp_path / "data")
    commands = {
        "classify": lambda w: ["classify", PHOTO, "--weights", w],
        "evaluate": lambda w: ["evaluate", data, "--weights", w, "--workers", "0"],
        "compare": lambda w: ["compare", "--weights", w],
        "train": lambda w: ["train", "--data", data, "--out", tmp_path / w.stem, "--weights", w,
                            "--no-progress", "--val-fraction", "0.4", "--input-size", "32",
                            "--epochs", "1", "--batch-size", "2"],
        "convert": lambda w: ["convert", w, tmp_path / "out.npz"],
    }
    wrong = {"foo.pth": "not a MobileNetV3 checkpoint: its 1 tensors (foo) match no",
             "random.npz": "not a MobileNetV3 checkpoint: its 2 tensors (a, b) match no",
             "notes.txt": "not a checkpoint: neither a PyTorch .pth",
             "checkpoint.npz": "a training checkpoint (weights, optimizer state, history): "
                               "continue it with npmnv3 train --resume"}
    for name, message in wrong.items():
        seen = set()
        for cmd, argv in commands.items():
            code, _, err = run(capsys, *argv(d / name))
            assert code == 1 and err.count("\n") == 1, (cmd, err)
            assert err.startswith(f"npmnv3 {cmd}: error: ") and message in err, (cmd, err)
            seen.add(err.split(": error: ", 1)[1])
        assert len(seen) == 1, f"{name}: different messages {seen}"
    assert "its weights alone are in model.npz next to it" in seen.pop()
    # The same good files everywhere: an np.savez of a torchvision state_dict, and timm's.
    for name in ("savez_small.npz", "timm_small.pth"):
        assert run(capsys, *commands["classify"](d / name))[0] == 0, name
        code, out, err = run(capsys, *commands["compare"](d / name))
        assert code == 0 and "modules within tolerance" in out, (name, out)
    code, out, err = run(capsys, *commands["train"](d / "timm_small.pth"))
    assert code == 0 and "wrote" in out, err
    code, out, err = run(capsys, "convert", d / "savez_small.npz", tmp_path / "s.npz")
    assert code == 0 and "source format torchvision" in out
    code, out, err = run(capsys, "convert", d / "tv_small.pth", tmp_path / "x.npz", "--from",
                         "timm")
    assert code == 1 and "the keys are torchvision's, not timm's: drop --from timm" in err


def test_convert_refuses_to_overwrite_and_names_out_when_unwritable(checkpoints, tmp_path,
                                                                   capsys):
    src, out = checkpoints / "tv_small.pth", tmp_path / "out.npz"
    assert run(capsys, "convert", src, out)[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, "convert", src, out)
    assert code == 1 and err.count("\n") == 1 and "exists already (--overwrite" in err
    assert out.read_bytes() == before
    assert run(capsys, "convert", src, out, "--overwrite")[0] == 0
    for bad in (Path("/sys/npmnv3-test.npz"), tmp_path / "no_dir" / "x.npz"):
        if bad.parent.name == "sys" and not bad.parent.is_dir():
            continue
        code, _, err = run(capsys, "convert", src, bad)
        assert code == 1 and err.startswith(f"npmnv3 convert: error: {bad}: "), err
        assert f".{bad.name}." not in err and ".tmp" not in err, err       # not the temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_classify_shows_progress_for_more_than_a_screenful(tmp_path, tiny_npz, capsys,
                                                          monkeypatch):
    import shutil

    from PIL import Image

    for i in range(12):
        Image.new("RGB", (30, 20), (20 * i, 100, 50)).save(tmp_path / f"{i:02d}.png")
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((80, 24)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)          # as on a terminal
    code, out, err = run(capsys, "classify", tmp_path, "--weights", tiny_npz, "--batch-size", 4)
    assert code == 0 and "/12 [" in err and "img/s" in err           # 12 x 4 lines > 24
    assert out.count(".png\n") == 12 and "img/s" not in out
    for argv in ([tmp_path / "00.png", tmp_path / "01.png"], [tmp_path, "--no-progress"]):
        code, out, err = run(capsys, "classify", *argv, "--weights", tiny_npz)
        assert code == 0 and err == ""


# ----------------------------------------------------------------------------- compile notice


def test_compile_notice_on_an_empty_cache(tmp_path, tiny_npz, capsys, monkeypatch):
    code = "from npmnv3.tools.jitcache import kernels_cached; print(kernels_cached())"
    for cache_dir, expected in ((tmp_path / "empty", "False"), (None, "True")):
        env = {k: v for k, v in ENV.items() if k != "NUMBA_CACHE_DIR"}
        if cache_dir is not None:
            env["NUMBA_CACHE_DIR"] = str(cache_dir)
        npmnv3.mobilenet_v3_small(width_mult=0.5).eval()(np.zeros((1, 3, 32, 32), np.float32))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.stdout.strip() == expected, (cache_dir, res)
    # The CLI says it once, before a command that runs kernels, and never for one that doesn't.
    monkeypatch.setattr(jitcache, "kernels_cached", lambda package=None: False)
    monkeypatch.setattr(jitcache, "_announced", False)
    code, out, err = run(capsys, "classify", PHOTO, PHOTO, "--weights", tiny_npz)
    assert code == 0 and err == f"npmnv3: {jitcache.MESSAGE}\n"
    assert run(capsys, "classify", PHOTO, "--weights", tiny_npz)[2] == ""      # once
    monkeypatch.setattr(jitcache, "_announced", False)
    assert run(capsys, "summary", "--model", "small", "--depth", "0")[2] == ""


# ----------------------------------------------------------------------------- selfcheck


def test_selfcheck_passes_and_prints_every_kernel(capsys):
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    for kernel in ("conv2d", "depthwise", "batchnorm train", "batchnorm eval", "hardswish",
                   "squeeze-excite", "linear", "cross-entropy"):
        assert kernel in out
    assert "0 over tolerance" in out


def test_selfcheck_rows_are_real_checks():
    rows = run_selfcheck()
    assert len(rows) > 50
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    # A finite-difference error of exactly zero would mean nothing was compared.
    assert all(r.error > 0 for r in rows if r.check.startswith("finite"))


def test_python_dash_m_runs_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "npmnv3", "--help"], capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert res.returncode == 0 and "selfcheck" in res.stdout
    res = subprocess.run([sys.executable, "-m", "npmnv3", "no-such-command"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 2 and "invalid choice" in res.stderr
