"""Training and fine-tuning with npmnv3's own backward: ``fit``, checkpoints, ``npmnv3 train``.

One epoch: shuffle, augment (``npmnv3.data_folder``), then per batch forward in train mode,
softmax cross-entropy (optionally label-smoothed), ``model.backward``, one optimizer step
(``npmnv3.optim``: SGD, or RMSprop as torchvision's MobileNetV3 recipe sets it: alpha 0.9,
eps 0.0316); the learning-rate schedule steps once per epoch. Validation runs in eval mode
through the fused fast path. ``freeze_backbone``: the backbone runs in eval mode (its parameters
*and* batch-norm statistics stay fixed) and only the classifier is trained, its backward stopping
at the head.

Each epoch ends with ``out_dir/checkpoint.npz`` (model state_dict, optimizer state, epoch, RNG
state, history, architecture) and ``out_dir/model.npz`` (the weights in ``npmnv3 convert``'s
format, for ``load_model`` and ``npmnv3 classify``), both written atomically; the run ends with
``out_dir/curves.png``. ``fit(..., resume=checkpoint)`` continues exactly where the checkpoint
left off: one generator draws every random number, and its state is saved with the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import kernels as K
from ..data.folders import ArrayDataset, ImageFolder, load_folders
from ..io.convert import (
    FORMAT,
    FORMAT_VERSION,
    META_KEY,
    build_model,
    check_arch,
    load_weights,
    write_npz_with_meta,
)
from .optim import SGD, ExponentialLR, StepLR, rmsprop_torchvision

__all__ = ["ArrayDataset", "ImageFolder", "evaluate", "fit", "load_checkpoint", "load_folders",
           "main"]

CKPT_FORMAT = "npmnv3-train-checkpoint"
CKPT_VERSION = 1
OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULERS = ("none", "cosine", "step", "exponential")
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                "train_seconds", "val_seconds")


class CosineLR:
    """lr = initial_lr * (1 + cos(pi * epoch / epochs)) / 2 (CosineAnnealingLR, eta_min 0)."""

    def __init__(self, optimizer, epochs: int):
        self.optimizer, self.epochs, self.epoch = optimizer, epochs, 0

    def step(self):
        self.epoch += 1
        self.optimizer.lr = self.optimizer.initial_lr * 0.5 * (
            1 + math.cos(math.pi * self.epoch / self.epochs))


def make_optimizer(model, name, lr, momentum=0.9, weight_decay=0.0):
    if name == "sgd":
        return SGD(model, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":                   # torchvision references/classification/train.py
        return rmsprop_torchvision(model, lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_scheduler(optimizer, scheduler, epochs):
    """None/"none", "cosine" (over ``epochs``), "step" (torchvision's MobileNetV3 recipe:
    x0.973 every 2 epochs), "exponential" (x0.95 per epoch), or a dict with a "name" and that
    scheduler's arguments (``{"name": "step", "step_size": 3, "gamma": 0.5}``)."""
    args = dict(scheduler) if isinstance(scheduler, dict) else {"name": scheduler or "none"}
    name = args.pop("name", None)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS} (or a dict with 'name'), got "
                         f"{scheduler!r}")
    try:
        if name == "cosine":
            return CosineLR(optimizer, args.pop("epochs", epochs), **args)
        if name == "step":
            return StepLR(optimizer, **{"step_size": 2, "gamma": 0.973, **args})
        if name == "exponential":
            return ExponentialLR(optimizer, **{"gamma": 0.95, **args})
    except TypeError as e:
        raise ValueError(f"scheduler {scheduler!r}: {e}") from None
    return None


# ----------------------------------------------------------------------------- one epoch

def _check_labels(data, model, name):
    if data is None:
        return
    t = np.asarray(data.targets)
    if t.size == 0:
        raise ValueError(f"{name} holds no images")
    k = model.spec.num_classes
    if t.min() < 0 or t.max() >= k:
        n = len(data.classes) if getattr(data, "classes", None) else int(t.max()) + 1
        raise ValueError(f"{name}: labels {int(t.min())}..{int(t.max())} do not fit the model's "
                         f"{k} outputs (labels must lie in [0, {k})); call "
                         f"model.reset_classifier({n}) to give the classifier {n} outputs")


def _train_epoch(model, data, opt, rng, cfg, bar):
    """One pass over ``data``; returns (mean loss, accuracy)."""
    total_loss, correct, seen = 0.0, 0, 0
    model.train()
    for x, y in data.batches(cfg["batch_size"], rng=rng, shuffle=True, min_size=2):
        model.zero_grad()
        logits = model.forward(x, rng=rng, freeze_backbone=cfg["freeze_backbone"])
        loss, cache = K.cross_entropy_forward(logits, y, label_smoothing=cfg["label_smoothing"])
        dlogits = K.cross_entropy_backward(1.0, cache)
        model.backward(dlogits, input_grad=False)   # frozen backbone: classifier grads only
        opt.step()
        total_loss += float(loss) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    model.zero_grad()
    if not seen:
        raise ValueError("no training batch could be formed (need at least 2 readable images)")
    return total_loss / seen, correct / seen


def evaluate(model, data, *, batch_size=64, label_smoothing=0.0):
    """(mean loss, accuracy) of ``model`` on ``data`` in eval mode (the fused fast path).
    The model is left in eval mode."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in data.batches(batch_size):
        logits = model(x)
        loss, _ = K.cross_entropy_forward(logits, y, label_smoothing=label_smoothing)
        total_loss += float(loss) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += len(y)
    if not seen:
        raise ValueError("no readable image to evaluate")
    return total_loss / seen, correct / seen


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, opt, *, epoch, rng, history, sched_epoch, config, classes):
    """Model state_dict + optimizer state + epoch + RNG state + history, atomically."""
    meta = {"format": CKPT_FORMAT, "format_version": CKPT_VERSION, "arch": dict(model.arch),
            "dtype": np.dtype(model.dtype).name, "epoch": epoch,
            "rng_state": rng.bit_generator.state, "scheduler_epoch": sched_epoch,
            "history": history, "config": config, "classes": classes}
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optimizer/{k}": v for k, v in opt.state_dict().items()})
    write_npz_with_meta(path, arrays, meta)


def save_weights(path, model, classes=None):
    """The weights in ``npmnv3 convert``'s .npz format (``load_model`` reads them); returns
    False for a custom architecture, which that format cannot describe."""
    try:
        arch = check_arch(dict(model.arch))
    except ValueError:
        return False
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch,
            "source_name": "npmnv3 train", "num_parameters": model.num_parameters(),
            "classes": classes}
    write_npz_with_meta(path, model.state_dict(), meta)
    return True


def load_checkpoint(path) -> dict:
    """``{"model": state_dict, "optimizer": optimizer state, "meta": {...}}`` of a checkpoint
    written by ``fit``. Raises ``ValueError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    except Exception as e:
        raise ValueError(f"{path}: not a readable npmnv3 training checkpoint ({type(e).__name__}"
                         f": {e})") from None
    if meta.get("format") != CKPT_FORMAT:
        hint = ("; it holds weights only: start from them with --weights / load_state_dict"
                if meta.get("format") == FORMAT else "")
        raise ValueError(f"{path}: not an npmnv3 training checkpoint (format "
                         f"{meta.get('format')!r}){hint}")
    if meta.get("format_version") != CKPT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('format_version')!r}; "
                         f"this npmnv3 reads version {CKPT_VERSION}")
    out = {"model": {}, "optimizer": {}, "meta": meta}
    for k, v in arrays.items():
        part, _, key = k.partition("/")
        if part in ("model", "optimizer"):
            out[part][key] = v
    return out


def _describe(arch: dict) -> str:
    return "mobilenet_v3_{}({})".format(arch.get("arch"), ", ".join(
        f"{k}={v!r}" for k, v in sorted(arch.items()) if k != "arch"))


def _resume(path, model, opt, sched, rng, cfg, classes):
    """Load a checkpoint into model, optimizer, schedule and generator; (epoch, history)."""
    ck = load_checkpoint(path)
    meta = ck["meta"]
    if meta["arch"] != model.arch:
        raise ValueError(f"{path}: the checkpoint is of {_describe(meta['arch'])}, but the model "
                         f"to train is {_describe(model.arch)}")
    if meta["config"]["optimizer"] != cfg["optimizer"]:
        raise ValueError(f"{path}: the checkpoint was trained with optimizer "
                         f"{meta['config']['optimizer']!r}, not {cfg['optimizer']!r}")
    if classes is not None and meta.get("classes") not in (None, classes):
        raise ValueError(f"{path}: the checkpoint was trained on the classes "
                         f"{meta['classes']}, the data has {classes}")
    try:
        model.load_state_dict(ck["model"], strict=True)
        opt.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: the checkpoint does not fit the model: {e}") from None
    if sched is not None:
        sched.epoch = meta["scheduler_epoch"]
    rng.bit_generator.state = meta["rng_state"]
    return int(meta["epoch"]), meta["history"]


def _num_batches(n, batch_size, min_size):
    return n // batch_size + (1 if n % batch_size >= min_size else 0)


def _run_epoch(model, train_data, val_data, opt, rng, cfg, epoch, progress):
    """Train one epoch and validate; returns this epoch's history row."""
    from tqdm import tqdm

    row = {"epoch": epoch + 1, "lr": opt.lr}
    total = _num_batches(len(train_data), cfg["batch_size"], 2)
    with tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch",
              disable=not progress, leave=True) as bar:
        t0 = time.perf_counter()
        row["train_loss"], row["train_acc"] = _train_epoch(model, train_data, opt, rng, cfg, bar)
        t1 = time.perf_counter()
        row["val_loss"] = row["val_acc"] = None
        if val_data is not None:
            row["val_loss"], row["val_acc"] = evaluate(
                model, val_data, batch_size=cfg["batch_size"],
                label_smoothing=cfg["label_smoothing"])
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_acc']:.3f}",
                            val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_acc']:.3f}")
        row["train_seconds"], row["val_seconds"] = t1 - t0, time.perf_counter() - t1
    return row


def _check_config(cfg):
    for k in ("epochs", "batch_size"):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if cfg["batch_size"] < 2:
        raise ValueError("batch_size must be >= 2: batch norm in train mode needs 2 samples")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg['optimizer']!r}")
    if cfg["bn_momentum"] is not None and not 0.0 <= cfg["bn_momentum"] <= 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1] or None, got {cfg['bn_momentum']}")
    if not 0.0 <= cfg["label_smoothing"] <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {cfg['label_smoothing']}")


def fit(model, train_data, val_data=None, *, epochs, batch_size=32, optimizer="sgd", lr=0.01,
        momentum=0.9, weight_decay=0.0, label_smoothing=0.0, freeze_backbone=False,
        scheduler="cosine", bn_momentum=0.1, out_dir=None, resume=None, seed=0, progress=True,
        callback=None):
    """Train ``model`` in place for ``epochs`` epochs (in all, counting a resumed run's).

    ``train_data``/``val_data``: ``ImageFolder``/``ArrayDataset`` (anything with ``targets``,
    ``classes`` and ``batches``); labels must lie in [0, num_classes)
    (``model.reset_classifier``).
    ``optimizer`` "sgd" | "rmsprop"; ``scheduler``: see ``make_scheduler``, stepped per epoch.
    ``out_dir``: checkpoint.npz and model.npz after every epoch, curves.png at the end (None:
    nothing written). ``resume``: a checkpoint.npz to continue from (same architecture).
    ``bn_momentum``: batch norm's running-statistics momentum during ``fit`` (restored after);
    torchvision's 0.01 suits its ~600 ImageNet epochs, but over a short run the running
    statistics then lag far behind the weights and eval-mode accuracy collapses (digits: 14 %
    vs 96 % with 0.1 after 8 epochs). None keeps the model's own.
    ``seed`` seeds the one generator of shuffling, augmentation and dropout. ``callback(epoch,
    history)`` runs after each epoch; a true return value stops training.
    Returns the history: per-epoch lists of ``HISTORY_KEYS``. The model ends in eval mode.
    """
    cfg = {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
           "momentum": momentum, "weight_decay": weight_decay,
           "label_smoothing": label_smoothing, "freeze_backbone": bool(freeze_backbone),
           "scheduler": scheduler, "bn_momentum": bn_momentum, "seed": seed}
    _check_config(cfg)
    _check_labels(train_data, model, "train_data")
    _check_labels(val_data, model, "val_data")
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    sched = make_scheduler(opt, scheduler, epochs)
    rng = np.random.default_rng(seed)
    classes = getattr(train_data, "classes", None)
    history, start = {k: [] for k in HISTORY_KEYS}, 0
    if resume is not None:
        start, history = _resume(resume, model, opt, sched, rng, cfg, classes)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    saved_momentum = model.bn_momentum
    model.bn_momentum = saved_momentum if bn_momentum is None else bn_momentum
    try:
        for epoch in range(start, epochs):
            row = _run_epoch(model, train_data, val_data, opt, rng, cfg, epoch, progress)
            if sched is not None:
                sched.step()
            for k in HISTORY_KEYS:
                history[k].append(row[k])
            if out is not None:
                save_checkpoint(out / "checkpoint.npz", model, opt, epoch=epoch + 1, rng=rng,
                                history=history, sched_epoch=getattr(sched, "epoch", 0),
                                config=cfg, classes=classes)
                save_weights(out / "model.npz", model, classes)
            if callback is not None and callback(epoch + 1, history):
                break
    finally:
        model.bn_momentum = saved_momentum
        model.eval()
    if out is not None and history["epoch"]:
        plot_history(history, out / "curves.png")
    return history


def plot_history(history, path, title="npmnv3 training"):
    """Loss and accuracy per epoch (train and validation) as a PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    epochs = history["epoch"]
    for ax, what in zip(fig.subplots(1, 2), ("loss", "acc")):
        ax.plot(epochs, history[f"train_{what}"], "o-", label="train")
        val = [(e, v) for e, v in zip(epochs, history[f"val_{what}"]) if v is not None]
        if val:
            ax.plot(*zip(*val), "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"loss": "cross-entropy loss", "acc": "top-1 accuracy"}[what])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):                  # one line on stderr and exit 1, as for errors
        raise ValueError(message)


class _Help(argparse.HelpFormatter):
    def _get_help_string(self, action):        # the default where there is one worth showing
        d = action.default
        show = d is not None and d is not False and d is not argparse.SUPPRESS
        return (action.help or "") + (" (default: %(default)s)" if show else "")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="npmnv3 train", description="Train or fine-tune a MobileNetV3 on an image "
                "folder (one sub-directory per class) with npmnv3's own backward.",
                formatter_class=_Help)
    a = p.add_argument
    a("--data", required=True, metavar="DIR", help="class folders; or train/ and val/ holding "
      "them; a val/ beside the class folders is the validation set")
    a("--out", required=True, metavar="DIR", help="checkpoint.npz, model.npz, curves.png")
    a("--model", choices=("large", "small"), help="default: what --weights holds")
    a("--width-mult", type=float, metavar="W", help="default 1.0 (or what --weights holds)")
    a("--reduced-tail", action="store_true", help="halve the last stage (torchvision's "
      "reduced_tail)")
    a("--dilated", action="store_true", help="dilate the last stage (output stride 16)")
    a("--weights", metavar="FILE", help="start from these weights (.npz or torchvision .pth); "
      "the classifier is replaced when the number of classes differs")
    a("--freeze-backbone", action="store_true", help="train the classifier only (backbone "
      "parameters and batch-norm statistics fixed)")
    a("--resume", metavar="FILE", help="continue from a checkpoint.npz of the same model")
    a("--epochs", type=int, default=10, metavar="N", help="epochs in all (with --resume too)")
    a("--batch-size", type=int, default=32, metavar="B", help="images per step")
    a("--optimizer", choices=OPTIMIZERS, default="sgd", help="rmsprop: torchvision's recipe "
      "(alpha 0.9, eps 0.0316)")
    a("--lr", type=float, default=0.01, help="initial learning rate")
    a("--momentum", type=float, default=0.9, help="SGD / RMSprop momentum")
    a("--weight-decay", type=float, default=1e-5, metavar="WD", help="L2, on every parameter")
    a("--label-smoothing", type=float, default=0.0, metavar="EPS", help="0 to 1")
    a("--scheduler", choices=SCHEDULERS, default="cosine", help="per-epoch learning rate")
    a("--bn-momentum", type=float, default=0.1, metavar="M", help="batch norm's running-statistics "
      "momentum while training (torchvision's model uses 0.01, too slow for short runs)")
    a("--input-size", type=int, default=224, metavar="S", help="training crop")
    a("--resize-size", type=int, metavar="R", help="validation: resize to R, center crop S "
      "(default: S * 256 / 224)")
    a("--min-scale", type=float, default=0.08, metavar="A",
      help="RandomResizedCrop's smallest area fraction")
    a("--no-hflip", action="store_true", help="no random horizontal flips")
    a("--val-fraction", type=float, default=0.1, metavar="F",
      help="held out per class when there is no val/ folder (0: no validation)")
    a("--dtype", choices=("float32", "float64"), default="float32", help="model precision")
    a("--seed", type=int, default=0, help="initialisation, split, order, augmentation, dropout")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def _cli_model(args, num_classes: int):
    given = {"arch": args.model, "width_mult": args.width_mult,
             "reduced_tail": args.reduced_tail or None}
    if args.weights is None:
        arch = {**given, "dilated": args.dilated, "num_classes": num_classes}
        return build_model(arch, dtype=args.dtype, seed=args.seed)
    sd, arch = load_weights(args.weights)
    clash = [f"{k} {v!r} given, weights have {arch[k]!r}" for k, v in given.items()
             if v is not None and v != arch[k]]
    if clash:
        raise ValueError(f"{args.weights} does not fit the options: {', '.join(clash)}")
    model = build_model({**arch, "dilated": args.dilated}, dtype=args.dtype, seed=args.seed)
    model.load_state_dict(sd)
    if arch["num_classes"] != num_classes:
        model.reset_classifier(num_classes, rng=args.seed)
    return model


def _run(args) -> int:
    if args.model is None and args.weights is None:
        raise ValueError("--model large|small is needed unless --weights is given")
    train, val = load_folders(args.data, size=args.input_size, val_fraction=args.val_fraction,
                              seed=args.seed, scale=(args.min_scale, 1.0),
                              hflip=0.0 if args.no_hflip else 0.5, resize_size=args.resize_size)
    model = _cli_model(args, len(train.classes))
    print(f"data {args.data}: {len(train.classes)} classes, {len(train)} training images, "
          f"{len(val) if val is not None else 0} validation images")
    print(f"model {_describe(model.arch)}, {model.num_parameters():,} parameters, "
          f"{'classifier only' if args.freeze_backbone else 'all layers'}")
    h = fit(model, train, val, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
            freeze_backbone=args.freeze_backbone, scheduler=args.scheduler,
            bn_momentum=args.bn_momentum, out_dir=args.out,
            resume=args.resume, seed=args.seed, progress=not args.no_progress)
    for i, e in enumerate(h["epoch"]):
        val_txt = ("" if h["val_loss"][i] is None else
                   f", val loss {h['val_loss'][i]:.4f} acc {h['val_acc'][i]:.4f}")
        print(f"epoch {e}: lr {h['lr'][i]:.4g}, train loss {h['train_loss'][i]:.4f} acc "
              f"{h['train_acc'][i]:.4f}{val_txt}, {h['train_seconds'][i]:.1f} s")
    skipped = train.skipped + (val.skipped if val is not None and val.skipped is not
                               train.skipped else [])
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0][0]}: "
              f"{skipped[0][1]}", file=sys.stderr)
    out = Path(args.out)
    print(f"wrote {out / 'checkpoint.npz'}, {out / 'model.npz'}, {out / 'curves.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``npmnv3 train ...``: errors print one line on stderr and return 1."""
    try:
        return _run(build_parser().parse_args(argv))
    except (ValueError, OSError) as e:       # CheckpointError is a ValueError
        msg = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
        print(f"npmnv3 train: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("npmnv3 train: interrupted (continue with --resume OUT/checkpoint.npz)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
