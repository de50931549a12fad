"""The bodies of the ``npmnv3`` commands (``npmnv3/cli.py`` parses the arguments and calls
``cmd_<name>(args)``; each returns the exit code)."""

from __future__ import annotations

import sys

from ..nn.config import MobileNetV3Config


def cmd_selfcheck(args) -> int:
    from .selfcheck import run_selfcheck

    rows = run_selfcheck(seed=args.seed)
    width = max(len(r.kernel) for r in rows)
    for r in rows:
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.kernel:<{width}}  {r.check:<32} rel. error {r.error:.1e} "
              f"(tolerance {r.tolerance:.0e})")
    bad = sum(not r.ok for r in rows)
    print(f"{len(rows)} checks, {bad} over tolerance" + ("" if bad else ": all kernels agree"))
    return 1 if bad else 0


def arch_from_args(args) -> dict:
    """The builder arguments given on the command line (None where not given)."""
    return {"arch": args.model, "width_mult": args.width_mult,
            "reduced_tail": args.reduced_tail, "dilated": args.dilated,
            "num_classes": args.num_classes}


def cmd_summary(args) -> int:
    from .summary import summary

    if len(args.input_size) > 2:
        raise ValueError(f"--input-size takes H or H W, got {len(args.input_size)} numbers")
    size = tuple(args.input_size) * (3 - len(args.input_size))
    if args.model in ("lraspp", "deeplabv3"):
        from .seg_summary import segmentation_summary
        print(segmentation_summary(args.model, size[:2]).format(depth=args.depth))
        return 0
    config = MobileNetV3Config.from_dict(arch_from_args(args), "options")
    print(summary(config, size[:2]).format(depth=args.depth))
    return 0


def cmd_convert(args) -> int:
    from ..io.convert import convert

    given = {k: v for k, v in arch_from_args(args).items() if v is not None}
    meta = convert(args.src, args.dst, arch=given or None, source=args.source,
                   bn_eps=args.bn_eps)
    config = MobileNetV3Config.from_dict(meta["arch"])
    print(f"wrote {args.dst}: {config.describe()}, {meta['num_parameters']:,} parameters")
    print(f"source {meta['source_name']} ({meta['source_bytes']:,} bytes), "
          f"sha256 {meta['source_sha256']}")
    print(f"source format {meta['source_format']}, batch-norm eps {meta['bn_eps']:g}")
    return 0


def compare_models(args, torch_dtype: str):
    """(npmnv3 model, torchvision model, description) as the options ask."""
    from ..io.load import read_weights
    from .compare import npmnv3_twin, torchvision_model

    given = {k: v for k, v in arch_from_args(args).items() if v is not None}
    if args.weights is None:
        if "arch" not in given:
            raise ValueError("--model large|small is needed unless --weights is given")
        tv = torchvision_model(given, dtype=torch_dtype, seed=args.seed)
        return npmnv3_twin(tv, given, torch_dtype), tv, f"random weights (seed {args.seed})"
    weights = read_weights(args.weights)
    have = weights.config.to_dict()
    clash = {k: (v, have[k]) for k, v in given.items() if k != "dilated" and v != have[k]}
    if clash:
        raise ValueError(f"{args.weights} does not fit the options: " + ", ".join(
            f"{k} {v!r} given, weights have {w!r}" for k, (v, w) in clash.items()))
    model = weights.model(torch_dtype, **given)
    tv = torchvision_model(model.config, weights.state_dict, dtype=torch_dtype)
    return model, tv, f"weights {args.weights}"


def cmd_compare(args) -> int:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        print("npmnv3 compare needs torch and torchvision (pip install -e '.[test]')",
              file=sys.stderr)
        return 2
    from ..data.preprocess import imagenet_preprocessing, preprocess
    from .compare import (
        compare_with_torchvision,
        first_failure,
        format_rows,
        plot_rows,
        random_input,
    )

    model, tv, what = compare_models(args, args.dtype)
    if args.image:          # prepared exactly as npmnv3 classify prepares it
        x = preprocess(args.image, **imagenet_preprocessing(None, args.input_size))[None]
    else:
        x = random_input(args.seed, args.input_size)
    source = f"image {args.image}" if args.image else f"random input (seed {args.seed})"
    rows = compare_with_torchvision(model, tv, x)
    print(f"npmnv3 vs torchvision, {what}, {source} {list(x.shape)}, {args.dtype}")
    print("\n".join(format_rows(rows)))
    if args.plot:
        plot_rows(rows, args.plot, title=f"npmnv3 vs torchvision: {what}, {args.dtype}")
        print(f"plot saved to {args.plot}")
    return 1 if first_failure(rows) else 0


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
        print(f"weights directory: {W.weights_dir()} (NPMNV3_HOME)")
        print(f"torch hub cache:   {W.torch_hub_dir()} (reused when the file is there)")
        return 0
    entry = W.get(args.name)
    if args.action == "path":
        path = W.weights_dir() / (entry.file_name if entry.quantized else entry.npz_name)
        print(path)
        if not path.is_file():
            print(f"npmnv3 weights: {entry.name} is not downloaded yet: npmnv3 weights fetch "
                  f"{entry.name}", file=sys.stderr)
            return 1
        return 0
    before = W.status(entry)
    path = W.fetch(entry.name, progress=True)
    how = {"npz": "already there", "pth": "already there" if entry.quantized else
           f"converted from {entry.file_name}",
           "torch hub cache": f"{'read from' if entry.quantized else 'converted from'} torch "
                              f"hub's {W.torch_hub_dir() / entry.file_name}",
           "": f"downloaded {entry.url()}"}[before]
    print(f"{entry.name}: {path} ({how}; sha256 {entry.sha256_prefix}... verified)")
    return 0


def cmd_classify(args) -> int:
    import json

    from .classify import classify, format_results

    results = classify(args.images, args.model, args.weights, args.topk, progress=True,
                       batch_size=args.batch_size, exif_transpose=not args.no_exif,
                       quantized=getattr(args, "quantized", False))
    good = [r for r in results if "top" in r]
    for r in results:
        if "top" not in r:
            print(f"npmnv3 classify: {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(good, indent=2))
    elif good:
        print(format_results(good))
    return 1 if len(good) < len(results) else 0
