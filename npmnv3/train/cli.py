"""``npmnv3 train``: train or fine-tune a MobileNetV3 on an image folder from the command line.

A run folder (``--out``) holds ``checkpoint.npz`` (after every epoch: weights, optimizer state,
generator state, history, and every option of this command), ``model.npz`` (the last epoch's
weights with class names and preprocessing, for ``npmnv3 classify``/``evaluate --weights``),
``best.npz`` (with validation data: the epoch of the highest validation accuracy) and
``curves.png``. Ctrl-C stops the run early: the finished epochs' files stay (curves.png
included) and ``--resume`` continues from the last one. ``--seed`` fixes every random choice
(initialisation, validation split, order, augmentation, dropout): the same command trains the
same weights. ``--resume OUT/checkpoint.npz`` alone continues the run with the options it was
started with (model, input size, optimizer, schedule, data folder, ...); ``--epochs N`` makes
the run longer (the cosine schedule is then spread over the new total from the epoch reached).
An option given with ``--resume`` must agree with the checkpoint's, except ``--epochs``,
``--data`` (the same classes, moved) and ``--out``. A folder that holds a run already is never
overwritten silently: ``--resume`` continues it, ``--overwrite`` starts afresh.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..tools.cliargs import (
    HelpFormatter,
    UsageError,
    fraction,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
)

OPTIMIZERS = ("sgd", "rmsprop")              # train/loop.py's (not imported: --help stays fast)
SCHEDULERS = ("none", "cosine", "step", "exponential")
# The options that define a run (recorded in checkpoint.npz; a resume keeps them) and their
# defaults; None: derived (input size, resize size) or taken from --weights (model, width).
RUN_DEFAULTS = {
    "model": None, "width_mult": None, "reduced_tail": False, "dilated": False,
    "weights": None, "freeze_backbone": False, "batch_size": 32, "optimizer": "sgd",
    "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "label_smoothing": 0.0,
    "scheduler": "cosine", "bn_momentum": 0.1, "input_size": 224, "resize_size": None,
    "min_scale": 0.08, "no_hflip": False, "val_split": 0.1, "dtype": "float32", "seed": 0,
}
FREE_DEFAULTS = {"epochs": 10, "data": None, "out": None}     # may change on --resume
RUN_FILES = ("checkpoint.npz", "model.npz", "best.npz")


def register(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune on an image folder (one sub-directory "
                       "per class)", formatter_class=HelpFormatter, allow_abbrev=False,
                       description="Train or fine-tune a MobileNetV3 on an image folder (one "
                       "sub-directory per class) with npmnv3's own backward.")
    p.set_defaults(run=cmd_train, parser=p, uses_kernels=True)
    defaults = {**RUN_DEFAULTS, **FREE_DEFAULTS}

    def a(flag, help, *aliases, **kw):   # every option defaults to None: given or not is known
        d = defaults.get(flag.lstrip("-").replace("-", "_"))
        shown = "" if d is None or d is False else f" (default: {d})"
        p.add_argument(flag, *aliases, help=help + shown, default=None, **kw)

    a("--data", "class folders; or train/ and val/ holding them; a val/ beside the class "
      "folders is the validation set (with --resume: the run's)", metavar="DIR")
    a("--out", "the run folder: checkpoint.npz, model.npz (last epoch), best.npz (best "
      "validation accuracy), curves.png (with --resume: the checkpoint's folder)", metavar="DIR")
    a("--resume", "continue the run of this checkpoint.npz with its options", metavar="FILE")
    a("--overwrite", "replace the run in --out (otherwise refused)", action="store_true")
    a("--model", "default: what --weights holds", choices=("large", "small"))
    a("--width-mult", "default 1.0 (or what --weights holds)", type=positive_float,
      metavar="W")
    a("--reduced-tail", "halve the last stage (torchvision's reduced_tail)", action="store_true")
    a("--dilated", "dilate the last stage (output stride 16)", action="store_true")
    a("--weights", "start from these weights: registry name, .npz or .pth (torchvision and "
      "other libraries); the classifier is replaced when the number of classes differs",
      metavar="NAME|FILE")
    a("--freeze-backbone", "train the classifier only (backbone parameters and batch-norm "
      "statistics fixed)", action="store_true")
    a("--epochs", "epochs in all (with --resume too: more than done extends the run)",
      type=positive_int, metavar="N")
    a("--batch-size", "images per step (at least 2: batch norm)", type=positive_int,
      metavar="B")
    a("--optimizer", "rmsprop: torchvision's recipe (alpha 0.9, eps 0.0316)", choices=OPTIMIZERS)
    a("--lr", "initial learning rate", type=positive_float)
    a("--momentum", "SGD / RMSprop momentum", type=nonnegative_float, metavar="M")
    a("--weight-decay", "L2, on every parameter", type=nonnegative_float, metavar="WD")
    a("--label-smoothing", "0 to 1", type=fraction, metavar="EPS")
    a("--scheduler", "per-epoch learning rate", choices=SCHEDULERS)
    a("--bn-momentum", "batch norm's running-statistics momentum while training "
      "(torchvision's model uses 0.01, too slow for short runs)", type=fraction, metavar="M")
    a("--input-size", "training crop S (classify/evaluate use it too: model.npz records it)",
      type=positive_int, metavar="S")
    a("--resize-size", "validation: resize to R >= S, center crop S (default: S * 256 / 224)",
      type=positive_int, metavar="R")
    a("--min-scale", "RandomResizedCrop's smallest area fraction", type=open_fraction,
      metavar="A")
    a("--no-hflip", "no random horizontal flips", action="store_true")
    a("--val-split", "fraction of each class held out for validation when --data has no val/ "
      "folder (0: no validation; --val-fraction is the same option)", "--val-fraction",
      type=fraction, metavar="F")
    a("--dtype", "model precision", choices=("float32", "float64"))
    a("--seed", "every random choice: initialisation, validation split, order, augmentation, "
      "dropout (the same seed trains the same weights)", type=nonnegative_int)
    a("--no-progress", "no progress bars (an epoch's line is printed when it ends either way)",
      action="store_true")


# ----------------------------------------------------------------------------- options


def _checkpoint_meta(path) -> dict:
    from ..io.npz import CHECKPOINT_FORMAT, read_meta
    from .checkpoint import load_checkpoint

    meta = read_meta(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        load_checkpoint(path)                   # raises, saying what the file is instead
    return meta


def _recorded(meta: dict) -> dict:
    """The run options a checkpoint recorded (older checkpoints: what their meta tells)."""
    if "train_args" in meta:
        rec = dict(meta["train_args"])
        if "val_fraction" in rec:                   # its name before --val-split
            rec["val_split"] = rec.pop("val_fraction")
        return {**RUN_DEFAULTS, **rec}
    cfg, prep = meta.get("config", {}), meta.get("preprocessing") or {}
    rec = {k: cfg[k] for k in ("batch_size", "optimizer", "lr", "momentum", "weight_decay",
                               "label_smoothing", "freeze_backbone", "scheduler",
                               "bn_momentum", "seed") if k in cfg}
    rec.update(input_size=prep.get("crop_size"), resize_size=prep.get("resize_size"),
               dtype=meta.get("dtype", "float32"))
    return {**RUN_DEFAULTS, **{k: v for k, v in rec.items() if v is not None}}


def resolve_options(args) -> tuple[dict, dict | None]:
    """(the run's options, the checkpoint's meta or None) from the command line and, with
    --resume, the checkpoint; options that contradict the checkpoint are refused."""
    given = {k: getattr(args, k) for k in (*RUN_DEFAULTS, *FREE_DEFAULTS)
             if getattr(args, k) is not None}
    if not args.resume:
        opts = {**RUN_DEFAULTS, **FREE_DEFAULTS, **given}
        for k in ("data", "out"):
            if opts[k] is None:
                raise UsageError(f"the following arguments are required: --{k}")
        if opts["model"] is None and opts["weights"] is None:
            raise UsageError("--model large|small is needed unless --weights is given")
        return opts, None
    if args.weights is not None:
        raise UsageError("--weights starts a new run; --resume continues one: give one of them")
    meta = _checkpoint_meta(args.resume)
    rec = _recorded(meta)
    clash = [f"--{k.replace('_', '-')} {v} (the run has {rec[k]})" for k, v in given.items()
             if k in RUN_DEFAULTS and k != "weights" and v != rec[k]]
    if clash:
        raise UsageError(f"{args.resume}: a resumed run keeps its options; these differ: "
                         f"{', '.join(clash)} (start a new run from its model.npz with "
                         f"--weights to change them)")
    opts = {**rec, **FREE_DEFAULTS, "epochs": meta.get("config", {}).get("epochs", 10),
            "data": meta.get("data"), "out": str(Path(args.resume).parent)}
    opts.update({k: v for k, v in given.items() if k in FREE_DEFAULTS})
    if opts["data"] is None:
        raise UsageError(f"{args.resume} does not record its data folder: give --data")
    return opts, meta


def _check_out(out: Path, args) -> None:
    """Refuse to start over a run folder unless --overwrite (or continuing that run)."""
    found = [n for n in RUN_FILES if (out / n).exists()]
    same = args.resume is not None and Path(args.resume).resolve().parent == out.resolve()
    if found and not args.overwrite and not same:
        raise ValueError(f"{out} holds a training run already ({', '.join(found)}): continue "
                         f"it with --resume {out / 'checkpoint.npz'}, or give --overwrite to "
                         f"start afresh")


# ----------------------------------------------------------------------------- the run


def _model(opts, meta, num_classes: int):
    from ..nn.config import MobileNetV3Config
    from ..nn.model import MobileNetV3
    from ..tools.classify import resolve_weights

    if meta is not None:                  # the checkpoint's network, eps and dtype
        config = MobileNetV3Config.from_dict(meta["arch"])
        return MobileNetV3(config, dtype=meta.get("dtype", opts["dtype"]),
                           bn_eps=meta.get("bn_eps", 1e-3))
    given = {"arch": opts["model"], "width_mult": opts["width_mult"],
             "reduced_tail": opts["reduced_tail"] or None}
    if opts["weights"] is None:
        config = MobileNetV3Config.from_dict({**given, "dilated": opts["dilated"],
                                              "num_classes": num_classes}, "options")
        return MobileNetV3(config, dtype=opts["dtype"], seed=opts["seed"])
    weights, _, source = resolve_weights(opts["weights"])
    have = weights.config.to_dict()
    clash = [f"{k} {v!r} given, weights have {have[k]!r}" for k, v in given.items()
             if v is not None and v != have[k]]
    if clash:
        raise ValueError(f"{source} does not fit the options: {', '.join(clash)}")
    model = weights.model(opts["dtype"], dilated=opts["dilated"]).train()
    if model.config.num_classes != num_classes:
        model.reset_classifier(num_classes, rng=opts["seed"])
    return model


def _report_skipped(skipped, when: str) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    print(f"npmnv3 train: {when} {len(skipped)} unreadable image(s), not used: {shown}{more}",
          file=sys.stderr)


def _skipped(train, val) -> list:
    seen, out = set(), []
    for data in (train, val):
        for p, why in (data.skipped if data is not None else []):
            if p not in seen:
                seen.add(p)
                out.append((p, why))
    return out


def epoch_line(h: dict, i: int) -> str:
    """One epoch's line: learning rate, losses and accuracies, its time and images/s."""
    val = ("" if h["val_loss"][i] is None else
           f", val loss {h['val_loss'][i]:.4f} acc {h['val_acc'][i]:.4f}")
    secs, n = h["train_seconds"][i], h["train_images"][i]
    speed = f" ({n / secs:.1f} img/s)" if n and secs > 0 else ""
    val_secs = "" if h["val_loss"][i] is None else f" + {h['val_seconds'][i]:.1f} s validation"
    return (f"epoch {h['epoch'][i]}: lr {h['lr'][i]:.4g}, train loss {h['train_loss'][i]:.4f} "
            f"acc {h['train_acc'][i]:.4f}{val}, {secs:.1f} s{speed}{val_secs}")


def _best_note(h: dict) -> str:
    from .loop import best_epoch

    e = best_epoch(h)
    if e is None:
        return ""
    return f"best.npz: epoch {e}, val acc {h['val_acc'][h['epoch'].index(e)]:.4f}"


def _interrupt_note(out: Path, state: dict, resume) -> str:
    ck = out / "checkpoint.npz"
    if state["epochs"]:
        best = _best_note(state["history"])
        return (f" after epoch {state['epochs'][-1]}: {ck} holds it"
                + (f" ({best})" if best else "") + f"; continue with npmnv3 train --resume {ck}")
    if resume is not None and Path(resume).is_file():
        return f" before an epoch ended: nothing new written; continue with --resume {resume}"
    return f" before the first epoch ended: nothing was written to {out}"


def cmd_train(args) -> int:
    from ..data.folders import load_folders
    from .loop import fit

    opts, meta = resolve_options(args)
    out = Path(opts["out"])
    _check_out(out, args)
    state = {"epochs": [], "history": None}      # what Ctrl-C's line reports, from here on
    args.on_interrupt = lambda: _interrupt_note(out, state, args.resume)
    if opts["batch_size"] < 2:
        raise UsageError(f"argument --batch-size: must be at least 2 (batch norm in train mode "
                         f"needs 2 images per batch), got {opts['batch_size']}")
    size = opts["input_size"]
    if opts["resize_size"] is not None and opts["resize_size"] < size:
        raise UsageError(f"argument --resize-size: {opts['resize_size']} is smaller than the "
                         f"crop --input-size {size}")
    done = int(meta["epoch"]) if meta is not None else 0
    if done >= opts["epochs"]:
        print(f"{args.resume} has trained {done} of {opts['epochs']} epochs: nothing to train, "
              f"nothing written (give --epochs {done + 5} to train 5 more)")
        return 0
    if args.val_split is not None and args.resume is None and (Path(opts["data"]) / "val").is_dir():
        raise UsageError(f"argument --val-split: {opts['data']} has a val/ folder, which is the "
                         f"validation set; drop --val-split (or move val/ away to split)")
    try:
        train, val = load_folders(opts["data"], size=size, val_fraction=opts["val_split"],
                                  seed=opts["seed"], scale=(opts["min_scale"], 1.0),
                                  hflip=0.0 if opts["no_hflip"] else 0.5,
                                  resize_size=opts["resize_size"])
    except ValueError as e:             # the split's messages, in the option's name
        if str(e).startswith("val_fraction "):
            raise ValueError(f"--val-split {str(e)[len('val_fraction '):]}: give a larger "
                             f"--val-split, or 0 for no validation") from None
        raise
    if len(train.classes) < 2:
        raise ValueError(f"{opts['data']}: one class folder ({train.classes[0]}): a classifier "
                         f"needs at least 2 classes (one sub-directory per class)")
    skipped = _skipped(train, val)
    _report_skipped(skipped, "skipping")
    model = _model(opts, meta, len(train.classes))
    print(f"data {opts['data']}: {len(train.classes)} classes, {len(train)} training images, "
          f"{len(val) if val is not None else 0} validation images")
    print(f"model {model.config.describe()}, {model.num_parameters():,} parameters, "
          f"{'classifier only' if opts['freeze_backbone'] else 'all layers'}"
          + (f"; resuming after epoch {done} of {opts['epochs']}" if done else ""), flush=True)

    def each_epoch(epoch, h):
        state["epochs"].append(epoch)
        state["history"] = h
        print(epoch_line(h, len(h["epoch"]) - 1), flush=True)

    c = model.config
    record = {**{k: opts[k] for k in RUN_DEFAULTS}, "model": c.arch, "width_mult": c.width_mult,
              "reduced_tail": c.reduced_tail, "dilated": c.dilated}
    h = fit(model, train, val, epochs=opts["epochs"], batch_size=opts["batch_size"],
            optimizer=opts["optimizer"], lr=opts["lr"], momentum=opts["momentum"],
            weight_decay=opts["weight_decay"], label_smoothing=opts["label_smoothing"],
            freeze_backbone=opts["freeze_backbone"], scheduler=opts["scheduler"],
            bn_momentum=opts["bn_momentum"], out_dir=out, resume=args.resume,
            seed=opts["seed"], progress=not args.no_progress, callback=each_epoch,
            extra_meta={"train_args": record, "data": str(Path(opts["data"]).resolve())})
    _report_skipped(_skipped(train, val)[len(skipped):], "skipped")
    if state["epochs"]:
        best = _best_note(h)
        print(f"wrote {out / 'checkpoint.npz'}, {out / 'model.npz'}"
              + (f", {out / 'best.npz'}" if best else "") + f", {out / 'curves.png'} "
              f"({len(h['epoch'])} epochs" + (f"; {best}" if best else "") + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``npmnv3 train ...`` (the same as ``npmnv3.cli.main(["train", ...])``)."""
    from ..cli import main as npmnv3_main

    return npmnv3_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
