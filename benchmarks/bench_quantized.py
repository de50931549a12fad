"""int8 MobileNetV3 inference speed: npmnv3's int8 kernels vs torch's qnnpack engine.

    cpu time python benchmarks/bench_quantized.py [--arch large] [--rounds 2]

One converted torchvision quantized model (QAT-prepared for qnnpack, randomised batch norms,
calibrated, converted; ``npmnv3.tools.qcompare``) is saved once; each measurement then runs in
a fresh process with 2 threads for every pool (``common.run_worker``): npmnv3 int8 (reading
the file with ``npmnv3.load_pth``, torch never imported), npmnv3 float32 (the same
architecture, fused eval path) and torch's int8 model on the qnnpack engine. Median ms per
image over ``--reps`` calls after a warm-up; rounds interleave the three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("npmnv3-int8", "npmnv3-float32", "torch-qnnpack-int8")


def worker(side, path, arch, batch, reps):
    import numpy as np
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if side.startswith("npmnv3"):
        import npmnv3
        if side == "npmnv3-int8":
            model = getattr(npmnv3, f"quantized_mobilenet_v3_{arch}")()
            model.load_state_dict(npmnv3.load_pth(path))
        else:
            model = getattr(npmnv3, f"mobilenet_v3_{arch}")().eval()

        def run():
            model(x)
    else:
        import torch

        from npmnv3.tools.qcompare import qat_prepared, quantized_engine
        torch.set_num_threads(2)
        with quantized_engine("qnnpack"):
            model = qat_prepared(arch).eval()
            torch.ao.quantization.convert(model, inplace=True)
            model.load_state_dict(torch.load(path))
        xt = torch.from_numpy(x)

        def run():
            with quantized_engine("qnnpack"), torch.no_grad():
                model(xt)
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * sorted(times)[reps // 2] / batch}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=5, metavar=("SIDE", "PATH", "ARCH", "BATCH", "REPS"))
    ap.add_argument("--arch", default="large", choices=("large", "small"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if args.worker:
        side, path, arch, batch, reps = args.worker
        print(json.dumps(worker(side, path, arch, int(batch), int(reps))))
        return

    from common import run_worker

    from npmnv3.tools.qcompare import torchvision_quantized
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"quantized_{args.arch}.pth")
        import torch
        torch.save(torchvision_quantized(args.arch, image_size=224, batches=1).state_dict(), path)
        results = {}
        for _ in range(args.rounds):
            for batch in map(int, args.batches.split(",")):
                for side in SIDES:
                    r = run_worker(__file__, side, path, args.arch, str(batch), str(args.reps))
                    results.setdefault((batch, side), []).append(r["ms"])
    print(f"# MobileNetV3-{args.arch.capitalize()} 224x224, ms per image (median of "
          f"{args.reps}; min-max over {args.rounds} rounds), 2 threads, fresh process each\n")
    print("| batch | " + " | ".join(SIDES) + " | npmnv3 int8 / torch int8 |")
    print("|---:|" + "---:|" * (len(SIDES) + 1))
    for batch in map(int, args.batches.split(",")):
        cells = [f"{min(results[batch, s]):.1f}-{max(results[batch, s]):.1f}" for s in SIDES]
        ratio = min(results[batch, SIDES[0]]) / min(results[batch, SIDES[2]])
        print(f"| {batch} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
