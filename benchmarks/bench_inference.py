"""Eval-mode inference: npmnv3 vs PyTorch eager (NCHW and channels_last), same run.

    python benchmarks/bench_inference.py                 # Large + Small, batch 1 and 32
    python benchmarks/bench_inference.py --arch small --batch 1

Every measurement runs in its own fresh Python process (a worker of this script), one after the
other, so the two libraries never share thread pools or memory: float32, 224x224, 2 threads,
random weights (speed does not depend on them). Reported per configuration: ms per image
(median over repeats, after warm-up), the ratio npmnv3 / PyTorch's faster layout, the cold start
(interpreter start to the first logits: import, build, first forward; npmnv3 with a warm Numba
cache) and the peak resident memory of a batch-32 forward (VmHWM of the worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from common import THREADS, peak_rss_mb, run_worker


def worker(side: str, arch: str, batch: int, mode: str, reps: int) -> dict:
    """One measurement in this (fresh) process; returns a dict printed as JSON."""
    t_start = time.perf_counter()
    if side == "npmnv3":      # first, as the README says: it sets NumPy's OpenBLAS thread timeout
        import npmnv3  # noqa: F401
    import numpy as np
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if side == "npmnv3":
        import npmnv3
        model = getattr(npmnv3, f"mobilenet_v3_{arch}")(seed=0).eval()
        run = lambda: model(x)                                        # noqa: E731
    else:
        import torch
        import torchvision
        torch.set_num_threads(int(THREADS))
        model = getattr(torchvision.models, f"mobilenet_v3_{arch}")().eval()
        xt = torch.from_numpy(x)
        if side == "torch-cl":
            model = model.to(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.no_grad():
                return model(xt)
    run()
    first = time.perf_counter() - t_start
    if mode == "cold":
        return {"cold_s": first}
    if mode == "mem":
        run()
        return {"peak_mb": peak_rss_mb()}
    for _ in range(2):
        run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms_per_image": 1e3 * times[len(times) // 2] / batch}


def measure(side, arch, batch, mode, reps):
    return run_worker(__file__, side, "--arch", arch, "--batch", str(batch), "--mode", mode,
                      "--reps", str(reps), timeout=1800)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["large", "small"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch[0], args.batch[0], args.mode,
                                args.reps)))
        return
    import numba
    import numpy as np
    import torch
    measure("npmnv3", "small", 1, "cold", 1)             # make sure the Numba cache is warm
    print(f"# npmnv3 vs PyTorch {torch.__version__} eager, eval, float32, 224x224, "
          f"{THREADS} threads")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}, Numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
    print("| model | batch | npmnv3 ms/img | torch NCHW ms/img | torch channels_last ms/img "
          "| ratio vs faster torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        for b in args.batch:
            reps = 30 if b == 1 else 7
            r = {s: measure(s, arch, b, "time", reps)["ms_per_image"]
                 for s in ("npmnv3", "torch", "torch-cl")}
            best = min(r["torch"], r["torch-cl"])
            print(f"| {arch} | {b} | {r['npmnv3']:.2f} | {r['torch']:.2f} | "
                  f"{r['torch-cl']:.2f} | {r['npmnv3'] / best:.2f}x |", flush=True)
    print("\n| model | side | cold start s (import + build + first forward, bs1) "
          "| peak RSS MB at bs32 |")
    print("|---|---|---:|---:|")
    for arch in args.arch:
        for side in ("npmnv3", "torch", "torch-cl"):
            cold = min(measure(side, arch, 1, "cold", 1)["cold_s"] for _ in range(2))
            mem = measure(side, arch, 32, "mem", 1)["peak_mb"]
            print(f"| {arch} | {side} | {cold:.2f} | {mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
