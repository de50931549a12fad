"""Channels-last (NHWC) Numba loops of the spatial convolutions behind the fast training
kernels: the depthwise convolution (every tap a multiply-add vectorised over channels, or over a
whole flattened row for stride 1 and few channels) and the gather that turns the stem's dense
convolution into a 1x1 one (im2col).

The conventions (layout, tasks, the batch statistics taken on each band in the forward, dL/dy
formed per band from ``bc`` / ``mode`` in the backward, ``kc``) are ``channels_last.py``'s; its
helpers ``_band_stats``, ``merge_stats`` and ``_dy_rows`` are used as they are.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .channels_last import _band_stats, _dy_rows, merge_stats
from .tasks import run_tasks, stat_parts, stat_views, sum_parts, task_kernel

_jit = njit(cache=True)

# ----------------------------------------------------------------------------- depthwise

@_jit
def _col_range(off, s, W, Wo):
    """Output columns j whose tap input column j*s + off lies inside [0, W): (jlo, jhi)."""
    jlo = 0 if off >= 0 else (-off + s - 1) // s
    jhi = min(Wo, (W - 1 - off) // s + 1)
    return jlo, max(jlo, jhi)


def _tile(w, Wo):
    """(k*k, Wo*C): each tap's channel weights repeated for every output column, so that with
    stride 1 a tap is one contiguous multiply-add over a whole flattened row."""
    return np.tile(w, (1, Wo))


FLAT_MAX_CHANNELS = 128    # measured on MobileNetV3-Large's depthwise layers (AVX2): 16 and 72
#                            channels gain 2x / 1.2x from flat taps, 120 and more lose 0-20 %


def flat_taps(geom, C) -> bool:
    """Whether the depthwise loops run each tap over a flattened row (``_tile``): stride 1 and
    few channels; with many, the per-pixel channel loop is long enough to vectorise and the
    tiled weights would only cost cache."""
    return geom[1] == 1 and C < FLAT_MAX_CHANNELS


# Task kernels (``tasks.py``): sz starts with the geometry (``_geometry``):
# (N, H, W, C, Ho, Wo, k, s, p, d, flat).

@task_kernel
def _depthwise_fwd_tasks(t0, t1, sz, x, w, wr, b, y, _f, _g, st, _v):
    """sz = geometry + (rb, stats); x (N, H, W, C), w (k*k, C), wr (``_tile``), b (C,),
    y (N, Ho, Wo, C); st: ``stat_parts``."""
    N, H, W, C, Ho, Wo, k, s, p, d, flat, rb, stats = (sz[0], sz[1], sz[2], sz[3], sz[4], sz[5],
                                                       sz[6], sz[7], sz[8], sz[9], sz[10], sz[11],
                                                       sz[12])
    x, y, w = x.reshape(N, H, W, C), y.reshape(N, Ho, Wo, C), w.reshape(k * k, C)
    wr = wr.reshape(k * k, Wo * C if flat else C)
    nb = (Ho + rb - 1) // rb
    cnt, mean, m2 = stat_views(st, N * nb, C)
    for t in range(t0, t1):
        n, i0 = t // nb, (t % nb) * rb
        yn = y[n].reshape(Ho * Wo, C)
        for i in range(i0, min(Ho, i0 + rb)):
            acc = y[n, i]                                     # (Wo, C), accumulated in place
            for j in range(Wo):
                for c in range(C):
                    acc[j, c] = b[c]
            af = acc.reshape(Wo * C)
            for u in range(k):
                ii = i * s - p + u * d
                if ii < 0 or ii >= H:
                    continue
                row = x[n, ii]                                # (W, C)
                for v in range(k):
                    off = v * d - p
                    jlo, jhi = _col_range(off, s, W, Wo)
                    if flat:                  # slices indexed by range variables only: no
                        q0, q1 = jlo * C, jhi * C         # wrap-around check, so LLVM
                        a_, w_ = af[q0:q1], wr[u * k + v, q0:q1]          # vectorises
                        x_ = row.reshape(W * C)[q0 + off * C:q1 + off * C]
                        for q in range(q1 - q0):
                            a_[q] += w_[q] * x_[q]
                        continue
                    wt = w[u * k + v]
                    for j in range(jlo, jhi):
                        a, xv = acc[j], row[j * s + off]
                        for c in range(C):
                            a[c] += wt[c] * xv[c]
            if stats:
                _band_stats(yn, i * Wo, (i + 1) * Wo, cnt[t], mean[t], m2[t])


def depthwise_fwd(x, w, b, geom, flat, rb, stats, y, mv):
    """y[n, i, j, c] = b[c] + sum_{u,v} w[u*k + v, c] * x[n, i*s-p+u*d, j*s-p+v*d, c] (zero
    outside), x (N, H, W, C), w (k*k, C), y (N, Ho, Wo, C); tasks: (image, band of rb rows);
    with ``stats`` the batch mean and variance of y go to mv (2, C). With ``flat``
    (``flat_taps``) each tap is one loop over the flattened row of Wo*C values; else one loop
    over C per pixel."""
    T = x.shape[0] * -(-y.shape[1] // rb)
    st = stat_parts(T, x.shape[3])
    wr = _tile(w, y.shape[2]) if flat else w
    run_tasks(_depthwise_fwd_tasks, T, _geometry(x, y, geom, flat) + (rb, stats),
              (x, w, wr, b, y), (st,))
    if stats:
        merge_stats(st, T, mv)


def _geometry(x, y, geom, flat):
    """The task kernels' leading sizes: (N, H, W, C, Ho, Wo, k, s, p, d, flat) of a
    channels-last input x (N, H, W, C) and output y (N, Ho, Wo, C)."""
    return (*x.shape, y.shape[1], y.shape[2], *geom, int(flat))


@task_kernel
def _depthwise_bwd_tasks(n0, n1, sz, x, y, dz, w, wr, kc, dx, bc, part):
    """sz = geometry + (act, mode); x, dx (N, H, W, C), y, dz (N, Ho, Wo, C), w (k*k, C),
    wr (``_tile``); bc (6, C); part (N, k*k + 1, C)."""
    N, H, W, C, Ho, Wo, k, s, p, d, flat, act, mode = (sz[0], sz[1], sz[2], sz[3], sz[4], sz[5],
                                                       sz[6], sz[7], sz[8], sz[9], sz[10], sz[11],
                                                       sz[12])
    x, dx = x.reshape(N, H, W, C), dx.reshape(N, H, W, C)
    y, dz = y.reshape(N, Ho, Wo, C), dz.reshape(N, Ho, Wo, C)
    w, wr = w.reshape(k * k, C), wr.reshape(k * k, Wo * C if flat else C)
    bc, part = bc.reshape(6, C), part.reshape(N, k * k + 1, C)
    M = np.float64(N * Ho * Wo)
    for n in range(n0, n1):
        g = np.empty((Wo, C), dtype=x.dtype)
        gf = g.reshape(Wo * C)
        prt = np.empty(C, dtype=x.dtype)
        racc = np.zeros((k * k + 1, Wo * C), dtype=x.dtype)   # per-column partials
        acc = part[n]
        dxn = dx[n]
        for ii in range(H):
            for jj in range(W):
                for c in range(C):
                    dxn[ii, jj, c] = 0
        yn = y[n].reshape(Ho * Wo, C)
        dzn = dz[n].reshape(Ho * Wo, C)
        for i in range(Ho):
            _dy_rows(yn, dzn, i * Wo, (i + 1) * Wo, bc, act, mode, M, kc, g)
            rb = racc[k * k]
            for q in range(Wo * C):
                rb[q] += gf[q]
            for u in range(k):
                ii = i * s - p + u * d
                if ii < 0 or ii >= H:
                    continue
                xrow, dxrow = x[n, ii], dxn[ii]
                for v in range(k):
                    off = v * d - p
                    jlo, jhi = _col_range(off, s, W, Wo)
                    if flat:
                        q0, q1 = jlo * C, jhi * C
                        o0, o1 = q0 + off * C, q1 + off * C
                        x_, d_ = xrow.reshape(W * C)[o0:o1], dxrow.reshape(W * C)[o0:o1]
                        w_, r_, g_ = wr[u * k + v, q0:q1], racc[u * k + v, q0:q1], gf[q0:q1]
                        for q in range(q1 - q0):
                            d_[q] += w_[q] * g_[q]
                            r_[q] += g_[q] * x_[q]
                        continue
                    wt = w[u * k + v]
                    for c in range(C):
                        prt[c] = 0
                    for j in range(jlo, jhi):
                        gj, xv, dv = g[j], xrow[j * s + off], dxrow[j * s + off]
                        for c in range(C):
                            dv[c] += wt[c] * gj[c]
                            prt[c] += gj[c] * xv[c]
                    a = acc[u * k + v]
                    for c in range(C):
                        a[c] += prt[c]
        for r in range(k * k + 1):                 # the per-column partials (db: always)
            if not flat and r < k * k:
                continue
            a, ra = acc[r], racc[r]
            for j in range(Wo):
                for c in range(C):
                    a[c] += ra[j * C + c]


def depthwise_bwd(x, y, dz, w, bc, act, mode, kc, geom, flat, dx, dw, db):
    """Backward of ``depthwise_fwd`` (after batch norm + act, see ``mode``): per image, each
    output row's dL/dy is formed in a scratch row, then scattered into dx (N, H, W, C) and
    gathered into dw (k*k, C) and db (C,). With ``flat`` (as in the forward) each tap runs over
    the flattened row, the dw and db partial sums kept per (tap, column, channel) over the
    image's rows, then summed over columns; float64 sums per image, merged in image order."""
    N, kk, C = x.shape[0], w.shape[0], x.shape[3]
    part = np.zeros((N, kk + 1, C))
    wr = _tile(w, dz.shape[2]) if flat else w
    run_tasks(_depthwise_bwd_tasks, N, _geometry(x, dz, geom, flat) + (act, mode),
              (x, y, dz, w, wr, kc, dx), (bc, part))
    total = np.empty((kk + 1, C))
    sum_parts(part, total)
    dw[...] = total[:kk]                      # float64 sums rounded once to the dtype
    db[...] = total[kk]


# ----------------------------------------------------------------------------- dense conv (stem)
# A dense convolution with few taps (the 3-channel stem: C*k*k = 27) is a 1x1 convolution of
# its im2col rows: cols (N*Ho*Wo, C*k*k) @ W^T, so the forward and the weight gradient are
# ``pointwise_fwd`` / ``pointwise_bwd`` (their GEMM bands, batch statistics and dL/dy) on cols,
# and the only loop of its own is the gather below. The backward gathers cols again rather than
# keeping 27 values per pixel (1.7x the stem's output) alive between the two passes.

@task_kernel
def _im2col_tasks(t0, t1, sz, x, cols, _c, _d, _e, _f, _g, _u, _v):
    """sz = (N, C, H, W, Ho, Wo, k, s, p, d); x (N, C, H, W) NCHW; cols (N*Ho*Wo, C*k*k): row
    (n*Ho + i)*Wo + j, column q = (c*k + u)*k + v holds x[n, c, i*s-p+u*d, j*s-p+v*d] (zero
    outside the image). One task per output row (n, i). Flat indices: 0.7 s to compile here,
    against 1.2 s for the same loops on reshaped views."""
    _, C, H, W, Ho, Wo, k, s, p, d = (sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6], sz[7],
                                      sz[8], sz[9])
    CKK = C * k * k
    for t in range(t0, t1):
        n, i = t // Ho, t % Ho
        for c in range(C):
            for u in range(k):
                ii = i * s - p + u * d
                for v in range(k):
                    o = t * Wo * CKK + (c * k + u) * k + v       # cols[(n*Ho + i)*Wo, q]
                    off = v * d - p                              # input column j*s + off
                    jlo, jhi = _col_range(off, s, W, Wo)         # ... inside [0, W)
                    if ii < 0 or ii >= H:
                        jlo, jhi = Wo, Wo
                    xo = ((n * C + c) * H + ii) * W + off        # x[n, c, ii, off]
                    for j in range(jlo):
                        cols[o + j * CKK] = 0
                    for j in range(jlo, jhi):
                        cols[o + j * CKK] = x[xo + j * s]
                    for j in range(jhi, Wo):
                        cols[o + j * CKK] = 0


def im2col(x, geom, Ho, Wo):
    """The (N*Ho*Wo, C*k*k) im2col rows of an NCHW input x (N, C, H, W) for geom (k, s, p, d):
    a dense conv is then ``cols @ w.reshape(K, C*k*k).T``."""
    N, C = x.shape[:2]
    cols = np.empty((N * Ho * Wo, C * geom[0] * geom[0]), dtype=x.dtype)
    run_tasks(_im2col_tasks, N * Ho, (*x.shape, Ho, Wo, *geom), (x, cols))
    return cols
