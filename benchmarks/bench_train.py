"""One training step: npmnv3 vs PyTorch eager (NCHW and channels_last), same run.

    python benchmarks/bench_train.py                    # Large + Small, batch 32
    python benchmarks/bench_train.py --arch small --reps 3
    python benchmarks/bench_train.py --profile          # npmnv3 only: time per kernel kind
    python benchmarks/bench_train.py --start            # npmnv3 only: cold and warm start

A step is what ``npmnv3.train.fit`` does per batch: zero the gradients, forward in train mode
(batch statistics, dropout), softmax cross-entropy, backward, SGD with momentum 0.9 and weight
decay. Every measurement runs in its own fresh Python process (a worker of this script), one
after the other, so the two libraries never share thread pools or memory: float32, 224x224,
2 threads, random weights and labels (speed does not depend on them). Reported: ms per image
(median step time over ``--reps`` steps after 2 warm-up steps, divided by the batch), the ratio
npmnv3 / PyTorch's faster layout, and the worker's peak resident memory (VmHWM: weights,
gradients, optimizer state and everything the backward keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from common import THREADS, peak_rss_mb, run_worker


def _npmnv3_step(arch, x, y):
    import numpy as np

    import npmnv3
    from npmnv3.kernels import cross_entropy_backward, cross_entropy_forward
    from npmnv3.optim import SGD

    model = getattr(npmnv3, f"mobilenet_v3_{arch}")(seed=0).train()
    opt = SGD(model, lr=0.01, momentum=0.9, weight_decay=1e-5)
    rng = np.random.default_rng(0)

    def step(optimizer=True):
        model.zero_grad()
        logits = model.forward(x, rng=rng)
        _, cache = cross_entropy_forward(logits, y)
        # as on torch's side, the input needs no gradient: parameters' gradients only
        model.backward(cross_entropy_backward(1.0, cache), input_grad=False)
        if optimizer:
            opt.step()
    step.opt = opt
    return step


def _torch_step(arch, x, y, channels_last):
    import torch
    import torchvision

    torch.set_num_threads(int(THREADS))
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"mobilenet_v3_{arch}")().train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xt), yt).backward()
        opt.step()
    return step


def _inputs(batch):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    y = rng.integers(0, 1000, batch).astype(np.int64)
    return x, y


def profile_worker(arch: str, batch: int, reps: int) -> dict:
    """npmnv3's step, every kernel call timed (``train_profile.py``); rows as JSON."""
    import train_profile

    import npmnv3  # noqa: F401

    def make_step():
        step = _npmnv3_step(arch, *_inputs(batch))
        return step, step.opt
    return {"rows": train_profile.run(arch, batch, reps, make_step)}


def start_worker(arch: str, batch: int) -> dict:
    """Seconds from this worker's first line to the end of its first training step, split into
    ``import npmnv3`` + model + optimizer, and the first step (compiling whatever Numba's cache
    lacks); the parent adds the interpreter's own start."""
    t0 = time.perf_counter()
    import npmnv3  # noqa: F401
    step = _npmnv3_step(arch, *_inputs(batch))
    t1 = time.perf_counter()
    step()
    t2 = time.perf_counter()
    step()
    return {"setup_s": t1 - t0, "first_step_s": t2 - t1, "second_step_s": time.perf_counter() - t2,
            "done": time.time() - (time.perf_counter() - t2)}


def start(arch: str, batch: int) -> dict:
    """A cold start (``NUMBA_CACHE_DIR`` an empty temporary directory) then a warm one (the cache
    the cold start wrote), each a fresh worker; ``to_first_step_s`` includes Python's start."""
    import tempfile
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            t = time.time()
            r = run_worker(__file__, "start", "--arch", arch, "--batch", str(batch), "--reps", "1",
                           env={"NUMBA_CACHE_DIR": cache})
            r["to_first_step_s"] = r.pop("done") - t
            out[name] = r
    return out


def worker(side: str, arch: str, batch: int, reps: int) -> dict:
    """Time ``reps`` steps in this (fresh) process; returns a dict printed as JSON."""
    if side == "npmnv3":      # first, as the README says: it sets NumPy's OpenBLAS thread timeout
        import npmnv3  # noqa: F401
    if side == "profile":
        return profile_worker(arch, batch, reps)
    if side == "start":
        return start_worker(arch, batch)
    x, y = _inputs(batch)
    step = (_npmnv3_step(arch, x, y) if side == "npmnv3" else
            _torch_step(arch, x, y, channels_last=side == "torch-cl"))
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms_per_image": 1e3 * times[len(times) // 2] / batch,
            "peak_mb": peak_rss_mb()}


def measure(side, arch, batch, reps):
    return run_worker(__file__, side, "--arch", arch, "--batch", str(batch), "--reps", str(reps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["large", "small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true",
                    help="npmnv3 only: time every kernel call, grouped by pass and kind")
    ap.add_argument("--start", action="store_true",
                    help="npmnv3 only: time to the first step with an empty and a warm Numba cache")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch[0], args.batch, args.reps)))
        return
    if args.profile:
        import train_profile
        for arch in args.arch:
            rows = measure("profile", arch, args.batch, args.reps)["rows"]
            print(train_profile.table(arch, args.batch, rows), flush=True)
        return
    if args.start:
        print(f"# start of a training process, batch {args.batch}: empty vs warm Numba cache, "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
        print("| model | cache | to end of first step s | import + model s | first step s "
              "| second step s |")
        print("|---|---|---:|---:|---:|---:|")
        for arch in args.arch:
            for name, r in start(arch, args.batch).items():
                print(f"| {arch} | {name} | {r['to_first_step_s']:.1f} | {r['setup_s']:.2f} | "
                      f"{r['first_step_s']:.2f} | {r['second_step_s']:.2f} |", flush=True)
        return
    import numba
    import numpy as np
    import torch
    print(f"# training step (forward + backward + SGD): npmnv3 vs PyTorch {torch.__version__} "
          f"eager, float32, 224x224, batch {args.batch}, {THREADS} threads")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}, Numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
    print("| model | npmnv3 ms/img | torch NCHW ms/img | torch channels_last ms/img "
          "| ratio vs faster torch | npmnv3 peak MB | torch NCHW peak MB | torch CL peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        r = {s: measure(s, arch, args.batch, args.reps) for s in ("npmnv3", "torch", "torch-cl")}
        ms = {s: v["ms_per_image"] for s, v in r.items()}
        best = min(ms["torch"], ms["torch-cl"])
        print(f"| {arch} | {ms['npmnv3']:.1f} | {ms['torch']:.1f} | {ms['torch-cl']:.1f} | "
              f"{ms['npmnv3'] / best:.2f}x | {r['npmnv3']['peak_mb']:.0f} | "
              f"{r['torch']['peak_mb']:.0f} | {r['torch-cl']['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
