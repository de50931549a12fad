"""Training checkpoints: everything a run needs to continue exactly where it stopped.

``checkpoint.npz`` is an npmnv3 ``.npz`` (``io/npz.py``) of format ``npmnv3-train-checkpoint``:
arrays ``model/<key>`` (the state_dict) and ``optimizer/<state>/<key>``, and in its metadata the
network (``arch``), the batch-norm eps, dtype, the epoch reached, the generator's state, the
schedule's position, the history, the training configuration, the class names and the
preprocessing. ``fit(..., resume=path)`` continues from it bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..io.npz import CHECKPOINT_FORMAT, read_npz, write_npz
from ..nn.config import MobileNetV3Config


def save_checkpoint(path, model, opt, *, epoch, rng, history, sched_epoch, config, classes,
                    preprocessing=None, extra=None):
    """Model state_dict + optimizer state + epoch + RNG state + history (+ ``extra`` meta
    entries), atomically."""
    meta = {**(extra or {}), "format": CHECKPOINT_FORMAT, "arch": model.config.to_dict(),
            "bn_eps": model.bn_eps,
            "dtype": np.dtype(model.dtype).name, "epoch": epoch,
            "rng_state": rng.bit_generator.state, "scheduler_epoch": sched_epoch,
            "history": history, "config": config, "classes": classes,
            "preprocessing": preprocessing, "source_name": "npmnv3 train",
            "source_format": "npmnv3", "num_parameters": model.num_parameters()}
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optimizer/{k}": v for k, v in opt.state_dict().items()})
    write_npz(path, arrays, meta)


def load_checkpoint(path) -> dict:
    """``{"model": state_dict, "optimizer": optimizer state, "meta": {...}}`` of a checkpoint
    written by ``fit``; ``meta["arch"]`` is a ``MobileNetV3Config``. Raises ``ValueError``
    (``CheckpointError``) for anything else, saying what the file is."""
    try:
        arrays, meta = read_npz(path, formats=(CHECKPOINT_FORMAT,))
    except ValueError as e:
        if "an npmnv3-weights file" in str(e):
            raise ValueError(f"{path}: holds weights only, not a training checkpoint: start "
                             f"from them with --weights (load_state_dict)") from None
        raise
    meta["arch"] = MobileNetV3Config.from_dict(meta["arch"], f"{path}: arch")
    out = {"model": {}, "optimizer": {}, "meta": meta}
    for k, v in arrays.items():
        part, _, key = k.partition("/")
        if part in ("model", "optimizer"):
            out[part][key] = v
    return out


def restore(path, model, opt, sched, rng, cfg, classes):
    """Load a checkpoint into model, optimizer, schedule and generator; (epoch, history)."""
    ck = load_checkpoint(path)
    meta = ck["meta"]
    if meta["arch"] != model.config:
        raise ValueError(f"{path}: the checkpoint is of {meta['arch'].describe()}, but the model "
                         f"to train is {model.config.describe()}")
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
        if hasattr(sched, "lr_at"):     # cosine over this run's epochs (more: extended)
            opt.lr = sched.lr_at(sched.epoch)
    rng.bit_generator.state = meta["rng_state"]
    return int(meta["epoch"]), meta["history"]
