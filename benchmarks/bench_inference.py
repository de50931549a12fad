"""Eval-mode inference: npmnv3's engine vs onnxruntime and PyTorch eager, same run.

    python benchmarks/bench_inference.py                  # everything (~10 min)
    python benchmarks/bench_inference.py --part speed     # or: start, order, profile
    python benchmarks/bench_inference.py --arch small --batch 1 --rounds 2

Needs the ``bench`` extra (onnxruntime, onnx) and torch/torchvision. Every measurement runs in
its own fresh Python process (a worker of this script), so libraries never share thread pools
or memory; rounds interleave the libraries (round 1: each library once, round 2: again...) and
the table shows the median over rounds of each worker's median. float32, random weights
(speed does not depend on them), 2 threads everywhere (``common.run_worker``).

* speed:   ms/image for npmnv3, onnxruntime (torchvision's model exported by
           ``torch.onnx.export`` into a temporary directory, CPU provider, intra-op 2
           threads), torch eager NCHW and channels_last; ratios; peak RSS at batch 32.
* start:   import + build + first Large prediction with an empty Numba cache (a fresh
           ``NUMBA_CACHE_DIR``) and with the cache warm; compile time per jitted function.
* order:   npmnv3 when NumPy, SciPy or torch was imported first.
* profile: time per engine step and per step kind vs MACs and the compute floor; a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from common import THREADS, peak_rss_mb, run_worker

SIDES = ("npmnv3", "onnxruntime", "torch", "torch-cl")


# ----------------------------------------------------------------------------- workers

def _npmnv3_model(arch):
    import npmnv3
    return getattr(npmnv3, f"mobilenet_v3_{arch}")(seed=0).eval()


def _runner(side, arch, x, onnx_path):
    if side == "npmnv3":
        model = _npmnv3_model(arch)
        return lambda: model(x)
    if side == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(THREADS)
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})[0]
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
    return run


def worker(a) -> dict:
    """One measurement in this fresh process; returns a dict printed as JSON."""
    t_start = time.perf_counter()
    for mod in a.first.split(","):                   # import order: these modules first
        if mod:
            __import__(mod)
    compile_s = _listen_compiles() if a.mode == "start" else None
    import numpy as np
    x = np.random.default_rng(0).standard_normal((a.batch[0], 3, 224, 224)).astype(np.float32)
    run = _runner(a.worker, a.arch[0], x, a.onnx)
    run()
    first = time.perf_counter() - t_start
    if a.mode == "start":
        top = sorted(compile_s.items(), key=lambda kv: -kv[1])
        return {"first_s": first, "compile_s": dict(top)}
    if a.mode == "profile":
        from npmnv3.engine.profile import profile
        return {"rows": profile(_npmnv3_model(a.arch[0]).folded(), x, reps=a.reps)}
    for _ in range(2):
        run()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"ms_per_image": 1e3 * statistics.median(times) / a.batch[0], "peak_mb": peak_rss_mb()}


def _listen_compiles():
    """{function name: seconds} of every Numba compilation, own time (callees excluded)."""
    from numba.core import event
    own, stack = {}, []

    class Listener(event.Listener):
        def on_start(self, ev):
            stack.append([ev.data["dispatcher"].py_func.__name__, time.perf_counter(), 0.0])

        def on_end(self, ev):
            name, t0, inner = stack.pop()
            dt = time.perf_counter() - t0
            own[name] = own.get(name, 0.0) + dt - inner
            if stack:
                stack[-1][2] += dt

    event.register("numba:compile", Listener())
    return own


# ----------------------------------------------------------------------------- parent

def measure(side, arch, batch, mode="time", reps=1, first="", onnx="", env=None):
    args = [side, "--arch", arch, "--batch", str(batch), "--mode", mode, "--reps", str(reps),
            "--first", first, "--onnx", onnx]
    return run_worker(__file__, *args, timeout=1800, env=env)


def export_onnx(arch, folder) -> str:
    import torch
    import torchvision
    model = getattr(torchvision.models, f"mobilenet_v3_{arch}")().eval()
    path = os.path.join(folder, f"mobilenet_v3_{arch}.onnx")
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path, dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
    return path


def part_speed(args, onnx):
    print("| model | batch | npmnv3 | onnxruntime | torch NCHW | torch channels_last "
          "| npmnv3 / onnxruntime | npmnv3 / best torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    mem = {}
    for arch in args.arch:
        for b in args.batch:
            reps = 30 if b == 1 else 6
            res = {s: [] for s in SIDES}
            for _ in range(args.rounds):                      # interleaved rounds
                for s in SIDES:
                    r = measure(s, arch, b, reps=reps, onnx=onnx[arch])
                    res[s].append(r["ms_per_image"])
                    if b == max(args.batch):
                        mem.setdefault((arch, s), []).append(r["peak_mb"])
            m = {s: statistics.median(v) for s, v in res.items()}
            best = min(m["torch"], m["torch-cl"])
            print(f"| {arch} | {b} | {m['npmnv3']:.2f} | {m['onnxruntime']:.2f} | "
                  f"{m['torch']:.2f} | {m['torch-cl']:.2f} | "
                  f"{m['npmnv3'] / m['onnxruntime']:.2f}x | {m['npmnv3'] / best:.2f}x |",
                  flush=True)
    print(f"\nPeak resident memory (VmHWM, MB) of a worker running batch {max(args.batch)}:\n")
    print("| model | " + " | ".join(SIDES) + " |")
    print("|---|" + "---:|" * len(SIDES))
    for arch in args.arch:
        print(f"| {arch} | " + " | ".join(f"{statistics.median(mem[(arch, s)]):.0f}"
                                         for s in SIDES) + " |")


def part_start(args):
    print("| model | Numba cache | import + build + first prediction s | slowest compiles "
          "(own s) |")
    print("|---|---|---:|---|")
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as cache:
            env = {"NUMBA_CACHE_DIR": cache}
            for label in ("empty", "warm", "warm"):
                r = measure("npmnv3", arch, 1, mode="start", env=env)
                top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["compile_s"].items())[:6])
                total = sum(r["compile_s"].values())
                print(f"| {arch} | {label} | {r['first_s']:.2f} | "
                      f"{top or '-'} (all {total:.1f}) |", flush=True)


def part_order(args):
    print("| model | batch | npmnv3 first | NumPy first | SciPy first | torch first "
          "| spread |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    orders = ("npmnv3", "numpy", "scipy.linalg", "torch")
    for arch in args.arch:
        for b in args.batch:
            res = {o: [] for o in orders}
            for r in range(args.rounds):                     # rotate who goes first
                for o in orders[r % 4:] + orders[:r % 4]:
                    res[o].append(measure("npmnv3", arch, b, reps=30 if b == 1 else 6,
                                          first=o)["ms_per_image"])
            m = [statistics.median(res[o]) for o in orders]
            print(f"| {arch} | {b} | " + " | ".join(f"{v:.2f}" for v in m)
                  + f" | {100 * (max(m) / min(m) - 1):.1f} % |", flush=True)


def part_profile(args):
    from plot_profile import plot_profile, print_profile
    for arch in args.arch:
        for b in args.batch:
            rows = measure("npmnv3", arch, b, mode="profile", reps=7)["rows"]
            print_profile(arch, b, rows)
            path = os.path.join(args.plots, f"profile_{arch}_bs{b}.png")
            plot_profile(rows, f"npmnv3 engine, MobileNetV3-{arch}, batch {b}", path)
            print(f"\n(plot: {path})\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["speed", "start", "order", "profile"])
    ap.add_argument("--arch", nargs="+", default=["large", "small"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plots", default=os.path.join(os.path.dirname(__file__), "plots"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--first", default="", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import numba
    import numpy as np
    import onnxruntime
    import torch
    os.makedirs(args.plots, exist_ok=True)
    print(f"# npmnv3 vs onnxruntime {onnxruntime.__version__} and PyTorch {torch.__version__} "
          f"eager; eval, float32, 224x224, {THREADS} threads; ms per image, median of "
          f"{args.rounds} interleaved rounds, each library in a fresh process")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}, Numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n", flush=True)
    measure("npmnv3", "small", 1, mode="start")           # make sure the Numba cache is warm
    with tempfile.TemporaryDirectory() as folder:
        onnx = {arch: export_onnx(arch, folder) for arch in args.arch}
        for part in args.part:
            print(f"\n## {part}\n")
            if part == "speed":
                part_speed(args, onnx)
            elif part == "start":
                part_start(args)
            elif part == "order":
                part_order(args)
            elif part == "profile":
                part_profile(args)


if __name__ == "__main__":
    main()
