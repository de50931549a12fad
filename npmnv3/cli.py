"""The ``npmnv3`` command line (also ``python -m npmnv3``).

    npmnv3 selfcheck                      every kernel's backward and fast == naive, no torch
    npmnv3 summary --model large          per-layer shapes, parameters and MACs
    npmnv3 convert IN.pth OUT.npz         torchvision checkpoint -> .npz with metadata
    npmnv3 compare --model small          module-by-module diff against torchvision (needs torch)
    npmnv3 weights list|fetch NAME|path NAME   the official checkpoints (download, hash check)
    npmnv3 classify IMAGE_OR_DIR...       top-k ImageNet classes (weights fetched if needed)
    npmnv3 train --model small --data DIR --out DIR   train / fine-tune on an image folder

Errors in the input (a missing or malformed file, weights that fit no MobileNetV3) print one
line to stderr and exit with 1; ``compare`` exits with 1 when a module is over tolerance and
with 2 when torch is missing; ``classify`` exits with 1 if any image could not be read (the
others are still classified).
"""

from __future__ import annotations

import argparse
import sys


def _cmd_selfcheck(args) -> int:
    from .tools.selfcheck import run_selfcheck

    rows = run_selfcheck(seed=args.seed)
    width = max(len(r.kernel) for r in rows)
    for r in rows:
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.kernel:<{width}}  {r.check:<32} rel. error {r.error:.1e} "
              f"(tolerance {r.tolerance:.0e})")
    bad = sum(not r.ok for r in rows)
    print(f"{len(rows)} checks, {bad} over tolerance" + ("" if bad else ": all kernels agree"))
    return 1 if bad else 0


def _arch_from_args(args) -> dict:
    """The builder arguments given on the command line (None where not given)."""
    return {"arch": args.model, "width_mult": args.width_mult,
            "reduced_tail": args.reduced_tail, "dilated": args.dilated,
            "num_classes": args.num_classes}


def _cmd_summary(args) -> int:
    from .io.convert import build_model
    from .tools.summary import summary

    if len(args.input_size) > 2:
        raise ValueError(f"--input-size takes H or H W, got {len(args.input_size)} numbers")
    size = tuple(args.input_size) * (3 - len(args.input_size))
    print(summary(build_model(_arch_from_args(args)), size[:2]).format(depth=args.depth))
    return 0


def _cmd_convert(args) -> int:
    from .io.convert import convert

    given = {k: v for k, v in _arch_from_args(args).items() if v is not None}
    meta = convert(args.src, args.dst, arch=given or None, source=args.source,
                   bn_eps=args.bn_eps)
    a = meta["arch"]
    print(f"wrote {args.dst}: mobilenet_v3_{a['arch']}(width_mult={a['width_mult']!r}, "
          f"reduced_tail={a['reduced_tail']}, dilated={a['dilated']}, "
          f"num_classes={a['num_classes']}), {meta['num_parameters']:,} parameters")
    print(f"source {meta['source_name']} ({meta['source_bytes']:,} bytes), "
          f"sha256 {meta['source_sha256']}")
    print(f"source format {meta['source_format']}, batch-norm eps {meta['bn_eps']:g}")
    return 0


def _compare_models(args, torch_dtype: str):
    """(npmnv3 model, torchvision model, description) as the options ask."""
    from .io.convert import build_model, load_weights
    from .tools.compare import npmnv3_twin, torchvision_model

    given = {k: v for k, v in _arch_from_args(args).items() if v is not None}
    if args.weights is None:
        if "arch" not in given:
            raise ValueError("--model large|small is needed unless --weights is given")
        tv = torchvision_model(given, dtype=torch_dtype, seed=args.seed)
        return npmnv3_twin(tv, given, torch_dtype), tv, f"random weights (seed {args.seed})"
    sd, arch = load_weights(args.weights)
    clash = {k: (v, arch[k]) for k, v in given.items() if k != "dilated" and v != arch[k]}
    if clash:
        raise ValueError(f"{args.weights} does not fit the options: " + ", ".join(
            f"{k} {v!r} given, weights have {w!r}" for k, (v, w) in clash.items()))
    arch = {**arch, **given}
    tv = torchvision_model(arch, sd, dtype=torch_dtype)
    model = build_model(arch, dtype=torch_dtype)
    model.load_state_dict(sd)
    return model.eval(), tv, f"weights {args.weights}"


def _cmd_compare(args) -> int:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        print("npmnv3 compare needs torch and torchvision (pip install -e '.[test]')",
              file=sys.stderr)
        return 2
    from .tools.compare import (
        compare_with_torchvision,
        first_failure,
        format_rows,
        load_image,
        plot_rows,
        random_input,
    )

    model, tv, what = _compare_models(args, args.dtype)
    x = load_image(args.image) if args.image else random_input(args.seed, args.input_size)
    source = f"image {args.image}" if args.image else f"random input (seed {args.seed})"
    rows = compare_with_torchvision(model, tv, x)
    print(f"npmnv3 vs torchvision, {what}, {source} {list(x.shape)}, {args.dtype}")
    print("\n".join(format_rows(rows)))
    if args.plot:
        plot_rows(rows, args.plot, title=f"npmnv3 vs torchvision: {what}, {args.dtype}")
        print(f"plot saved to {args.plot}")
    return 1 if first_failure(rows) else 0


def _cmd_weights(args) -> int:
    from .io import weights as W

    if args.action == "list":
        print(f"{'name':<9} {'model':<6} {'acc@1':>6} {'acc@5':>6} {'params':>10} {'resize':>6} "
              f"{'crop':>4}  {'file':<32} on disk")
        for e in W.REGISTRY.values():
            print(f"{e.name:<9} {e.arch:<6} {e.acc1:6.3f} {e.acc5:6.3f} {e.num_params:>10,} "
                  f"{e.resize_size:>6} {e.crop_size:>4}  {e.file_name:<32} "
                  f"{W.status(e) or '-'}")
        print("aliases: " + ", ".join(f"{a} -> {n}" for a, n in W.ALIASES.items())
              + "; defaults: " + ", ".join(f"--model {m}: {n}" for m, n in W.DEFAULTS.items()))
        print(f"weights directory: {W.weights_dir()} (NPMNV3_HOME)")
        print(f"torch hub cache:   {W.torch_hub_dir()} (reused when the file is there)")
        return 0
    entry = W.get(args.name)
    if args.action == "path":
        path = W.weights_dir() / entry.npz_name
        print(path)
        if not path.is_file():
            print(f"npmnv3 weights: {entry.name} is not downloaded yet: npmnv3 weights fetch "
                  f"{entry.name}", file=sys.stderr)
            return 1
        return 0
    before = W.status(entry)
    path = W.fetch(entry.name, progress=True)
    how = {"npz": "already there", "pth": f"converted from {entry.file_name}",
           "torch hub cache": f"converted from torch hub's {W.torch_hub_dir() / entry.file_name}",
           "": f"downloaded {entry.url()}"}[before]
    print(f"{entry.name}: {path} ({how}; sha256 {entry.sha256_prefix}... verified)")
    return 0


def _cmd_classify(args) -> int:
    import json

    from .tools.classify import classify, format_results

    results = classify(args.images, args.model, args.weights, args.topk, progress=True,
                       batch_size=args.batch_size, exif_transpose=not args.no_exif)
    good = [r for r in results if "top" in r]
    for r in results:
        if "top" not in r:
            print(f"npmnv3 classify: {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(good, indent=2))
    elif good:
        print(format_results(good))
    return 1 if len(good) < len(results) else 0


def _add_arch_args(p, *, required: bool, defaults: bool):
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--model", choices=("large", "small"), required=required,
                   help="mobilenet_v3_large or mobilenet_v3_small")
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
    p.set_defaults(func=_cmd_selfcheck)

    p = sub.add_parser("summary", help="per-layer output shapes, parameters and MACs")
    _add_arch_args(p, required=True, defaults=True)
    p.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="H [W]",
                   help="input height and width (default 224)")
    p.add_argument("--depth", type=int, choices=(0, 1), default=1,
                   help="0: top-level modules only; 1: also the layers inside (default)")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("convert", help="torchvision/timm/mmpretrain/netspresso .pth -> .npz "
                                       "with metadata (torch-free)")
    p.add_argument("src", metavar="IN.pth")
    p.add_argument("dst", metavar="OUT.npz")
    _add_arch_args(p, required=False, defaults=False)
    p.add_argument("--from", dest="source", choices=("timm", "mmpretrain", "netspresso-trainer"),
                   help="the checkpoint's library (default: recognised from its keys)")
    p.add_argument("--bn-eps", type=float, metavar="EPS", help="batch-norm eps to record "
                   "(default: the library's; 1e-5 for netspresso-trainer before 2024-05)")
    p.set_defaults(func=_cmd_convert)

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
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("weights", help="the official torchvision checkpoints: list, fetch "
                                       "(download or reuse torch hub's cache, verify, convert), "
                                       "path")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser("list", help="the registry and what is on disk")
    for action, what in (("fetch", "download (if needed), verify and convert to .npz"),
                         ("path", "print where the .npz is (exit 1 if not there yet)")):
        q = wsub.add_parser(action, help=what)
        q.add_argument("name", metavar="NAME", help="large-v1, large-v2, small-v1 (or large, "
                                                    "small)")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("classify", help="top-k ImageNet classes of images; exit 1 if any "
                                        "image could not be read")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (walked, sorted, by image extension)")
    p.add_argument("--model", choices=("large", "small"),
                   help="default: what --weights holds, else large")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="registry name (default large-v2 / small-v1, fetched if needed) or a "
                        "torchvision .pth / converted .npz")
    p.add_argument("--topk", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--no-exif", action="store_true",
                   help="ignore the EXIF orientation (torchvision does not apply it)")
    p.set_defaults(func=_cmd_classify)

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
        from .train.loop import main as train_main
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:          # CheckpointError is a ValueError
        print(f"npmnv3 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
