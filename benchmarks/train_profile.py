"""Where a training step's time goes: every kernel call of ``nn/blocks.py``, timed and grouped.

Used by ``python benchmarks/bench_train.py --profile``. The kernels module that ``blocks.py``
calls through (``blocks.K``) is replaced by a proxy whose functions time each call
(``time.perf_counter`` around it; every kernel is synchronous) and file it under
(pass, kind). Next to each row: the multiply-accumulates it performs and the fraction of the
compute floor it reaches (2 * MACs at ``FLOOR_GFLOPS``, the sgemm peak of PERFORMANCE_NOTES.md).
"glue" is the step's time outside the kernels (residual adds, gradient accumulation, loss);
"SGD" is ``opt.step``. Nothing of npmnv3 is changed: the proxy is removed afterwards.
"""

from __future__ import annotations

import time
import types
from collections import defaultdict

FLOOR_GFLOPS = 200.0          # numpy sgemm peak on this machine kind (PERFORMANCE_NOTES.md)

# kernel function name -> (pass, kind); anything else in ``blocks.K`` is passed through untimed
KINDS = {
    "conv_bn_act": "conv-BN-act", "conv2d": "stem conv", "pointwise": "conv 1x1",
    "depthwise": "depthwise",
    "batchnorm_act": "BN + act", "se": "SE", "avgpool": "classifier", "linear": "classifier",
    "hardswish": "classifier", "dropout": "classifier",
}


def _macs(name, args, out, kw):
    """Forward multiply-accumulates of one call from its arguments and output."""
    import numpy as np
    if name == "conv_bn_act":
        name = kw["kind"].replace("conv", "conv2d")
    if name in ("pointwise", "conv2d"):
        x, w = args[0], args[1]
        y = out[0]
        return int(np.prod(y.shape)) * int(np.prod(w.shape[1:]))
    if name == "depthwise":
        w, y = args[1], out[0]
        return int(np.prod(y.shape)) * w.shape[2] * w.shape[3]
    if name == "se":
        x, w1 = args[0], args[1]
        return 2 * x.shape[0] * w1.shape[0] * w1.shape[1] + x.size     # two fcs + the scale
    if name == "linear":
        return args[0].shape[0] * args[1].size
    return 0


def _split(fname):
    for suffix, pas in (("_forward", "forward"), ("_backward", "backward")):
        if fname.endswith(suffix):
            return fname[: -len(suffix)], pas
    return None, None


class Profile:
    """Accumulates seconds, calls and MACs per (pass, kind)."""

    def __init__(self):
        self.sec = defaultdict(float)
        self.calls = defaultdict(int)
        self.macs = defaultdict(int)
        self._fwd_macs = {}          # id(cache) -> forward MACs, for the backward's count
        self._kinds = {}             # id(cache) -> row name of a conv_bn_act forward

    def proxy(self, kernels):
        ns = types.SimpleNamespace()
        for fname in dir(kernels):
            f = getattr(kernels, fname)
            base, pas = _split(fname)
            setattr(ns, fname, self._wrap(f, base, pas) if base in KINDS else f)
        return ns

    def _wrap(self, f, base, pas):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            dt = time.perf_counter() - t0
            kind = KINDS[base]
            if base == "conv_bn_act":               # split by the convolution's kind
                kind = self._kinds.pop(id(args[1]), None) if pas == "backward" else \
                    {"conv": "stem", "pointwise": "1x1", "depthwise": "depthwise"}[
                        kwargs["kind"]] + " conv+BN+act"
                if pas == "forward":
                    self._kinds[id(out[1])] = kind
            key = (pas, kind)
            self.sec[key] += dt
            self.calls[key] += 1
            if pas == "forward":
                m = _macs(base, args, out, kwargs)
                self.macs[key] += m
                self._fwd_macs[id(out[1])] = m
            else:                     # dx and dW each cost the forward's MACs (dx skipped
                m = self._fwd_macs.pop(id(args[1]), 0)     # for the stem: need_dx=False)
                nd = 1 if kwargs.get("need_dx", True) is False else 2
                self.macs[key] += nd * m if base in ("pointwise", "conv2d", "depthwise",
                                                     "linear", "conv_bn_act") else m
            return out
        return timed

    def reset(self):
        self.sec.clear()
        self.calls.clear()
        self.macs.clear()
        self._fwd_macs.clear()
        self._kinds.clear()


def run(arch, batch, reps, make_step):
    """Profile ``reps`` steps after 2 warm-up steps; returns rows for ``table``."""
    from npmnv3 import kernels
    from npmnv3.nn import blocks

    prof = Profile()
    original = blocks.K
    blocks.K = prof.proxy(kernels)
    try:
        step, opt = make_step()
        for _ in range(2):
            step()
        prof.reset()
        total = sgd = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            step(optimizer=False)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            total += t2 - t0
            sgd += t2 - t1
    finally:
        blocks.K = original
    per = 1e3 / (reps * batch)                  # seconds summed over reps -> ms per image
    rows = []
    for key in sorted(prof.sec, key=lambda k: (k[0] != "forward", -prof.sec[k])):
        ms = prof.sec[key] * per
        macs = prof.macs[key] / reps / batch
        floor_ms = 2 * macs / (FLOOR_GFLOPS * 1e9) * 1e3
        rows.append((key[0], key[1], prof.calls[key] // reps, ms, macs / 1e6,
                     floor_ms / ms if ms else 0.0))
    kernel_ms = sum(r[3] for r in rows)
    kernel_macs = sum(r[4] for r in rows)
    step_ms = total * per
    rows.append(("step", "SGD (opt.step)", 1, sgd * per, 0.0, 0.0))
    rows.append(("step", "glue (outside kernels)", 0, step_ms - kernel_ms - sgd * per, 0.0,
                 0.0))
    floor_ms = 2 * kernel_macs * 1e6 / (FLOOR_GFLOPS * 1e9) * 1e3
    rows.append(("step", "total", 0, step_ms, kernel_macs, floor_ms / step_ms))
    return rows


def table(arch, batch, rows) -> str:
    lines = [f"\n## profile: {arch}, batch {batch} (ms per image, summed over the step)\n",
             "| pass | kind | calls | ms/img | % of step | MMACs/img | % of compute floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    total = rows[-1][3]
    for pas, kind, calls, ms, mmacs, frac in rows:
        lines.append(f"| {pas} | {kind} | {calls or ''} | {ms:.2f} | {100 * ms / total:.1f} | "
                     f"{mmacs:.1f} | {100 * frac:.1f} |" if mmacs else
                     f"| {pas} | {kind} | {calls or ''} | {ms:.2f} | {100 * ms / total:.1f} | "
                     f" | |")
    return "\n".join(lines)
