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
format, for ``load_model`` and ``npmnv3 classify``), and, with validation data, ``best.npz``
(the weights of the epoch with the highest validation accuracy so far; the earliest on a tie),
all written atomically; the run ends with ``out_dir/curves.png``, also when it is stopped by
Ctrl-C (``KeyboardInterrupt``): the checkpoint of the last finished epoch then continues it.
``fit(..., resume=checkpoint)`` continues exactly where the checkpoint left off: one generator
draws every random number, and its state is saved with the rest.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from .. import kernels as K
from ..data.folders import ArrayDataset, ImageFolder, load_folders
from ..io.load import save_weights
from .checkpoint import load_checkpoint, restore, save_checkpoint
from .optim import SGD, ExponentialLR, StepLR, rmsprop_torchvision

__all__ = ["ArrayDataset", "ImageFolder", "evaluate", "fit", "load_checkpoint", "load_folders"]
OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULERS = ("none", "cosine", "step", "exponential")
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                "train_seconds", "val_seconds", "train_images")


class CosineLR:
    """lr = initial_lr * (1 + cos(pi * epoch / epochs)) / 2 (CosineAnnealingLR, eta_min 0)."""

    def __init__(self, optimizer, epochs: int):
        self.optimizer, self.epochs, self.epoch = optimizer, epochs, 0

    def lr_at(self, epoch: int) -> float:
        return self.optimizer.initial_lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))

    def step(self):
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)


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
    if k < 2:
        raise ValueError(f"the model has {k} output: cross-entropy over a single class is "
                         f"always 0, nothing can be learned (at least 2 classes are needed)")
    if t.min() < 0 or t.max() >= k:
        n = len(data.classes) if getattr(data, "classes", None) else int(t.max()) + 1
        raise ValueError(f"{name}: labels {int(t.min())}..{int(t.max())} do not fit the model's "
                         f"{k} outputs (labels must lie in [0, {k})); call "
                         f"model.reset_classifier({n}) to give the classifier {n} outputs")


def _train_epoch(model, data, opt, rng, cfg, bar):
    """One pass over ``data``; returns (mean loss, accuracy, images trained on). The bar
    counts images, so it shows the epoch's time and images/s."""
    total_loss, correct, seen = 0.0, 0, 0
    model.train()
    for x, y in data.batches(cfg["batch_size"], rng=rng, shuffle=True, min_size=2):
        x = x.astype(model.dtype, copy=False)        # images come as float32
        model.zero_grad()
        logits = model.forward(x, rng=rng, freeze_backbone=cfg["freeze_backbone"])
        loss, cache = K.cross_entropy_forward(logits, y, label_smoothing=cfg["label_smoothing"])
        dlogits = K.cross_entropy_backward(1.0, cache)
        model.backward(dlogits, input_grad=False)   # frozen backbone: classifier grads only
        opt.step()
        total_loss += float(loss) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}",
                        refresh=False)
        bar.update(len(y))
    model.zero_grad()
    if not seen:
        raise ValueError("no training batch could be formed (need at least 2 readable images)")
    return total_loss / seen, correct / seen, seen


def evaluate(model, data, *, batch_size=64, label_smoothing=0.0):
    """(mean loss, accuracy) of ``model`` on ``data`` in eval mode (the fused fast path).
    The model is left in eval mode."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in data.batches(batch_size):
        x = x.astype(model.dtype, copy=False)
        logits = model(x)
        loss, _ = K.cross_entropy_forward(logits, y, label_smoothing=label_smoothing)
        total_loss += float(loss) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        seen += len(y)
    if not seen:
        raise ValueError("no readable image to evaluate")
    return total_loss / seen, correct / seen


def _num_images(n, batch_size, min_size):
    """Images in the batches of an epoch (a last batch under ``min_size`` is dropped)."""
    return n if n % batch_size >= min_size else n - n % batch_size


def _run_epoch(model, train_data, val_data, opt, rng, cfg, epoch, progress):
    """Train one epoch and validate; returns this epoch's history row."""
    from tqdm import tqdm

    row = {"epoch": epoch + 1, "lr": opt.lr}
    total = _num_images(len(train_data), cfg["batch_size"], 2)
    with tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="img",
              disable=None if progress else True, leave=True) as bar:
        t0 = time.perf_counter()
        row["train_loss"], row["train_acc"], row["train_images"] = _train_epoch(
            model, train_data, opt, rng, cfg, bar)
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
        callback=None, preprocessing=None, extra_meta=None):
    """Train ``model`` in place for ``epochs`` epochs (in all, counting a resumed run's).

    ``train_data``/``val_data``: ``ImageFolder``/``ArrayDataset`` (anything with ``targets``,
    ``classes`` and ``batches``); labels must lie in [0, num_classes)
    (``model.reset_classifier``).
    ``optimizer`` "sgd" | "rmsprop"; ``scheduler``: see ``make_scheduler``, stepped per epoch.
    ``out_dir``: checkpoint.npz and model.npz after every epoch, best.npz when validation
    accuracy is the highest yet, curves.png at the end or on Ctrl-C (None: nothing written).
    ``resume``: a checkpoint.npz to continue from (same architecture).
    ``bn_momentum``: batch norm's running-statistics momentum during ``fit`` (restored after);
    torchvision's 0.01 suits its ~600 ImageNet epochs, but over a short run the running
    statistics then lag far behind the weights and eval-mode accuracy collapses (digits: 14 %
    vs 96 % with 0.1 after 8 epochs). None keeps the model's own.
    ``seed`` seeds the one generator of shuffling, augmentation and dropout. ``callback(epoch,
    history)`` runs after each epoch; a true return value stops training.
    ``preprocessing``: how an image must be prepared for the trained model, recorded in the
    files written (``npmnv3 classify`` uses it); default: the validation (else training)
    data's evaluation transform (resize, center crop, mean/std), or None for arrays.
    ``extra_meta``: more JSON entries for checkpoint.npz (``npmnv3 train`` records its options).
    Resuming with more ``epochs`` than the checkpoint's run planned extends it: the cosine
    schedule continues over the new total from the epoch reached.
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
    prep = preprocessing if preprocessing is not None else _preprocessing_of(val_data, train_data)
    history, start = {k: [] for k in HISTORY_KEYS}, 0
    if resume is not None:
        start, history = restore(resume, model, opt, sched, rng, cfg, classes)
        for k in HISTORY_KEYS:                       # older checkpoints: a key added since
            history.setdefault(k, [None] * len(history["epoch"]))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    saved_momentum = model.bn_momentum
    model.bn_momentum = saved_momentum if bn_momentum is None else bn_momentum
    try:
        for epoch in range(start, epochs):
            row = _run_epoch(model, train_data, val_data, opt, rng, cfg, epoch, progress)
            with _interrupts_deferred():        # an epoch's files are written together
                if sched is not None:
                    sched.step()
                for k in HISTORY_KEYS:
                    history[k].append(row[k])
                if out is not None:
                    save_checkpoint(out / "checkpoint.npz", model, opt, epoch=epoch + 1,
                                    rng=rng, history=history,
                                    sched_epoch=getattr(sched, "epoch", 0), config=cfg,
                                    classes=classes, preprocessing=prep, extra=extra_meta)
                    save_weights(out / "model.npz", model, classes=classes,
                                 preprocessing=prep, source_name="npmnv3 train")
                    best = best_epoch(history)
                    if best == epoch + 1:
                        save_weights(out / "best.npz", model, classes=classes,
                                     preprocessing=prep, source_name="npmnv3 train",
                                     extra={"epoch": epoch + 1, "val_acc": row["val_acc"]})
                    elif best is None:          # no validation: no best.npz of another run
                        (out / "best.npz").unlink(missing_ok=True)
                if callback is not None and callback(epoch + 1, history):
                    break
    except KeyboardInterrupt:           # stopped early: the finished epochs' curves, then out
        if out is not None and history["epoch"]:
            plot_history(history, out / "curves.png")
        raise
    finally:
        model.bn_momentum = saved_momentum
        model.eval()
    if out is not None and history["epoch"]:
        plot_history(history, out / "curves.png")
    return history


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C (SIGINT) during the block takes effect when it ends, so an epoch's checkpoint,
    model, best model and history line always belong together (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got and callable(old):
        old(signal.SIGINT, None)        # Python's default handler raises KeyboardInterrupt
    elif got and old == signal.SIG_DFL:
        raise KeyboardInterrupt


def best_epoch(history) -> int | None:
    """The epoch with the highest validation accuracy (the earliest on a tie), or None
    without validation."""
    scored = [(acc, -e) for e, acc in zip(history["epoch"], history["val_acc"])
              if acc is not None]
    return -max(scored)[1] if scored else None


def _preprocessing_of(*datasets):
    """The preprocessing record of the first dataset whose transform has one."""
    for data in datasets:
        prep = getattr(getattr(data, "transform", None), "preprocessing", None)
        if prep is not None:
            return prep
    return None


def history_figure(history, title="npmnv3 training"):
    """The matplotlib Figure of ``plot_history``: loss (log scale, so one spike does not
    flatten the rest; a linear axis clipped at 3x the median if a loss is not positive) and
    accuracy per epoch, train and validation."""
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
        if what == "loss":
            _loss_axis(ax, history["train_loss"] + [v for _, v in val])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    return fig


def _loss_axis(ax, values):
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0:
        ax.set_yscale("log")
    elif v.size:
        ax.set_ylim(min(0.0, v.min()), 3 * max(np.median(v), 1e-12))
        ax.set_ylabel("cross-entropy loss (clipped at 3x the median)")


def plot_history(history, path, title="npmnv3 training"):
    """Loss and accuracy per epoch (train and validation) as a PNG, written atomically."""
    fig = history_figure(history, title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
