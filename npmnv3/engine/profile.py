"""Where the engine's time goes: each step timed on its own, next to its MACs and the floor.

A step of ``run.py`` reads one activation buffer and writes the other, so it can be run again
and again in place once the steps before it have run: ``profile`` runs the network step by
step, timing each (median of ``reps``) in the mode the batch would use, then the classifier.
The compute floor of a step is 2 * MACs at ``PEAK_GFLOPS`` (what OpenBLAS sgemm reaches on
large matrices on both cores of the benchmark machine, PERFORMANCE_NOTES.md).
"""

from __future__ import annotations

import time

import numba
import numpy as np

from ..kernels.threads import single_threaded_blas
from . import run
from .plan import (
    BLOCK,
    CONV1,
    F_CEXP,
    F_CIN,
    F_COUT,
    F_EXPAND,
    F_H,
    F_HO,
    F_K,
    F_KIND,
    F_SE,
    F_SQ,
    F_W,
    F_WO,
    STEM,
)

PEAK_GFLOPS = 200.0


def step_macs(t) -> dict:
    """Multiply-accumulates of one plan row, per image, by op kind."""
    P = int(t[F_HO] * t[F_WO])
    if t[F_KIND] == STEM:
        return {"stem conv": P * int(t[F_COUT] * t[F_CIN] * t[F_K] ** 2)}
    if t[F_KIND] == CONV1:
        return {"pointwise": P * int(t[F_CIN] * t[F_COUT])}
    ce = int(t[F_CEXP])
    m = {"pointwise": P * ce * int(t[F_COUT]), "depthwise": P * ce * int(t[F_K] ** 2)}
    if t[F_EXPAND]:
        m["pointwise"] += int(t[F_H] * t[F_W] * t[F_CIN]) * ce
    if t[F_SE]:
        m["squeeze-excite"] = 2 * ce * int(t[F_SQ]) + P * ce
    return m


def step_kind(t) -> str:
    if t[F_KIND] == STEM:
        return "stem conv 3x3"
    if t[F_KIND] == CONV1:
        return "last 1x1 conv"
    return "inverted residual" + (" + SE" if t[F_SE] else "")


def _time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def profile(net, x, reps: int = 7) -> list[dict]:
    """Rows {step, kind, macs (per image, by op kind), ms (per image)} for every step of
    ``net`` (a ``FoldedNet``) on x (N, 3, H, W), then one for the classifier."""
    x = net._check(x)
    N, _, H, W = x.shape
    p = net.plan
    mode = net.mode(N)
    tab, sizes = p.table(H, W, mode)
    T = numba.get_num_threads()
    ws = net.workspace(mode, H, W)
    szs = np.array([sizes[k] for k in ("act", "dw", "band", "acc", "chan", "sq")])
    C = int(tab[-1, F_COUT])
    pooled_t = np.zeros((C, N), net.dtype)
    hidden_t = np.empty((p.hidden, N), net.dtype)
    logits_t = np.empty((p.num_classes, N), net.dtype)
    feats, trace = np.empty((N, 0), net.dtype), np.empty(0, net.dtype)
    toffs = np.zeros(len(tab), np.int64)
    phases = net.band_phases(tab, False)
    ws.pools[...] = 0.0
    fns = run.compiled(net.dtype)

    def call(ph):
        run.forward(*fns, ph, T, tab, p.wb, p.kc, p.fc, x, ws.ws, ws.sc, ws.pools, szs, trace,
                    toffs, feats, pooled_t, hidden_t, logits_t, 0)

    rows = []
    with single_threaded_blas():
        for i, t in enumerate(tab):
            ph = (np.array([(run.IMAGES, i)]) if mode == "images"
                  else phases[phases[:, 1] == i])
            rows.append({"step": net.names[i], "kind": step_kind(t), "macs": step_macs(t),
                         "ms": 1e3 * _time(lambda ph=ph: call(ph), reps) / N})
        cls = np.array([(run.CLS0, 0), (run.CLS1, 0)])
        rows.append({"step": "classifier", "kind": "classifier",
                     "macs": {"linear": C * p.hidden + p.hidden * p.num_classes},
                     "ms": 1e3 * _time(lambda: call(cls), reps) / N})
    for r in rows:
        r["floor_ms"] = 2 * sum(r["macs"].values()) / (PEAK_GFLOPS * 1e6)
        r["floor_frac"] = r["floor_ms"] / r["ms"]
    return rows


def by_kind(rows) -> list[dict]:
    """``profile`` rows summed per step kind."""
    out = {}
    for r in rows:
        k = out.setdefault(r["kind"], {"kind": r["kind"], "steps": 0, "macs": 0, "ms": 0.0,
                                       "floor_ms": 0.0})
        k["steps"] += 1
        k["macs"] += sum(r["macs"].values())
        k["ms"] += r["ms"]
        k["floor_ms"] += r["floor_ms"]
    for k in out.values():
        k["floor_frac"] = k["floor_ms"] / k["ms"]
    return list(out.values())


__all__ = ["BLOCK", "PEAK_GFLOPS", "by_kind", "profile", "step_kind", "step_macs"]
