"""``npmnv3 train`` as a user meets it: the train -> classify -> evaluate loop (class names and
the training size travel in model.npz), run folders never overwritten silently, ``--resume``
alone, one-class folders, unreadable images, the loss curve. Tiny: MobileNetV3-Small at width
0.25, a few 40x36 images, 32-48 px crops, one or two epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npmnv3
from npmnv3.cli import main
from npmnv3.io.load import read_weights
from npmnv3.tools.classify import softmax
from npmnv3.train.loop import history_figure

TINY = ["--model", "small", "--width-mult", "0.25", "--batch-size", "4", "--no-progress"]


def folder(root: Path, classes=("cat", "dog", "owl"), per_class=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = np.clip(70 * c + rng.integers(0, 100, (36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


def train(capsys, *argv):
    code = main(["train", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_then_classify_and_evaluate(tmp_path, capsys):
    """model.npz carries the class names and the 48 px preprocessing; classify and evaluate
    use both, and --topk defaults to the 3 classes."""
    data = folder(tmp_path / "data")
    run = tmp_path / "run"
    code, out, err = train(capsys, *TINY, "--data", data, "--out", run, "--input-size", "48",
                           "--epochs", "1", "--val-fraction", "0.25")
    assert code == 0, err
    w = read_weights(run / "model.npz")
    assert w.classes == ("cat", "dog", "owl")
    assert w.preprocessing["crop_size"] == 48 and w.preprocessing["resize_size"] == 55
    photo = data / "dog" / "1.png"
    assert main(["classify", photo, "--weights", run / "model.npz", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [t["label"] for t in result["top"]] != [] and len(result["top"]) == 3
    x = npmnv3.preprocess(photo, 55, 48)[None]                     # by hand, at 55 -> 48
    probs = softmax(w.model()(x))[0]
    best = int(np.argmax(probs))
    assert result["top"][0] == {"index": best, "label": w.classes[best],
                                "prob": pytest.approx(float(probs[best]), abs=1e-6)}
    assert main(["classify", photo, "--weights", run / "model.npz"]) == 0
    text = capsys.readouterr().out
    assert f"  {w.classes[best]} ({best})" in text and "class 1" not in text
    # evaluate maps the folders to the model's class names; its top-1 is classify's.
    assert main(["evaluate", data, "--weights", run / "model.npz", "--json", "--per-image",
                 "--workers", "0", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["class_mapping"] == "the model's class names" and report["topk"] == 3
    assert report["preprocessing"]["crop_size"] == 48 and report["top5"] == 1.0
    pred = {p["image"]: p["top"][0] for p in report["predictions"]}
    assert pred[str(photo)] == best
    labels = [p["label"] for p in report["predictions"]]
    assert report["top1"] == np.mean([pred[p["image"]] == p["label"]
                                      for p in report["predictions"]])
    assert labels == [0] * 4 + [1] * 4 + [2] * 4


def test_a_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    data = folder(tmp_path / "data", per_class=3)
    run, other = tmp_path / "run", tmp_path / "other"
    base = [*TINY, "--data", data, "--input-size", "32", "--epochs", "1", "--val-fraction", "0"]
    assert train(capsys, *base, "--out", run)[0] == 0
    before = (run / "checkpoint.npz").read_bytes()
    code, _, err = train(capsys, *base, "--out", run)
    assert code == 1 and err.count("\n") == 1
    assert f"{run} holds a training run already (checkpoint.npz, model.npz): continue it with " \
           f"--resume {run / 'checkpoint.npz'}, or give --overwrite" in err
    assert (run / "checkpoint.npz").read_bytes() == before
    assert train(capsys, *base, "--out", other)[0] == 0
    code, _, err = train(capsys, "--resume", run / "checkpoint.npz", "--epochs", "2", "--out",
                         other, "--no-progress")
    assert code == 1 and "holds a training run already" in err            # another run's
    assert train(capsys, *base, "--out", run, "--overwrite", "--seed", "3")[0] == 0
    assert (run / "checkpoint.npz").read_bytes() != before
    # A run with validation leaves best.npz; one started afresh without leaves none of it.
    assert train(capsys, *base[:-1], "0.34", "--out", run, "--overwrite")[0] == 0
    assert (run / "best.npz").is_file()
    assert train(capsys, *base, "--out", run, "--overwrite")[0] == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.npz", "curves.png", "model.npz"]


def test_resume_alone_keeps_the_options_and_extends_the_schedule(tmp_path, capsys):
    data = folder(tmp_path / "data", per_class=3)
    run = tmp_path / "run"
    ck = run / "checkpoint.npz"
    assert train(capsys, *TINY, "--data", data, "--out", run, "--input-size", "40",
                 "--epochs", "2", "--lr", "0.05", "--val-fraction", "0")[0] == 0
    # Nothing left to train: said so, nothing written.
    before = ck.read_bytes()
    code, out, _ = train(capsys, "--resume", ck)
    assert code == 0 and out.strip() == (f"{ck} has trained 2 of 2 epochs: nothing to train, "
                                         f"nothing written (give --epochs 7 to train 5 more)")
    assert ck.read_bytes() == before
    # Options that contradict the run are refused (usage error); agreeing ones are fine.
    code, _, err = train(capsys, "--resume", ck, "--epochs", "4", "--input-size", "64")
    assert code == 2 and "--input-size 64 (the run has 40)" in err
    code, out, err = train(capsys, "--resume", ck, "--epochs", "4", "--model", "small",
                           "--no-progress")
    assert code == 0, err
    assert "resuming after epoch 2 of 4" in out and "epoch 4:" in out and "epoch 2:" not in out
    ckpt = npmnv3.load_checkpoint(ck)
    meta = ckpt["meta"]
    assert meta["epoch"] == 4 and meta["preprocessing"]["crop_size"] == 40   # not 224
    assert meta["arch"].width_mult == 0.25 and meta["train_args"]["lr"] == 0.05
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * e / n)) for e, n in ((0, 2), (1, 2),
                                                                          (2, 4), (3, 4))]
    np.testing.assert_allclose(meta["history"]["lr"], cosine, rtol=1e-12)   # no lr 0 epochs
    assert read_weights(run / "model.npz").preprocessing["crop_size"] == 40


def test_one_class_is_refused(tmp_path, capsys):
    data = folder(tmp_path / "data", classes=("only",))
    code, _, err = train(capsys, *TINY, "--data", data, "--out", tmp_path / "run",
                         "--val-fraction", "0")
    assert code == 1 and err.count("\n") == 1
    assert "one class folder (only): a classifier needs at least 2 classes" in err
    assert not (tmp_path / "run").exists()
    model = npmnv3.mobilenet_v3_small(width_mult=0.25, num_classes=1)
    ds = npmnv3.ArrayDataset(np.zeros((4, 3, 32, 32), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="the model has 1 output"):
        npmnv3.fit(model, ds, epochs=1, batch_size=2)


def test_unreadable_images_are_reported_first_and_not_counted(tmp_path, capsys, monkeypatch):
    data = folder(tmp_path / "data", per_class=3)
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nothing")
    good = (data / "dog" / "0.png").read_bytes()
    (data / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    seen = {}

    def fake_fit(model, train_data, val_data, **kw):      # what was printed before training
        printed = capsys.readouterr()
        seen.update(err=printed.err, out=printed.out, n=len(train_data))
        return {"epoch": []}

    import npmnv3.train.loop as loop
    monkeypatch.setattr(loop, "fit", fake_fit)
    code, out, err = train(capsys, *TINY, "--data", data, "--out", tmp_path / "run",
                           "--val-fraction", "0")
    assert code == 0 and seen["n"] == 9
    assert seen["err"].startswith("npmnv3 train: skipping 2 unreadable image(s), not used: ")
    assert "broken.png" in seen["err"] and "cut.png" in seen["err"]
    assert "3 classes, 9 training images" in seen["out"] and "wrote" not in out


def test_loss_curve_is_log_scale_or_clipped():
    h = {"epoch": [1, 2, 3, 4], "train_loss": [2.3, 1.1, 0.4, 0.2],
         "val_loss": [2.2, 95.0, 0.5, 0.3], "train_acc": [0.1, 0.5, 0.8, 0.9],
         "val_acc": [0.1, 0.2, 0.7, 0.8]}
    loss_ax, acc_ax = history_figure(h).axes
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    h["train_loss"][3] = 0.0                       # not plottable on a log axis: clipped
    loss_ax = history_figure(h).axes[0]
    assert loss_ax.get_yscale() == "linear"
    assert loss_ax.get_ylim()[1] == pytest.approx(3 * np.median([2.3, 1.1, 0.4, 0.0, 2.2, 95.0,
                                                                 0.5, 0.3]))


def test_val_split_epoch_speed_and_best_checkpoint(tmp_path, capsys):
    """--val-split holds out a stratified fraction; each epoch's line gives its time and
    images/s; best.npz is written with validation data and named in the last line."""
    data = folder(tmp_path / "data")
    run = tmp_path / "run"
    code, out, err = train(capsys, *TINY, "--data", data, "--out", run, "--input-size", "32",
                           "--epochs", "2", "--val-split", "0.25")
    assert code == 0, err
    assert "3 classes, 9 training images, 3 validation images" in out
    h = npmnv3.load_checkpoint(run / "checkpoint.npz")["meta"]["history"]
    assert h["train_images"] == [8, 8]                 # 9 images, batch 4: the last 1 dropped
    for i in range(2):
        speed = h["train_images"][i] / h["train_seconds"][i]
        assert (f"epoch {i + 1}: " in out and f", {h['train_seconds'][i]:.1f} s ({speed:.1f} "
                f"img/s) + {h['val_seconds'][i]:.1f} s validation" in out), out
    best = max(range(2), key=lambda i: (h["val_acc"][i], -i))
    assert out.splitlines()[-1].endswith(f"(2 epochs; best.npz: epoch {best + 1}, val acc "
                                         f"{h['val_acc'][best]:.4f})")
    w = read_weights(run / "best.npz")
    assert w.classes == ("cat", "dog", "owl") and w.preprocessing["crop_size"] == 32
    # A val/ folder is the validation set: --val-split beside it is refused, not ignored.
    (data / "val" / "cat").mkdir(parents=True)
    code, _, err = train(capsys, *TINY, "--data", data, "--out", tmp_path / "r2",
                         "--val-split", "0.5")
    assert code == 2 and "argument --val-split: " in err and "has a val/ folder" in err
    code, _, err = train(capsys, *TINY, "--data", folder(tmp_path / "few", per_class=1),
                         "--out", tmp_path / "r3", "--val-split", "0.2")
    assert code == 1 and err.count("\n") == 1
    assert "--val-split 0.2 leaves no validation image (3 images in 3 classes)" in err, err


def test_best_npz_holds_the_epoch_of_the_highest_validation_accuracy(tmp_path, monkeypatch):
    """fit keeps best.npz at the epoch of the highest validation accuracy (the earliest of a
    tie), model.npz at the last; the weights are that epoch's, bit for bit."""
    import npmnv3.train.loop as loop

    scripted = iter([0.5, 0.8, 0.8, 0.3])             # epoch 2 ties epoch 3: 2 is kept
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (1.0, next(scripted)))
    rng = np.random.default_rng(0)
    ds = npmnv3.ArrayDataset(rng.standard_normal((8, 3, 32, 32)).astype(np.float32),
                             np.arange(8) % 3)
    model = npmnv3.mobilenet_v3_small(width_mult=0.25, num_classes=3, seed=0)
    states = []
    h = npmnv3.fit(model, ds, ds, epochs=4, batch_size=4, out_dir=tmp_path, progress=False,
                   callback=lambda e, h: states.append(
                       {k: v.copy() for k, v in model.state_dict().items()}))
    assert loop.best_epoch(h) == 2
    best, last = (read_weights(tmp_path / f).state_dict for f in ("best.npz", "model.npz"))
    for k in states[1]:
        np.testing.assert_array_equal(best[k], states[1][k], err_msg=k)
        np.testing.assert_array_equal(last[k], states[3][k], err_msg=k)
    assert any(not np.array_equal(states[1][k], states[3][k]) for k in states[1])
    assert loop.best_epoch({"epoch": [1, 2], "val_acc": [None, None]}) is None


def test_the_progress_bar_counts_images(monkeypatch):
    """The epoch bar's unit is the image and it reaches its total, so tqdm shows the epoch's
    elapsed time and images/s."""
    import tqdm

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    ds = npmnv3.ArrayDataset(np.zeros((9, 3, 32, 32), np.float32), np.arange(9) % 3)
    model = npmnv3.mobilenet_v3_small(width_mult=0.25, num_classes=3, seed=0)
    h = npmnv3.fit(model, ds, epochs=1, batch_size=4, progress=True)
    (bar,) = bars
    assert bar.kw["unit"] == "img" and bar.kw["total"] == bar.n == h["train_images"][0] == 8


def test_the_same_seed_trains_the_same_weights(tmp_path, capsys):
    """--seed fixes initialisation, split, order, augmentation and dropout."""
    data = folder(tmp_path / "data")
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert train(capsys, *TINY, "--data", data, "--out", tmp_path / name, "--input-size",
                     "32", "--epochs", "2", "--val-split", "0.25", "--seed", seed)[0] == 0
        ck = npmnv3.load_checkpoint(tmp_path / name / "checkpoint.npz")
        runs[name] = ck["model"], ck["meta"]["history"]
    (wa, ha), (wb, hb), (wc, hc) = runs["a"], runs["b"], runs["c"]
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    for key in ("train_loss", "val_loss", "val_acc"):
        assert ha[key] == hb[key], key
    assert ha["train_loss"] != hc["train_loss"]
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)
