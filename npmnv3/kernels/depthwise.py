"""Depthwise convolution: one kH x kW filter per channel (torch ``groups = C``).

Legend: N batch, C channels, H W input size, Ho Wo output size, kH kW kernel size, s stride,
p zero padding, d dilation.

    out[n, c, i, j] = b[c] + sum_{u, v} w[c, 0, u, v] * xp[n, c, i*s + u*d, j*s + v*d]

``xp`` is the input zero-padded by ``p``. MobileNetV3 (arXiv:1905.02244 Tables 1-2) uses kernels
3 and 5, stride 1 and 2, and dilation 2 in the last stage of the ``dilated`` variant.

Backward:  dx[n, c, i*s+u*d-p, j*s+v*d-p] += w[c, u, v] dout[n, c, i, j]
           dw[c, u, v] = sum_{n, i, j} dout[n, c, i, j] xp[n, c, i*s+u*d, j*s+v*d]
           db[c] = sum_{n, i, j} dout[n, c, i, j]

The naive version is the formula as kH*kW shifted multiply-adds over whole arrays. The fast
version runs on channels-last memory (``channels_last.py``): every kernel tap is a multiply-add
over a row of pixels, vectorised over channels; backward computes dx, dw and db in a single pass
over dout. ``_dw_fwd`` (below) is the eval engine's plane-by-plane forward (``nn/folded.py``):
(n, c) planes in a flattened polyphase layout where every tap is one contiguous multiply-add.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._checks import check_array, check_conv_geometry, check_shape, choose_impl
from .channels_last import (
    kernel_consts,
    nchw_view,
    num_tasks,
    plain_coefs,
    to_nhwc,
)
from .channels_last_conv import depthwise_bwd, depthwise_fwd, flat_taps
from .epilogue import apply_act


class DepthwiseCache(NamedTuple):
    x: np.ndarray          # (N, C, H, W) input, kept for dw
    w: np.ndarray          # (C, 1, kH, kW)
    has_bias: bool
    stride: int
    padding: int
    dilation: int


def _check_args(x, w, b, stride, padding, dilation):
    check_array("x", x, ndim=4)
    check_array("weight", w, ndim=4, dtype=x.dtype)
    C = x.shape[1]
    if w.shape[0] != C or w.shape[1] != 1:
        raise ValueError(f"channel mismatch: depthwise weight must be (C, 1, kH, kW) with C = "
                         f"{C} from x {x.shape}, got weight {w.shape}")
    if b is not None:
        check_array("bias", b, ndim=1, dtype=x.dtype)
        check_shape("bias", b, (C,), f"one per channel of x {x.shape}")
    return check_conv_geometry(x, w.shape[2], w.shape[3], stride, padding, dilation)


def _check_dout(dout, cache):
    x, w, _, s, p, d = cache
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    Ho, Wo = check_conv_geometry(x, w.shape[2], w.shape[3], s, p, d)
    check_shape("dout", dout, (x.shape[0], x.shape[1], Ho, Wo), "the forward output's shape")


# ----------------------------------------------------------------------------- naive

def _tap(xp, u, v, Ho, Wo, s, d):
    """The input pixels that kernel tap (u, v) meets, for every output: (N, C, Ho, Wo) view."""
    return xp[:, :, u * d:u * d + s * (Ho - 1) + 1:s, v * d:v * d + s * (Wo - 1) + 1:s]


def depthwise_forward_naive(x, w, b=None, *, stride=1, padding=0, dilation=1):
    """out = sum over taps (u, v) of w[:, u, v] * (input shifted by the tap); plus b."""
    Ho, Wo = _check_args(x, w, b, stride, padding, dilation)
    kH, kW = w.shape[2:]
    p = padding
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))              # (N, C, H+2p, W+2p)
    out = np.zeros((x.shape[0], x.shape[1], Ho, Wo), dtype=x.dtype)
    for u in range(kH):
        for v in range(kW):
            out += w[None, :, 0, u, v, None, None] * _tap(xp, u, v, Ho, Wo, stride, dilation)
    if b is not None:
        out += b[:, None, None]
    return out, DepthwiseCache(x, w, b is not None, stride, padding, dilation)


def depthwise_backward_naive(dout, cache: DepthwiseCache):
    """Returns ``(dx, dw, db)``: every tap scatters ``w * dout`` back and gathers ``x * dout``."""
    _check_dout(dout, cache)
    x, w, has_bias, s, p, d = cache
    N, C, H, W = x.shape
    kH, kW = w.shape[2:]
    Ho, Wo = dout.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for u in range(kH):
        for v in range(kW):
            _tap(dxp, u, v, Ho, Wo, s, d)[...] += w[None, :, 0, u, v, None, None] * dout
            dw[:, 0, u, v] = np.sum(_tap(xp, u, v, Ho, Wo, s, d) * dout, axis=(0, 2, 3))
    dx = dxp[:, :, p:p + H, p:p + W].copy()
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------- fast (Numba)

def _chunks(total, per_thread=8):
    """Split ``total`` planes into a few contiguous chunks so scratch buffers are allocated once
    per chunk, not once per plane (an allocation costs as much as a 7x7 plane's arithmetic)."""
    return max(1, min(total, per_thread * numba.get_num_threads()))


# The fast kernels work on one (n, c) plane at a time in a "wide" flattened layout:
#
# * The plane is zero-padded and split into s*s stride phases ("polyphase"): phase (a, b) holds
#   the padded pixels (r, q) with r % s == a, q % s == b, as an (Hh, Wh) array stored flat. For
#   s = 1 there is one phase: the padded plane itself.
# * The output is computed as a flat vector of length L = (Ho-1)*Wh + Wo with row stride Wh:
#   output (i, j) sits at i*Wh + j; the Wh - Wo slots after each row are scratch.
# * Kernel tap (u, v) then reads one *contiguous* slice of one phase:
#       acc[0:L] += w[u, v] * phase[(u*d) % s, (v*d) % s][off : off + L],
#       off = (u*d // s) * Wh + (v*d // s)
#   so every tap is a single long vectorisable loop, whatever the stride and plane size.

def _to_phases(plane, s, p, Hh, Wh, ph):
    """Scatter an (H, W) plane into ph (s*s, Hh*Wh): padded pixel (r, q) -> phase (r%s, q%s).

    Row by row: the columns j with (j + p) % s == b form the strided slice plane[i, j0::s],
    which lands contiguously in phase b's row. The zero border is never written.
    """
    H, W = plane.shape
    for i in range(H):
        r = i + p
        row, base = (r % s) * s, (r // s) * Wh
        for b in range(s):
            j0 = (b - p) % s                        # first column with (j0 + p) % s == b
            if j0 < W:
                start = base + (j0 + p) // s
                ph[row + b, start:start + (W - j0 + s - 1) // s] = plane[i, j0::s]


def _tap_slice(ph, s, d, Wh, L, u, v):
    """The L contiguous phase values that kernel tap (u, v) multiplies (see above)."""
    off = (u * d // s) * Wh + (v * d // s)
    return ph[((u * d) % s) * s + (v * d) % s][off:off + L]


def _dw_fwd_loops(x, w, b, s, p, d, cdiv, nchunks, act, z, three, six, pool, out):
    """x (P, H, W) planes -> out (P, Ho, Wo); plane q uses channel (q // cdiv) % C, so the same
    loop serves NCHW (cdiv = 1) and the fused path's channel-major CNHW (cdiv = N). ``act``
    fuses 0 none / 1 ReLU / 2 hard-swish; if ``pool`` has P entries it receives each output
    plane's mean (the SE squeeze, for free)."""
    P, H, W = x.shape
    C, kH, kW = w.shape
    Ho, Wo = out.shape[1], out.shape[2]
    Hh, Wh = (H + 2 * p + s - 1) // s, (W + 2 * p + s - 1) // s
    L = (Ho - 1) * Wh + Wo
    for chunk in prange(nchunks):
        ph = np.zeros((s * s, Hh * Wh), dtype=x.dtype)        # zero border is never written
        acc = np.empty(L, dtype=x.dtype)
        for q in range(chunk * P // nchunks, (chunk + 1) * P // nchunks):
            c = (q // cdiv) % C
            _to_phases(x[q], s, p, Hh, Wh, ph)
            acc[:] = b[c]
            for u in range(kH):
                v = 0
                while v + 2 < kW:                # three taps of a kernel row per pass over acc
                    w0, w1, w2 = w[c, u, v], w[c, u, v + 1], w[c, u, v + 2]
                    s0 = _tap_slice(ph, s, d, Wh, L, u, v)
                    s1 = _tap_slice(ph, s, d, Wh, L, u, v + 1)
                    s2 = _tap_slice(ph, s, d, Wh, L, u, v + 2)
                    for t in range(L):
                        acc[t] += w0 * s0[t] + w1 * s1[t] + w2 * s2[t]
                    v += 3
                while v < kW:
                    wv = w[c, u, v]
                    src = _tap_slice(ph, s, d, Wh, L, u, v)
                    for t in range(L):
                        acc[t] += wv * src[t]
                    v += 1
            total = 0.0
            for i in range(Ho):
                if act == 0:
                    out[q, i, :] = acc[i * Wh:i * Wh + Wo]
                else:                                   # fused activation (eval fast path)
                    for j in range(Wo):
                        out[q, i, j] = apply_act(acc[i * Wh + j], act, z, three, six)
                if pool.size:
                    rsum = z
                    for j in range(Wo):
                        rsum += out[q, i, j]
                    total += rsum
            if pool.size:
                pool[q] = total / (Ho * Wo)


_to_phases = njit(cache=True)(_to_phases)
_tap_slice = njit(cache=True, inline="always")(_tap_slice)
_dw_fwd = njit(cache=True, parallel=True)(_dw_fwd_loops)


def depthwise_forward_fast(x, w, b=None, *, stride=1, padding=0, dilation=1):
    """Same contract as ``depthwise_forward_naive``, on channels-last memory
    (``channels_last_conv.depthwise_fwd``: every tap a multiply-add vectorised over channels; tasks
    are images and bands of rows); the output is channels-last too."""
    Ho, Wo = _check_args(x, w, b, stride, padding, dilation)
    xl = to_nhwc(x)                                                 # (N, H, W, C)
    N, C, k = xl.shape[0], xl.shape[3], w.shape[2]
    out = np.empty((N, Ho, Wo, C), dtype=x.dtype)
    rb = -(-N * Ho // num_tasks(N * Ho))                            # rows per task
    geom = (k, stride, padding, dilation)
    depthwise_fwd(xl, _taps(w), b if b is not None else np.zeros(C, x.dtype), geom,
                  flat_taps(geom, C), min(rb, Ho), False, out,
                  np.zeros((2, C)))
    return nchw_view(out), DepthwiseCache(nchw_view(xl), w, b is not None, stride, padding,
                                          dilation)


def _taps(w):
    """(C, 1, k, k) weights -> (k*k, C): one row of channel weights per tap."""
    C, k = w.shape[0], w.shape[2]
    return np.ascontiguousarray(w.reshape(C, k * k).T)


def depthwise_backward_fast(dout, cache: DepthwiseCache):
    """Same contract as ``depthwise_backward_naive``; one pass per image computes dx, dw and db
    (``channels_last_conv.depthwise_bwd``, vectorised over channels)."""
    _check_dout(dout, cache)
    x, w, has_bias, s, p, d = cache
    xl, dl = to_nhwc(x), to_nhwc(dout)
    C, k = xl.shape[3], w.shape[2]
    dx = np.empty_like(xl)
    dw = np.empty((k * k, C), dtype=x.dtype)
    db = np.empty(C, dtype=x.dtype)
    geom = (k, s, p, d)
    depthwise_bwd(xl, dl, dl, _taps(w), plain_coefs(C), 0, 0, kernel_consts(x.dtype), geom,
                  flat_taps(geom, C), dx, dw, db)
    return nchw_view(dx), np.ascontiguousarray(dw.T).reshape(w.shape), (db if has_bias else
                                                                         None)


# ----------------------------------------------------------------------------- public API

def depthwise_forward(x, w, b=None, *, stride=1, padding=0, dilation=1, impl="fast"):
    """Depthwise conv, x (N, C, H, W), w (C, 1, kH, kW), b (C,) or None -> (out, cache).

    Equal to ``conv2d_forward(x, w, b, groups=C)`` (and to torch's ``F.conv2d(groups=C)``).
    """
    f = choose_impl(impl, depthwise_forward_fast, depthwise_forward_naive)
    return f(x, w, b, stride=stride, padding=padding, dilation=dilation)


def depthwise_backward(dout, cache, *, impl="fast"):
    """Gradients of ``depthwise_forward``: returns ``(dx, dw, db)`` (db None without bias)."""
    return choose_impl(impl, depthwise_backward_fast, depthwise_backward_naive)(dout, cache)
