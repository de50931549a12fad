"""The ``npmnv3`` command line (also ``python -m npmnv3``).

    npmnv3 selfcheck                      every kernel's backward and fast == naive, no torch
    npmnv3 summary --model large          per-layer shapes, parameters and MACs
    npmnv3 convert IN.pth OUT.npz         torchvision checkpoint -> .npz with metadata
    npmnv3 compare --model small          module-by-module diff against torchvision (needs torch)
    npmnv3 weights list|fetch NAME|path NAME   the official checkpoints (download, hash check)
    npmnv3 classify IMAGE_OR_DIR...       top-k ImageNet classes (weights fetched if needed)
    npmnv3 segment IMAGE_OR_DIR...        VOC segmentation masks with LR-ASPP or DeepLabV3
    npmnv3 train --model small --data DIR --out DIR   train / fine-tune on an image folder

Errors in the input (a missing or malformed file, weights that fit no MobileNetV3) print one
line to stderr and exit with 1; ``compare`` exits with 1 when a module is over tolerance and
with 2 when torch is missing; ``classify`` exits with 1 if any image could not be read (the
others are still classified).
"""

from __future__ import annotations

import argparse
import sys


def _add_arch_args(p, *, required: bool, defaults: bool, models=("large", "small")):
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--model", choices=models, required=required,
                   help="mobilenet_v3_large or mobilenet_v3_small" + (
                       " (or lraspp / deeplabv3 on mobilenet_v3_large)" if len(models) > 2
                       else ""))
    p.add_argument("--width-mult", type=float, default=d(1.0), metavar="W")
    p.add_argument("--reduced-tail", action="store_true", default=d(False))
    p.add_argument("--dilated", action="store_true", default=d(False))
    p.add_argument("--num-classes", type=int, default=d(1000), metavar="N")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="npmnv3",
        description="MobileNetV3 in NumPy and Numba, checked against torchvision.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check every kernel's backward by finite differences "
                                         "and fast == naive (no torch needed)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func="selfcheck")

    p = sub.add_parser("summary", help="per-layer output shapes, parameters and MACs")
    _add_arch_args(p, required=True, defaults=True, models=("large", "small", "lraspp",
                                                             "deeplabv3"))
    p.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="H [W]",
                   help="input height and width (default 224)")
    p.add_argument("--depth", type=int, choices=(0, 1), default=1,
                   help="0: top-level modules only; 1: also the layers inside (default)")
    p.set_defaults(func="summary")

    p = sub.add_parser("convert", help="torchvision/timm/mmpretrain/netspresso .pth -> .npz "
                                       "with metadata (torch-free)")
    p.add_argument("src", metavar="IN.pth")
    p.add_argument("dst", metavar="OUT.npz")
    _add_arch_args(p, required=False, defaults=False)
    p.add_argument("--from", dest="source", choices=("timm", "mmpretrain", "netspresso-trainer"),
                   help="the checkpoint's library (default: recognised from its keys)")
    p.add_argument("--bn-eps", type=float, metavar="EPS", help="batch-norm eps to record "
                   "(default: the library's; 1e-5 for netspresso-trainer before 2024-05)")
    p.set_defaults(func="convert")

    p = sub.add_parser("compare", help="module-by-module diff against torchvision "
                                       "(needs torch); exit 1 if a module is over tolerance")
    _add_arch_args(p, required=False, defaults=False)
    p.add_argument("--weights", metavar="FILE", help=".pth or .npz (default: random weights "
                                                     "with randomised batch-norm statistics)")
    p.add_argument("--image", metavar="FILE", help="an image, resized to 256 and center-"
                                                   "cropped to 224 (default: random input)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and input")
    p.add_argument("--input-size", type=int, default=224, metavar="S",
                   help="side of the random input (default 224)")
    p.add_argument("--plot", metavar="OUT.png", help="save the relative error per module")
    p.set_defaults(func="compare")

    p = sub.add_parser("weights", help="the official torchvision checkpoints: list, fetch "
                                       "(download or reuse torch hub's cache, verify, convert), "
                                       "path")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser("list", help="the registry and what is on disk")
    for action, what in (("fetch", "download (if needed), verify and convert to .npz"),
                         ("path", "print where the .npz is (exit 1 if not there yet)")):
        q = wsub.add_parser(action, help=what)
        q.add_argument("name", metavar="NAME", help="large-v1, large-v2, small-v1 (or large, "
                                                    "small), large-qnnpack-v1 (int8)")
    p.set_defaults(func="weights")

    p = sub.add_parser("classify", help="top-k ImageNet classes of images; exit 1 if any "
                                        "image could not be read")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (walked, sorted, by image extension)")
    p.add_argument("--model", choices=("large", "small"),
                   help="default: what --weights holds, else large")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="registry name (default large-v2 / small-v1, fetched if needed) or a "
                        "torchvision .pth / converted .npz")
    p.add_argument("--quantized", action="store_true",
                   help="the int8 model: torchvision's quantized weights (large-qnnpack-v1, "
                        "fetched if needed), or --weights FILE of a quantized/QAT .pth")
    p.add_argument("--topk", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--no-exif", action="store_true",
                   help="ignore the EXIF orientation (torchvision does not apply it)")
    p.set_defaults(func="classify")

    from .tools.segment import add_parser as add_segment
    add_segment(sub)

    # Listed here for --help; its own parser (npmnv3.train.build_parser) reads the arguments.
    sub.add_parser("train", add_help=False, help="train or fine-tune on an image folder (one "
                   "sub-directory per class); npmnv3 train --help for the options")
    return ap


def _one_line(msg: str) -> str:
    """A multi-line error as one line: its first line, the headings of the following
    (unindented) lines without their lists, and a closing hint in full."""
    lines = [ln for ln in str(msg).splitlines() if ln.strip()] or ["(no message)"]
    parts = [lines[0].rstrip(":")]
    for ln in lines[1:]:
        if ln.startswith("hint:"):
            parts.append(ln)
        elif not ln[0].isspace():
            parts.append(ln.split(":")[0])
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        from .train.cli import main as train_main
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .tools import commands
    try:
        return (args.func if callable(args.func) else getattr(commands, f"cmd_{args.func}"))(args)
    except (ValueError, OSError) as e:          # CheckpointError is a ValueError
        print(f"npmnv3 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
