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
version is a Numba loop over (n, c) planes in a flattened polyphase layout (explained above
``_dw_fwd_loops``) where every kernel tap is one contiguous multiply-add; backward computes dx,
dw and db in a single pass over dout.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._checks import check_array, check_conv_geometry, check_shape, choose_impl
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
# Backward runs the same slices in reverse: dphase[off:off+L] += w[u, v] * dout_wide and
# dw[u, v] += dot(dout_wide, phase[off:off+L]) (scratch slots of dout_wide are zero).

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


def _from_phases(ph, s, p, Wh, plane):
    """Gather the (H, W) interior of the padded plane back out of its phases."""
    H, W = plane.shape
    for i in range(H):
        r = i + p
        row, base = (r % s) * s, (r // s) * Wh
        for b in range(s):
            j0 = (b - p) % s
            if j0 < W:
                start = base + (j0 + p) // s
                plane[i, j0::s] = ph[row + b, start:start + (W - j0 + s - 1) // s]


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


def _dw_bwd_loops(x, w, dout, s, p, d, nchunks, dx, dw, db):
    N, C, H, W = x.shape
    kH, kW = w.shape[1], w.shape[2]
    Ho, Wo = dout.shape[2], dout.shape[3]
    Hh, Wh = (H + 2 * p + s - 1) // s, (W + 2 * p + s - 1) // s
    L = (Ho - 1) * Wh + Wo
    for chunk in prange(nchunks):                 # chunks of channels: no write conflicts
        ph = np.zeros((s * s, Hh * Wh), dtype=x.dtype)
        dph = np.empty((s * s, Hh * Wh), dtype=x.dtype)
        g = np.zeros(L, dtype=x.dtype)            # dout in the wide layout; scratch slots stay 0
        for c in range(chunk * C // nchunks, (chunk + 1) * C // nchunks):
            acc = np.zeros((kH, kW))              # float64 accumulators for dw[c]
            bacc = 0.0
            for n in range(N):
                _to_phases(x[n, c], s, p, Hh, Wh, ph)
                for i in range(Ho):
                    g[i * Wh:i * Wh + Wo] = dout[n, c, i]
                bacc += np.sum(dout[n, c])
                dph[:, :] = 0
                for u in range(kH):
                    for v in range(kW):
                        wv = w[c, u, v]
                        off = (u * d // s) * Wh + (v * d // s)
                        k = ((u * d) % s) * s + (v * d) % s
                        dst = dph[k][off:off + L]
                        src = ph[k][off:off + L]
                        part = g[0] * 0                   # dw partial sum, input dtype
                        for t in range(L):
                            dst[t] += wv * g[t]
                            part += g[t] * src[t]
                        acc[u, v] += part
                _from_phases(dph, s, p, Wh, dx[n, c])
            for u in range(kH):
                for v in range(kW):
                    dw[c, u, v] = acc[u, v]
            db[c] = bacc


_to_phases = njit(cache=True)(_to_phases)
_from_phases = njit(cache=True)(_from_phases)
_tap_slice = njit(cache=True, inline="always")(_tap_slice)
_dw_fwd = njit(cache=True, parallel=True)(_dw_fwd_loops)
# fastmath "reassoc" only lets LLVM vectorise the dw partial sum (a reduction, summed in a
# different order); every other operation in the kernel has nothing to reassociate, and no
# contraction into FMA is allowed, so dx keeps exactly the rounding of the plain loop.
_dw_bwd = njit(cache=True, parallel=True, fastmath={"reassoc"})(_dw_bwd_loops)


def depthwise_forward_fast(x, w, b=None, *, stride=1, padding=0, dilation=1, act=0):
    """Same contract as ``depthwise_forward_naive``; Numba tasks over chunks of (n, c) planes.

    ``act`` (1 ReLU, 2 hard-swish) fuses an activation into the output pass (the cache then
    describes the convolution before the activation).
    """
    Ho, Wo = _check_args(x, w, b, stride, padding, dilation)
    N, C = x.shape[:2]
    xc = np.ascontiguousarray(x)
    w3 = np.ascontiguousarray(w[:, 0])                              # (C, kH, kW)
    bias = b if b is not None else np.zeros(C, dtype=x.dtype)
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    t = x.dtype.type
    _dw_fwd(xc.reshape(N * C, *xc.shape[2:]), w3, bias, stride, padding, dilation, 1,
            _chunks(N * C), act, t(0), t(3), t(6), np.empty(0, x.dtype),
            out.reshape(N * C, Ho, Wo))
    return out, DepthwiseCache(x, w, b is not None, stride, padding, dilation)


def depthwise_backward_fast(dout, cache: DepthwiseCache):
    """Same contract as ``depthwise_backward_naive``; one pass computes dx, dw and db."""
    _check_dout(dout, cache)
    x, w, has_bias, s, p, d = cache
    C = x.shape[1]
    xc = np.ascontiguousarray(x)
    w3 = np.ascontiguousarray(w[:, 0])
    dx = np.empty_like(xc)
    dw3 = np.empty_like(w3)
    db = np.empty(C, dtype=x.dtype)
    _dw_bwd(xc, w3, np.ascontiguousarray(dout), s, p, d, _chunks(C), dx, dw3, db)
    return dx, dw3.reshape(w.shape), (db if has_bias else None)


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
