"""``npmnv3 train``: train or fine-tune a MobileNetV3 on an image folder from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.folders import load_folders
from ..io.load import read_weights
from ..nn.config import MobileNetV3Config
from ..nn.model import MobileNetV3
from .loop import OPTIMIZERS, SCHEDULERS, fit


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


def _cli_model(args, num_classes: int) -> MobileNetV3:
    given = {"arch": args.model, "width_mult": args.width_mult,
             "reduced_tail": args.reduced_tail or None}
    if args.weights is None:
        config = MobileNetV3Config.from_dict({**given, "dilated": args.dilated,
                                              "num_classes": num_classes}, "options")
        return MobileNetV3(config, dtype=args.dtype, seed=args.seed)
    weights = read_weights(args.weights)
    have = weights.config.to_dict()
    clash = [f"{k} {v!r} given, weights have {have[k]!r}" for k, v in given.items()
             if v is not None and v != have[k]]
    if clash:
        raise ValueError(f"{args.weights} does not fit the options: {', '.join(clash)}")
    model = weights.model(args.dtype, dilated=args.dilated).train()
    if model.config.num_classes != num_classes:
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
    print(f"model {model.config.describe()}, {model.num_parameters():,} parameters, "
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
