"""The ``npmnv3`` sub-commands selfcheck, summary, convert, compare, weights, classify and
segment: their parsers (``register``, called by ``npmnv3/cli.py``) and bodies
(``cmd_<name>(args)``, each returning the exit code). Heavy imports happen inside the bodies,
so ``npmnv3 --help`` is fast.
"""

from __future__ import annotations

import sys

from .cliargs import (
    HelpFormatter,
    UsageError,
    add_arch_args,
    add_input_size,
    input_size,
    nonnegative_int,
    positive_int,
)


def _parser(sub, name, run, help, *, uses_kernels=False, **kw):
    p = sub.add_parser(name, help=help, description=kw.pop("description", help),
                       formatter_class=HelpFormatter, **kw)
    p.set_defaults(run=run, parser=p, uses_kernels=uses_kernels)
    return p


def register(sub) -> None:
    p = _parser(sub, "selfcheck", cmd_selfcheck, "check every kernel's backward by finite "
                "differences and fast == naive (no torch needed)", uses_kernels=True)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random inputs")

    p = _parser(sub, "summary", cmd_summary, "per-layer output shapes, parameters and MACs "
                "(computed from the architecture; no weights are allocated)")
    add_arch_args(p, required=True, defaults=True, models=("large", "small", "lraspp",
                                                            "deeplabv3"))
    add_input_size(p, default=[224], what="input size")
    p.add_argument("--depth", type=int, choices=(0, 1), default=1,
                   help="0: top-level modules only; 1: also the layers inside")

    p = _parser(sub, "convert", cmd_convert, "a torchvision/timm/mmpretrain/netspresso .pth "
                "(or an np.savez of a state_dict) -> npmnv3 .npz with metadata (torch-free)")
    p.add_argument("src", metavar="IN", help="the checkpoint (.pth, or .npz of arrays)")
    p.add_argument("dst", metavar="OUT.npz", help="the .npz to write")
    add_arch_args(p, required=False, defaults=False)
    p.add_argument("--from", dest="source", choices=("timm", "mmpretrain", "netspresso-trainer"),
                   help="the checkpoint's library (default: recognised from its keys)")
    p.add_argument("--bn-eps", type=float, metavar="EPS", help="batch-norm eps to record "
                   "(default: the library's; 1e-5 for netspresso-trainer before 2024-05)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = _parser(sub, "compare", cmd_compare, "module-by-module diff against torchvision "
                "(needs torch); exit 1 if a module is over tolerance, 2 without torch",
                uses_kernels=True)
    add_arch_args(p, required=False, defaults=False)
    p.add_argument("--weights", metavar="NAME|FILE", help="registry name or .pth/.npz file "
                   "(default: random weights with randomised batch-norm statistics)")
    p.add_argument("--image", metavar="FILE", help="an image, prepared as npmnv3 classify "
                   "prepares it for these weights (default: random input)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of both models")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the random weights and input")
    add_input_size(p, default=None, what="random input size (default 224), or the crop of "
                                         "--image (default: the weights' preprocessing)")
    p.add_argument("--plot", metavar="OUT.png", help="save the relative error per module")

    p = _parser(sub, "weights", cmd_weights, "the official torchvision checkpoints: list, "
                "fetch (download or reuse torch hub's cache, verify, convert), path")
    wsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    wsub.add_parser("list", help="the registry and what is on disk",
                    formatter_class=HelpFormatter)
    for action, what in (("fetch", "download (if needed), verify and convert to .npz"),
                         ("path", "print where the .npz is (nothing, and exit 1, if it is not "
                                  "there yet)")):
        q = wsub.add_parser(action, help=what, description=what, formatter_class=HelpFormatter)
        q.add_argument("name", metavar="NAME", help="large-v1, large-v2, small-v1 (or large, "
                                                    "small), large-qnnpack-v1 (int8)")

    p = _parser(sub, "classify", cmd_classify, "top-k classes of images, printed as each batch "
                "finishes; exit 1 if any image could not be read", uses_kernels=True)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (walked, sorted, by image extension)")
    p.add_argument("--model", choices=("large", "small"),
                   help="default: what --weights holds, else large")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="registry name (default large-v2 / small-v1, fetched if needed), a "
                        "torchvision .pth or an npmnv3 .npz (npmnv3 train's model.npz)")
    p.add_argument("--quantized", action="store_true",
                   help="the int8 model: torchvision's quantized weights (large-qnnpack-v1, "
                        "fetched if needed), or --weights FILE of a quantized/QAT .pth")
    p.add_argument("--topk", type=positive_int, metavar="K",
                   help="classes shown per image (default: 5, or the model's classes if fewer)")
    p.add_argument("--json", action="store_true", help="print a JSON list (failed images "
                   "included, with their error) instead of text")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="images per forward pass")
    p.add_argument("--no-exif", action="store_true",
                   help="ignore the EXIF orientation (torchvision does not apply it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a "
                   "terminal for more images than fit on the screen)")

    p = _parser(sub, "segment", cmd_segment, "semantic segmentation (the 21 VOC classes) with "
                "LR-ASPP or DeepLabV3: mask and overlay PNGs, class shares; exit 1 if any image "
                "could not be read", uses_kernels=True)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or directories (walked, sorted, by image extension)")
    p.add_argument("--model", choices=("lraspp", "deeplabv3"),
                   help="default: what --weights holds, else lraspp")
    p.add_argument("--weights", metavar="NAME|FILE", help="lraspp or deeplabv3 (fetched if "
                   "needed), or a torchvision .pth file")
    p.add_argument("--out", default="segment-out", metavar="DIR", help="where the PNGs go")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument("--no-exif", action="store_true", help="ignore the EXIF orientation")


def cmd_segment(args) -> int:
    from .segment import run
    return run(args)


# ----------------------------------------------------------------------------- selfcheck


def cmd_selfcheck(args) -> int:
    from .selfcheck import iter_selfcheck

    bad = n = 0
    for r in iter_selfcheck(seed=args.seed):            # each row as soon as it is checked
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.kernel:<22}  {r.check:<32} rel. error {r.error:.1e} "
              f"(tolerance {r.tolerance:.0e})", flush=True)
        n, bad = n + 1, bad + (not r.ok)
    print(f"{n} checks, {bad} over tolerance" + ("" if bad else ": all kernels agree"))
    return 1 if bad else 0


# ----------------------------------------------------------------------------- summary


def arch_from_args(args) -> dict:
    """The builder arguments given on the command line (None where not given)."""
    return {"arch": args.model, "width_mult": args.width_mult,
            "reduced_tail": args.reduced_tail, "dilated": args.dilated,
            "num_classes": args.num_classes}


def cmd_summary(args) -> int:
    from ..nn.config import MobileNetV3Config
    from .summary import summary

    size = input_size(args)
    if args.model in ("lraspp", "deeplabv3"):
        from .seg_summary import segmentation_summary
        print(segmentation_summary(args.model, size).format(depth=args.depth))
        return 0
    config = MobileNetV3Config.from_dict(arch_from_args(args), "options")
    print(summary(config, size).format(depth=args.depth))
    return 0


# ----------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    from ..io.convert import convert
    from ..nn.config import MobileNetV3Config

    given = {k: v for k, v in arch_from_args(args).items() if v is not None}
    meta = convert(args.src, args.dst, arch=given or None, source=args.source,
                   bn_eps=args.bn_eps, overwrite=args.overwrite)
    config = MobileNetV3Config.from_dict(meta["arch"])
    print(f"wrote {args.dst}: {config.describe()}, {meta['num_parameters']:,} parameters")
    print(f"source {meta['source_name']} ({meta['source_bytes']:,} bytes), "
          f"sha256 {meta['source_sha256']}")
    print(f"source format {meta['source_format']}, batch-norm eps {meta['bn_eps']:g}")
    return 0


# ----------------------------------------------------------------------------- compare


def compare_models(args, torch_dtype: str):
    """(npmnv3 model, torchvision model, description, preprocessing) as the options ask."""
    from ..data.preprocess import imagenet_preprocessing
    from .classify import resolve_weights
    from .compare import npmnv3_twin, torchvision_model

    given = {k: v for k, v in arch_from_args(args).items() if v is not None}
    if args.weights is None:
        if "arch" not in given:
            raise UsageError("--model large|small is needed unless --weights is given")
        tv = torchvision_model(given, dtype=torch_dtype, seed=args.seed)
        return (npmnv3_twin(tv, given, torch_dtype), tv, f"random weights (seed {args.seed})",
                imagenet_preprocessing())
    weights, entry, source = resolve_weights(args.weights)
    have = weights.config.to_dict()
    clash = {k: (v, have[k]) for k, v in given.items() if k != "dilated" and v != have[k]}
    if clash:
        raise ValueError(f"{args.weights} does not fit the options: " + ", ".join(
            f"{k} {v!r} given, weights have {w!r}" for k, (v, w) in clash.items()))
    model = weights.model(torch_dtype, **given)
    tv = torchvision_model(model.config, weights.state_dict, dtype=torch_dtype,
                           bn_eps=weights.bn_eps)
    prep = weights.preprocessing or (entry.preprocessing if entry else imagenet_preprocessing())
    return model, tv, f"weights {source}", prep


def cmd_compare(args) -> int:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        print("npmnv3 compare needs torch and torchvision (pip install -e '.[test]')",
              file=sys.stderr)
        return 2
    import numpy as np

    from ..data.preprocess import imagenet_preprocessing, preprocess
    from .compare import (
        compare_with_torchvision,
        first_failure,
        format_rows,
        plot_rows,
        random_input,
    )

    size = input_size(args)
    if args.image and size is not None and size[0] != size[1]:
        raise UsageError("argument --input-size: an --image is center-cropped to a square; "
                         "give one number")
    model, tv, what, prep = compare_models(args, args.dtype)
    if args.image:                      # prepared exactly as npmnv3 classify prepares it
        if size is not None:            # the crop asked for, resized in torchvision's ratio
            prep = {**prep, **imagenet_preprocessing(None, size[0])}
        x = preprocess(args.image, **prep)[None]
        source = f"image {args.image}"
    else:
        h, w = size or (224, 224)
        x = random_input(args.seed, h) if h == w else np.random.default_rng(
            args.seed).standard_normal((1, 3, h, w)).astype(np.float32)
        source = f"random input (seed {args.seed})"
    rows = compare_with_torchvision(model, tv, x)
    print(f"npmnv3 vs torchvision, {what}, {source} {list(x.shape)}, {args.dtype}")
    print("\n".join(format_rows(rows)))
    if args.plot:
        plot_rows(rows, args.plot, title=f"npmnv3 vs torchvision: {what}, {args.dtype}")
        print(f"plot saved to {args.plot}")
    return 1 if first_failure(rows) else 0


# ----------------------------------------------------------------------------- weights


def cmd_weights(args) -> int:
    from ..io import registry as W

    if args.action == "list":
        print(f"{'name':<16} {'model':<10} {'acc@1':>6} {'acc@5':>6} {'params':>10} "
              f"{'resize':>6} {'crop':>4}  {'file':<40} on disk")
        for e in W.REGISTRY.values():
            model = f"{e.arch} int8" if e.quantized else e.arch
            print(f"{e.name:<16} {model:<10} {e.acc1:6.3f} {e.acc5:6.3f} {e.num_params:>10,} "
                  f"{e.resize_size:>6} {e.crop_size:>4}  {e.file_name:<40} "
                  f"{W.status(e) or '-'}")
        print("aliases: " + ", ".join(f"{a} -> {n}" for a, n in W.ALIASES.items())
              + "; defaults: " + ", ".join(f"--model {m}: {n}" for m, n in W.DEFAULTS.items())
              + ", " + ", ".join(f"--quantized --model {m}: {n}"
                                 for m, n in W.QUANTIZED_DEFAULTS.items()))
        from ..io.seg_registry import SEG_REGISTRY
        print(f"\nsegmentation (npmnv3 segment --weights NAME), VOC's 21 classes:\n"
              f"{'name':<16} {'model':<10} {'mIoU':>6} {'pixacc':>6} {'params':>10} "
              f"{'resize':>6} {'crop':>4}  {'file':<40} on disk")
        for e in SEG_REGISTRY.values():
            where = [d for d in (W.weights_dir(), W.torch_hub_dir()) if (d / e.file_name).is_file()]
            print(f"{e.name:<16} {e.model:<10} {e.miou:6.1f} {e.pixel_acc:6.1f} "
                  f"{e.num_params:>10,} {e.resize_size:>6} {'-':>4}  {e.file_name:<40} "
                  f"{where[0] / e.file_name if where else '-'}")
        print(f"\nweights directory: {W.weights_dir()} (NPMNV3_HOME)")
        print(f"torch hub cache:   {W.torch_hub_dir()} (reused when the file is there)")
        return 0
    entry = W.get(args.name)
    if args.action == "path":
        path = W.weights_dir() / (entry.file_name if entry.quantized else entry.npz_name)
        if not path.is_file():              # nothing on stdout: $(npmnv3 weights path) is ""
            print(f"npmnv3 weights: {entry.name} is not downloaded yet ({path} does not exist):"
                  f" npmnv3 weights fetch {entry.name}", file=sys.stderr)
            return 1
        print(path)
        return 0
    path, origin = W.fetch(entry.name, progress=True, with_origin=True)
    use = "read from" if entry.quantized else "converted from"   # int8 weights stay a .pth
    how = {"npz": "already there",
           "pth": "already there" if entry.quantized else f"converted from {entry.file_name}",
           "torch hub cache": f"{use} torch hub's {W.torch_hub_dir() / entry.file_name}",
           "download": f"downloaded {entry.url()}"}[origin]
    print(f"{entry.name}: {path} ({how}; sha256 {entry.sha256_prefix}... verified)")
    return 0


# ----------------------------------------------------------------------------- classify


def cmd_classify(args) -> int:
    import json
    import shutil

    from tqdm import tqdm

    from ..data.images import find_images
    from .classify import format_result, iter_results, load_classifier

    items = find_images(args.images)
    if all(err is not None for _, err in items):
        results = ({"image": p, "error": e} for p, e in items)
        clf = None
    else:
        clf = load_classifier(args.model, args.weights, quantized=args.quantized, progress=True)
        if args.topk is not None and args.topk > len(clf.categories):
            raise UsageError(f"argument --topk: {args.topk} is more than the "
                             f"{len(clf.categories)} classes of {clf.source}")
        results = iter_results(clf, items, topk=args.topk, batch_size=args.batch_size,
                               exif_transpose=not args.no_exif)
    screen = shutil.get_terminal_size().lines
    show_bar = not args.no_progress and len(items) * (1 + (args.topk or 5)) > screen
    failed = 0
    with tqdm(total=len(items), unit="img", file=sys.stderr, leave=False,
              disable=None if show_bar else True) as bar:
        def out(text):
            bar.clear()
            print(text, flush=True)
            bar.refresh()

        if args.json:
            out("[")
        for i, r in enumerate(results):
            if "error" in r:
                failed += 1
                bar.clear()
                print(f"npmnv3 classify: {r['image']}: {r['error']}", file=sys.stderr)
            if args.json:           # a JSON list, one element per image, as each is done
                out("  " + json.dumps(r) + ("," if i + 1 < len(items) else ""))
            elif "top" in r:
                out(format_result(r))
            bar.update(1)
        if args.json:
            out("]")
    return 1 if failed else 0
