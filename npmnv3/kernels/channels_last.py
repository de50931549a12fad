"""Channels-last (NHWC) Numba loops behind the fast training kernels.

Legend: N batch, C in-channels, K out-channels, P = N*Ho*Wo pixels, k kernel size, s stride,
p padding, d dilation; ``T`` tasks (bands of pixels or images, spread over Numba's threads).

The fast kernels take and return NCHW arrays (torch's shapes) whose memory is channels-last:
``a.transpose(0, 2, 3, 1)`` is C-contiguous (N, H, W, C), like ``torch.channels_last``
(``to_nhwc`` / ``nchw_view``). Then every 1x1 convolution of a band of pixels is one contiguous
GEMM (forward Y = X W^T, dX = dY W, dW = dY^T X); the depthwise, batch-norm and SE loops keep
the channel index innermost, so LLVM vectorises them over channels whatever the image size.

Each kernel is a serial Numba loop over a range of tasks, spread over threads by
``tasks.run_tasks`` (why not ``prange``: see ``tasks.py``); a GEMM inside a task is a
single-threaded BLAS call (``blas.gemm`` -> SciPy's cython_blas; the callers hold
``threads.single_threaded_blas()``), so the two pools of a 2-core machine never fight.

Batch norm rides along (``bc``, ``mode``): the forward convolutions also return the batch
statistics of their output, computed on each band while it is in cache (``_band_stats``: float64
sums of values shifted by the band's first row, bands merged by Chan et al.'s pairwise update,
so no E[y^2] - E[y]^2 cancellation); the backward ones turn dL/dz into dL/dy on each band just
before using it (``_dy_rows``), so dL/dy is never stored. Sums over tasks are merged in task
order: results do not depend on thread timing.

``bc`` (6, K) float64 rows: alpha, beta (pre-activation y' = alpha*y + beta), mean, k1, sb, sq:
    mode 1 (training)  dy = k1 * (M * g - sb - (y - mean) * sq)     g = act'(y') * dz
    mode 2 (eval)      dy = k1 * g
    mode 0 (plain)     dy = dz       (a convolution's own backward, no batch norm)
``kc`` = (0, 3, 6, 1/2) in the data's dtype (``epilogue.consts``).

This module holds the shared pieces (layout helpers, batch statistics, the batch-norm +
activation passes, the 1x1 convolution, pooling and SE); the spatial convolutions (depthwise,
the stem's dense conv) are in ``channels_last_conv.py`` on the same conventions.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from .blas import gemm
from .epilogue import act_grad, apply_act, consts
from .tasks import run_tasks, stat_parts, stat_views, sum_parts, task_kernel

_jit = njit(cache=True)
BAND_BYTES = 1 << 18        # a band of pixel rows (inputs + outputs) sized to stay in L2


def to_nhwc(x):
    """The (N, H, W, C) C-contiguous array holding NCHW array ``x`` (a view if ``x`` is
    already channels-last in memory, else a copy)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw_view(a):
    """(N, C, H, W) view of a channels-last (N, H, W, C) array: torch's shape, NHWC memory."""
    return a.transpose(0, 3, 1, 2)


def kernel_consts(dtype):
    """``epilogue.consts`` packed as the ``kc`` array the loops take."""
    return np.array(consts(dtype), dtype=dtype)


def band_rows(row_floats: int, total: int) -> int:
    """Rows per band when a row holds ``row_floats`` values: the band fits ``BAND_BYTES``."""
    return int(max(1, min(total, BAND_BYTES // (4 * max(1, row_floats)))))


def grad_band_rows(C: int, K: int, P: int) -> int:
    """Rows per band of the 1x1 backward: in cache, but at least 4 K C / (K + C), so adding each
    band's (K, C) weight gradient costs under a quarter of the band's own memory traffic."""
    return max(band_rows(2 * (C + K), P), min(P, 4 * K * C // (K + C)))


def plain_coefs(K):
    """``bc`` for mode 0 (no batch norm: the rows are not read)."""
    return np.zeros((6, K))


def num_tasks(work: int) -> int:
    """Tasks for ``work`` independent units: at least 8 (so the merge order, and with it every
    result, is the same for any thread count up to 8), at most ``work``."""
    return max(1, min(work, max(8, numba.get_num_threads())))


# ----------------------------------------------------------------------------- statistics

@_jit
def _band_stats(y, r0, r1, cnt, mean, m2):
    """Merge rows [r0, r1) of y (P, K) into the running (cnt[0], mean, m2) of one task."""
    K = y.shape[1]
    n = r1 - r0
    if n <= 0:
        return
    s1 = np.zeros(K)
    s2 = np.zeros(K)
    shift = y[r0]
    for q in range(r0, r1):
        row = y[q]
        for c in range(K):
            t = np.float64(row[c]) - np.float64(shift[c])
            s1[c] += t
            s2[c] += t * t
    na = cnt[0]
    tot = na + n
    for c in range(K):
        bm = np.float64(shift[c]) + s1[c] / n             # the band's mean and M2
        bm2 = s2[c] - s1[c] * s1[c] / n
        delta = bm - mean[c]
        mean[c] += delta * (n / tot)
        m2[c] += bm2 + delta * delta * (na * n / tot)
    cnt[0] = tot


def merge_stats(st, T, mv):
    """Merge the T task statistics of ``st`` (``tasks.stat_parts``) into mv (2, K): the mean and
    the biased variance. With counts n_t, means m_t and M2_t per task, the batch's are

        n = sum n_t,   mean = sum n_t m_t / n,   M2 = sum M2_t + sum n_t (m_t - mean)^2

    (Chan et al.'s pairwise update summed over all tasks at once; float64, no E[y^2] - E[y]^2
    cancellation). NumPy sums in a fixed order, so the result does not depend on the threads."""
    K = mv.shape[1]
    cnt, mean, m2 = st[:T, None], st[T:T + T * K].reshape(T, K), st[T + T * K:].reshape(T, K)
    n = cnt.sum()
    mv[0] = (cnt * mean).sum(axis=0) / n
    mv[1] = np.maximum((m2.sum(axis=0) + (cnt * (mean - mv[0]) ** 2).sum(axis=0)) / n, 0.0)


# Task kernels (``tasks.py``): ``kernel(t0, t1, sz, a..g, u, v)``, the order of ``n`` and of
# the array slots given on each; the public function under each packs them and merges.

@task_kernel
def _batch_stats_tasks(t0, t1, sz, y, _b, _c, _d, _e, _f, _g, st, _v):
    """sz = (P, K, T); y (P, K); st: ``stat_parts``."""
    P, K, T = sz[0], sz[1], sz[2]
    y = y.reshape(P, K)
    cnt, mean, m2 = stat_views(st, T, K)
    for t in range(t0, t1):
        lo, hi = t * P // T, (t + 1) * P // T
        for r0 in range(lo, hi, 256):
            _band_stats(y, r0, min(hi, r0 + 256), cnt[t], mean[t], m2[t])


def batch_stats(y, T, mv):
    """mv (2, K) = the mean and biased variance of each column of y (P, K)."""
    st = stat_parts(T, y.shape[1])
    run_tasks(_batch_stats_tasks, T, (*y.shape, T), (y,), (st,))
    merge_stats(st, T, mv)


# ----------------------------------------------------------------------------- element-wise

@task_kernel
def _affine_act_tasks(t0, t1, sz, y, kc, out, pre, _e, _f, _g, bc, _v):
    """sz = (P, K, T, act, rows of pre); bc (6, K)."""
    P, K, T, act, keep = sz[0], sz[1], sz[2], sz[3], sz[4] == sz[0]
    y, out, bc = y.reshape(P, K), out.reshape(P, K), bc.reshape(6, K)
    a, b = bc[0], bc[1]
    z, three, six = kc[0], kc[1], kc[2]
    for t in range(t0, t1):
        for q in range(t * P // T, (t + 1) * P // T):
            yr, orow = y[q], out[q]
            if act == 0:
                for c in range(K):
                    orow[c] = y.dtype.type(a[c] * yr[c] + b[c])
            else:
                for c in range(K):
                    orow[c] = apply_act(y.dtype.type(a[c] * yr[c] + b[c]), act, z, three, six)
    if keep:       # its own pass: stored in the loop above, it made that loop 3x slower
        pre = pre.reshape(P, K)
        for t in range(t0, t1):
            for q in range(t * P // T, (t + 1) * P // T):
                yr, pr = y[q], pre[q]
                for c in range(K):
                    pr[c] = y.dtype.type(a[c] * yr[c] + b[c])


def affine_act(y, bc, act, kc, T, out, pre):
    """out (P, K) = act(alpha * y + beta) (the pre-activation in float64, rounded to y's dtype,
    as torch's eval kernel's FMA); also into ``pre`` if it has P rows."""
    run_tasks(_affine_act_tasks, T, (*y.shape, T, act, len(pre)), (y, kc, out, pre), (bc,))


@task_kernel
def _grad_sums_tasks(t0, t1, sz, y, dz, kc, _d, _e, _f, _g, bc, part):
    """sz = (P, K, T, act); y, dz (P, K); bc (6, K); part (T, 2, K)."""
    P, K, T, act = sz[0], sz[1], sz[2], sz[3]
    y, dz, bc, part = y.reshape(P, K), dz.reshape(P, K), bc.reshape(6, K), part.reshape(T, 2, K)
    a, b, mu = bc[0], bc[1], bc[2]
    z, three, half = kc[0], kc[1], kc[3]
    for t in range(t0, t1):
        sb, sw = part[t, 0], part[t, 1]
        for q in range(t * P // T, (t + 1) * P // T):
            yr, dr = y[q], dz[q]
            for c in range(K):
                g = np.float64(act_grad(act, y.dtype.type(a[c] * yr[c] + b[c]), dr[c], z,
                                        three, half))
                sb[c] += g
                sw[c] += g * (yr[c] - mu[c])


def grad_sums(y, dz, bc, act, kc, T, sums):
    """sums (2, K) float64: sum of g and of g * (y - mean), g = act'(alpha*y + beta) * dz."""
    part = np.zeros((T, 2, y.shape[1]))
    run_tasks(_grad_sums_tasks, T, (*y.shape, T, act), (y, dz, kc), (bc, part))
    sum_parts(part, sums)


@_jit
def _dy_rows(y, dz, r0, r1, bc, act, mode, M, kc, out):
    """out (r1 - r0, K) = dL/dy of rows [r0, r1) from dz (see the module docstring)."""
    K = y.shape[1]
    if mode == 0:
        for q in range(r0, r1):
            for c in range(K):
                out[q - r0, c] = dz[q, c]
        return
    a, b, mu, k1, sb, sq = bc[0], bc[1], bc[2], bc[3], bc[4], bc[5]
    z, three, half = kc[0], kc[1], kc[3]
    for q in range(r0, r1):
        yr, dr, o = y[q], dz[q], out[q - r0]
        for c in range(K):
            g = act_grad(act, y.dtype.type(a[c] * yr[c] + b[c]), dr[c], z, three, half)
            if mode == 1:
                o[c] = k1[c] * (M * np.float64(g) - sb[c] - (yr[c] - mu[c]) * sq[c])
            else:
                o[c] = k1[c] * g


@task_kernel
def _bn_dx_tasks(t0, t1, sz, y, dz, kc, dx, _e, _f, _g, bc, _v):
    """sz = (P, K, T, act, mode); y, dz, dx (P, K); bc (6, K)."""
    P, K, T, act, mode = sz[0], sz[1], sz[2], sz[3], sz[4]
    y, dz, dx, bc = y.reshape(P, K), dz.reshape(P, K), dx.reshape(P, K), bc.reshape(6, K)
    M = np.float64(P)
    for t in range(t0, t1):
        lo, hi = t * P // T, (t + 1) * P // T
        _dy_rows(y, dz, lo, hi, bc, act, mode, M, kc, dx[lo:hi])


def bn_dx(y, dz, bc, act, mode, kc, T, dx):
    """dx (P, K) = dL/dy of every row (batch norm + act's own backward)."""
    run_tasks(_bn_dx_tasks, T, (*y.shape, T, act, mode), (y, dz, kc, dx), (bc,))


# ----------------------------------------------------------------------------- 1x1 convolution

@task_kernel
def _pointwise_fwd_tasks(t0, t1, sz, x, wt, y, _d, _e, _f, _g, st, _v):
    """sz = (P, C, K, R, T, stats); x (P, C), wt (C, K), y (P, K); st: ``stat_parts``."""
    P, C, K, R, T, stats = sz[0], sz[1], sz[2], sz[3], sz[4], sz[5]
    x, wt, y = x.reshape(P, C), wt.reshape(C, K), y.reshape(P, K)
    cnt, mean, m2 = stat_views(st, T, K)
    for t in range(t0, t1):
        lo, hi = t * P // T, (t + 1) * P // T
        for r0 in range(lo, hi, R):
            r1 = min(hi, r0 + R)
            gemm(x[r0:r1], wt, y[r0:r1])
            if stats:
                _band_stats(y, r0, r1, cnt[t], mean[t], m2[t])


def pointwise_fwd(x, wt, R, T, stats, y, mv):
    """y (P, K) = x (P, C) @ wt (C, K), by bands of R rows (one GEMM each); with ``stats`` the
    batch mean and variance of y go to mv (2, K)."""
    st = stat_parts(T, wt.shape[1])
    run_tasks(_pointwise_fwd_tasks, T, (*x.shape, wt.shape[1], R, T, stats), (x, wt, y), (st,))
    if stats:
        merge_stats(st, T, mv)


@task_kernel
def _pointwise_bwd_tasks(t0, t1, sz, x, y, dz, w, kc, dx, _g, bc, part):
    """sz = (P, C, K, R, T, act, mode, need_dx); x, dx (P, C), y, dz (P, K), w (K, C);
    bc (6, K); part (T, K, C)."""
    P, C, K, R, T, act, mode, need_dx = sz[0], sz[1], sz[2], sz[3], sz[4], sz[5], sz[6], sz[7]
    x, y, dz, w = x.reshape(P, C), y.reshape(P, K), dz.reshape(P, K), w.reshape(K, C)
    dx, bc, part = dx.reshape(P if need_dx else 0, C), bc.reshape(6, K), part.reshape(T, K, C)
    M = np.float64(P)
    for t in range(t0, t1):
        lo, hi = t * P // T, (t + 1) * P // T
        dyb = np.empty((R, K), dtype=x.dtype)
        tmp = np.empty((K, C), dtype=x.dtype)
        acc = part[t]
        for r0 in range(lo, hi, R):
            r1 = min(hi, r0 + R)
            band = dyb[:r1 - r0]
            _dy_rows(y, dz, r0, r1, bc, act, mode, M, kc, band)
            if need_dx:
                gemm(band, w, dx[r0:r1])
            gemm(band.T, x[r0:r1], tmp)
            for k in range(K):
                for c in range(C):
                    acc[k, c] += tmp[k, c]


def pointwise_bwd(x, y, dz, w, bc, act, mode, kc, R, T, need_dx, dx, dw):
    """Backward of y = x @ w.T (w (K, C)) after batch norm + act: for each band of R rows,
    dL/dy (``_dy_rows``, never stored), then dx[band] = dy @ w and dw += dy^T @ x[band]
    (float64 sums over bands, per task, merged in task order into dw (K, C))."""
    part = np.zeros((T,) + w.shape)
    run_tasks(_pointwise_bwd_tasks, T, (*x.shape, w.shape[0], R, T, act, mode, need_dx),
              (x, y, dz, w, kc, dx if need_dx else x[:0]), (bc, part))
    sum_parts(part, dw)


# ----------------------------------------------------------------------------- pooling and SE
# x3 (N, L, C): the L = H*W pixels of each image; one task per image; sz = (N, L, C).

@task_kernel
def _mean_pixels_tasks(n0, n1, sz, x3, out, _c, _d, _e, _f, _g, _u, _v):
    N, L, C = sz[0], sz[1], sz[2]
    x3, out = x3.reshape(N, L, C), out.reshape(N, C)
    for i in range(n0, n1):
        acc = np.zeros(C)
        for q in range(L):
            row = x3[i, q]
            for c in range(C):
                acc[c] += row[c]
        for c in range(C):
            out[i, c] = acc[c] / L


def mean_pixels(x3, out):
    """out (N, C) = the mean over pixels of each image and channel (float64 sums)."""
    run_tasks(_mean_pixels_tasks, len(x3), x3.shape, (x3, out))


@task_kernel
def _scale_pixels_tasks(n0, n1, sz, x3, g, out, _d, _e, _f, _g, _u, _v):
    N, L, C = sz[0], sz[1], sz[2]
    x3, g, out = x3.reshape(N, L, C), g.reshape(N, C), out.reshape(N, L, C)
    for i in range(n0, n1):
        gn = g[i]
        for q in range(L):
            xr, o = x3[i, q], out[i, q]
            for c in range(C):
                o[c] = xr[c] * gn[c]


def scale_pixels(x3, g, out):
    """out[n, q, c] = x3[n, q, c] * g[n, c]: SE's channel scale."""
    run_tasks(_scale_pixels_tasks, len(x3), x3.shape, (x3, g, out))


@task_kernel
def _dot_pixels_tasks(n0, n1, sz, x3, d3, out, _d, _e, _f, _g, _u, _v):
    N, L, C = sz[0], sz[1], sz[2]
    x3, d3, out = x3.reshape(N, L, C), d3.reshape(N, L, C), out.reshape(N, C)
    for i in range(n0, n1):
        acc = np.zeros(C)
        for q in range(L):
            xr, dr = x3[i, q], d3[i, q]
            for c in range(C):
                acc[c] += dr[c] * xr[c]
        for c in range(C):
            out[i, c] = acc[c]


def dot_pixels(x3, d3, out):
    """out (N, C) = sum over pixels of d3 * x3 (products in the dtype, float64 sums): SE's
    gradient with respect to its gate."""
    run_tasks(_dot_pixels_tasks, len(x3), x3.shape, (x3, d3, out))


@task_kernel
def _scale_add_pixels_tasks(n0, n1, sz, d3, g, share, out, _e, _f, _g, _u, _v):
    N, L, C = sz[0], sz[1], sz[2]
    d3, out = d3.reshape(N, L, C), out.reshape(N, L, C)
    g, share = g.reshape(N, C), share.reshape(N, C)
    for i in range(n0, n1):
        gn, sn = g[i], share[i]
        for q in range(L):
            dr, o = d3[i, q], out[i, q]
            for c in range(C):
                o[c] = dr[c] * gn[c] + sn[c]


def scale_add_pixels(d3, g, share, out):
    """out[n, q, c] = d3[n, q, c] * g[n, c] + share[n, c]: SE's dx (the scale's branch plus
    the squeeze's, whose gradient is the same on every pixel)."""
    run_tasks(_scale_add_pixels_tasks, len(d3), d3.shape, (d3, g, share, out))
