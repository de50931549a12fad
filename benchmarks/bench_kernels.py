"""Time every fast npmnv3 kernel against PyTorch on MobileNetV3-Large's layer shapes.

    python benchmarks/bench_kernels.py            # batch 1 and 32, float32, 2 threads
    python benchmarks/bench_kernels.py --batch 1 --detail   # also one row per depthwise layer

For each kernel family the times of all MobileNetV3-Large (224x224) layers of that family are
summed: one forward (or backward) pass of every such layer in the network. Both sides run in
this process, one after the other, on the same inputs; medians over repeats, ratio = npmnv3 /
torch (below 1 means npmnv3 is faster). torch runs NCHW eager ops; its backward is timed with
``torch.autograd.grad`` on a retained graph. Numba compile (or cache load) happens on the first
call and is reported separately, never inside a timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # reference kernels: README "Speed"

import numpy as np  # noqa: E402
import torch  # noqa: E402  (loaded first: its OpenMP pool keeps torch's default spin-waiting)

import npmnv3  # noqa: E402, F401

# (in, k, exp, out, se, act, stride) of torchvision's mobilenet_v3_large at width 1.0.
LARGE = [(16, 3, 16, 16, 0, "RE", 1), (16, 3, 64, 24, 0, "RE", 2), (24, 3, 72, 24, 0, "RE", 1),
         (24, 5, 72, 40, 1, "RE", 2), (40, 5, 120, 40, 1, "RE", 1), (40, 5, 120, 40, 1, "RE", 1),
         (40, 3, 240, 80, 0, "HS", 2), (80, 3, 200, 80, 0, "HS", 1), (80, 3, 184, 80, 0, "HS", 1),
         (80, 3, 184, 80, 0, "HS", 1), (80, 3, 480, 112, 1, "HS", 1),
         (112, 3, 672, 112, 1, "HS", 1), (112, 5, 672, 160, 1, "HS", 2),
         (160, 5, 960, 160, 1, "HS", 1), (160, 5, 960, 160, 1, "HS", 1)]


def squeeze(c):
    """torchvision: _make_divisible(c // 4, 8)."""
    v = c // 4
    new = max(8, int(v + 4) // 8 * 8)
    return new + 8 if new < 0.9 * v else new


def layer_shapes(res=224):
    """Per family, the argument shapes of every layer in MobileNetV3-Large at ``res``."""
    fam = {"stem": [], "pw": [], "dw": [], "bn": [], "hswish": [], "relu": [], "se": []}
    h = (res + 1) // 2
    fam["stem"].append((3, 16, res))
    fam["bn"].append((16, h))
    fam["hswish"].append((16, h))
    for cin, k, exp, cout, se, act, s in LARGE:
        a = "hswish" if act == "HS" else "relu"
        if exp != cin:
            fam["pw"].append((cin, exp, h))
            fam["bn"].append((exp, h))
            fam[a].append((exp, h))
        ho = (h - 1) // s + 1
        fam["dw"].append((exp, k, s, h))
        fam["bn"].append((exp, ho))
        fam[a].append((exp, ho))
        if se:
            fam["se"].append((exp, squeeze(exp), ho))
        fam["pw"].append((exp, cout, ho))
        fam["bn"].append((cout, ho))
        h = ho
    fam["pw"].append((160, 960, h))
    fam["bn"].append((960, h))
    fam["hswish"].append((960, h))
    return fam


def timeit(fn, min_time=0.3, max_reps=50):
    """Median seconds of fn() over repeats (at least 3, until min_time has passed)."""
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Case:
    """One layer: builds inputs once; exposes npmnv3 and torch forward/backward callables."""

    def __init__(self, ours_fwd, ours_bwd, torch_fwd, arrays, needs_grad):
        self.ours_fwd, self.ours_bwd = ours_fwd, ours_bwd
        self.arrays = arrays
        out, self.cache = ours_fwd(*arrays)
        out = out[0] if isinstance(out, tuple) else out
        self.dout = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
        self.t_in = [torch.from_numpy(a.copy()).requires_grad_(g)
                     for a, g in zip(arrays, needs_grad)]
        self.torch_fwd = torch_fwd
        self.t_out = torch_fwd(*self.t_in)
        self.t_dout = torch.from_numpy(self.dout)
        self.t_grad_inputs = [t for t in self.t_in if t.requires_grad]

    def ours_forward(self):
        self.ours_fwd(*self.arrays)

    def ours_backward(self):
        self.ours_bwd(self.dout, self.cache)

    def torch_forward(self):
        with torch.no_grad():
            self.torch_fwd(*self.t_in)

    def torch_backward(self):
        torch.autograd.grad(self.t_out, self.t_grad_inputs, self.t_dout, retain_graph=True)


def build_cases(N, res=224):
    import torch.nn.functional as F

    from npmnv3 import kernels as K

    rng = np.random.default_rng(0)

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    fam = layer_shapes(res)
    cases = {}
    cases["stem conv 3x3 s2"] = [
        Case(lambda x, w: K.conv2d_forward(x, w, stride=2, padding=1),
             lambda d, c: K.conv2d_backward(d, c),
             lambda x, w: F.conv2d(x, w, stride=2, padding=1),
             [r(N, ci, h, h), r(co, ci, 3, 3)], [True, True]) for ci, co, h in fam["stem"]]
    cases["pointwise 1x1"] = [
        Case(lambda x, w: K.pointwise_forward(x, w), lambda d, c: K.pointwise_backward(d, c),
             lambda x, w: F.conv2d(x, w), [r(N, ci, h, h), r(co, ci, 1, 1, scale=0.1)],
             [True, True]) for ci, co, h in fam["pw"]]
    cases["depthwise"] = [
        Case(lambda x, w, s=s, k=k: K.depthwise_forward(x, w, stride=s, padding=k // 2),
             lambda d, c: K.depthwise_backward(d, c),
             lambda x, w, s=s, k=k: F.conv2d(x, w, stride=s, padding=k // 2, groups=x.shape[1]),
             [r(N, c, h, h), r(c, 1, k, k)], [True, True]) for c, k, s, h in fam["dw"]]
    bn_args = lambda c, h: [r(N, c, h, h), r(c) + 1, r(c), r(c), np.abs(r(c)) + 0.5]  # noqa: E731
    cases["batchnorm train"] = [
        Case(lambda x, w, b, m, v: K.batchnorm_forward(x, w, b, m, v, training=True, eps=1e-3,
                                                       momentum=0.01)[:2],
             lambda d, c: K.batchnorm_backward(d, c),
             lambda x, w, b, m, v: F.batch_norm(x, m, v, w, b, training=True, momentum=0.01,
                                                eps=1e-3),
             bn_args(c, h), [True, True, True, False, False]) for c, h in fam["bn"]]
    cases["batchnorm eval"] = [
        Case(lambda x, w, b, m, v: K.batchnorm_forward(x, w, b, m, v, training=False,
                                                       eps=1e-3)[:2],
             lambda d, c: K.batchnorm_backward(d, c),
             lambda x, w, b, m, v: F.batch_norm(x, m, v, w, b, training=False, eps=1e-3),
             bn_args(c, h), [True, True, True, False, False]) for c, h in fam["bn"]]
    cases["hardswish"] = [
        Case(K.hardswish_forward, K.hardswish_backward, F.hardswish, [r(N, c, h, h, scale=3)],
             [True]) for c, h in fam["hswish"]]
    cases["relu"] = [
        Case(K.relu_forward, K.relu_backward, F.relu, [r(N, c, h, h)], [True])
        for c, h in fam["relu"]]

    def torch_se(x, w1, b1, w2, b2):
        g = F.hardsigmoid(F.conv2d(F.relu(F.conv2d(x.mean((2, 3), keepdim=True), w1, b1)),
                                   w2, b2))
        return x * g

    cases["squeeze-excite"] = [
        Case(K.se_forward, K.se_backward, torch_se,
             [r(N, c, h, h), r(s, c, 1, 1, scale=0.1), r(s), r(c, s, 1, 1, scale=0.1), r(c)],
             [True] * 5) for c, s, h in fam["se"]]
    cases["avgpool + classifier"] = [
        Case(lambda x: K.avgpool_forward(x), lambda d, c: K.avgpool_backward(d, c),
             lambda x: F.adaptive_avg_pool2d(x, 1), [r(N, 960, 7, 7)], [True]),
        Case(K.linear_forward, K.linear_backward, F.linear,
             [r(N, 960), r(1280, 960, scale=0.03), r(1280)], [True] * 3),
        Case(K.linear_forward, K.linear_backward, F.linear,
             [r(N, 1280), r(1000, 1280, scale=0.03), r(1000)], [True] * 3)]

    return cases


def run(batches, detail, only=None):
    import numba

    torch.set_num_threads(2)

    t0 = time.perf_counter()
    warm = build_cases(1, res=64)             # tiny shapes: compile (or load) every kernel
    for cs in warm.values():
        for c in cs:
            c.ours_forward()
            c.ours_backward()
    t_first = time.perf_counter() - t0
    print(f"# npmnv3 kernels vs PyTorch {torch.__version__} (NCHW eager), float32, 2 threads")
    print(f"# {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
          f"NumPy {np.__version__}, Numba {numba.__version__} "
          f"(threading layer: {numba.threading_layer()}), "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print(f"# OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    print(f"# first calls of every fast kernel (Numba compile, or cache load if warm): "
          f"{t_first:.2f} s, excluded from the timings below\n")
    results = {}
    for N in batches:
        cases = build_cases(N)
        for fam, cs in cases.items():
            if only and not any(o in fam for o in only):
                continue
            for c in cs:                       # one untimed call at this size
                c.ours_forward(), c.ours_backward(), c.torch_forward(), c.torch_backward()
            row = []
            for ours, ref in (("ours_forward", "torch_forward"),
                              ("ours_backward", "torch_backward")):
                a = sum(timeit(getattr(c, ours)) for c in cs)
                b = sum(timeit(getattr(c, ref)) for c in cs)
                row.append((a, b))
            results[(fam, N)] = row
            if detail and fam == "depthwise":
                for c in cs:
                    x, k = c.arrays[0], c.arrays[1].shape[2]
                    ms = [timeit(f) * 1e3 for f in (c.ours_forward, c.torch_forward,
                                                     c.ours_backward, c.torch_backward)]
                    print(f"  depthwise N={N} C={x.shape[1]} H={x.shape[2]} k={k}: fwd "
                          f"{ms[0]:.3f} / {ms[1]:.3f} ms, bwd {ms[2]:.3f} / {ms[3]:.3f} ms")
    fams = list(dict.fromkeys(f for f, _ in results))
    head = "| kernel (all Large layers) | pass |"
    sep = "|---|---|"
    for N in batches:
        head += f" bs{N} npmnv3 ms | bs{N} torch ms | bs{N} ratio |"
        sep += "---:|---:|---:|"
    print(head)
    print(sep)
    for fam in fams:
        for p, name in enumerate(("forward", "backward")):
            line = f"| {fam} | {name} |"
            for N in batches:
                a, b = results[(fam, N)][p]
                line += f" {a*1e3:.2f} | {b*1e3:.2f} | {a/b:.2f}x |"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--detail", action="store_true", help="one line per depthwise layer")
    ap.add_argument("--only", nargs="+", help="kernel families to run (substring match)")
    args = ap.parse_args()
    run(args.batch, args.detail, args.only)


if __name__ == "__main__":
    main()
