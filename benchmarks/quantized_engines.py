"""npmnv3's int8 MobileNetV3 against torch's quantized engines: which integers differ, and why.

    python benchmarks/quantized_engines.py                 # Large, 224x224, 2 images
    python benchmarks/quantized_engines.py --arch small --size 64

For each (qconfig, engine) pair, torchvision's quantizable model is QAT-prepared with that
engine's default qconfig, its batch norms randomised, calibrated on random batches and
converted (``npmnv3.tools.qcompare``); npmnv3 loads the converted state_dict. Two tables:

1. the whole network: every module's output integers and the logits, ours vs torch's;
2. each operation alone: our kernel fed the very inputs torch's op received, so nothing
   propagated from earlier layers is counted.

"qnnpack -> fbgemm" runs the model calibrated for qnnpack (full 0..255 activations, per-tensor
weights) on fbgemm's kernels: what ``reduce_range`` is for.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

PAIRS = (("qnnpack", "qnnpack"), ("fbgemm", "fbgemm"), ("x86", "x86"), ("qnnpack", "fbgemm"))


def build(arch, qconfig, engine, size, seed):
    from npmnv3.tools.qcompare import quantized_engine, torchvision_quantized
    model = torchvision_quantized(arch, engine=qconfig, image_size=size, seed=seed)
    if engine != qconfig:                       # repack the same parameters for `engine`
        other = torchvision_quantized(arch, engine=qconfig, image_size=size, seed=seed + 1)
        with quantized_engine(engine):
            other.load_state_dict(model.state_dict())
        model = other
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="large", choices=("large", "small"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    import npmnv3
    from npmnv3.tools.qcompare import compare_quantized, numpy_state_dict, op_differences

    x = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)
    net_rows, op_rows = [], collections.OrderedDict()
    for qconfig, engine in PAIRS:
        model = build(args.arch, qconfig, engine, args.size, args.seed)
        ours = getattr(npmnv3, f"quantized_mobilenet_v3_{args.arch}")()
        ours.load_state_dict(numpy_state_dict(model.state_dict()))
        rows, logits, ref = compare_quantized(ours, model, x, engine=engine)
        total = sum(int(np.prod(r.shape)) for r in rows)
        differing = sum(r.differing for r in rows)
        first = next((r.name for r in rows if r.differing), "-")
        step = ours.qparams["classifier.3"][0]
        dl = np.rint(np.abs(logits.astype(np.float64) - ref) / step)
        net_rows.append((f"{qconfig} -> {engine}", total, differing, max(r.max_step for r in rows),
                         first, float(np.mean(dl == 0)), int(dl.max())))
        agg = collections.OrderedDict()
        for r in op_differences(model, x, engine=engine):
            a = agg.setdefault(r.kind, [0, 0, 0])
            a[0], a[1], a[2] = a[0] + r.elements, a[1] + r.differing, max(a[2], r.max_step)
        op_rows[f"{qconfig} -> {engine}"] = agg

    print(f"# MobileNetV3-{args.arch.capitalize()}, {args.batch} random images "
          f"{args.size}x{args.size}, torch's qconfig per engine, QAT-calibrated, converted\n")
    print("| qconfig -> engine | module outputs | differing | worst step | first differing "
          "module | logits equal | worst logit step |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, total, diff, worst, first, eq, wl in net_rows:
        print(f"| {name} | {total:,} | {diff:,} ({diff / total:.3%}) | {worst} | {first} | "
              f"{eq:.2%} | {wl} |")
    kinds = list(next(iter(op_rows.values())))
    print("\nEach op alone (our kernel on torch's inputs): differing integers / elements, "
          "worst step\n")
    print("| op | " + " | ".join(op_rows) + " |")
    print("|---|" + "---:|" * len(op_rows))
    for k in kinds:
        cells = []
        for agg in op_rows.values():
            n, d, w = agg.get(k, (0, 0, 0))
            cells.append(f"{d}/{n:,} ({w})" if d else f"0/{n:,}")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
