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
version is a Numba loop that never pads (it clips each row to the valid range instead) and
computes dx, dw and db in a single pass over dout.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_conv_geometry, check_shape, choose_impl


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

def _valid_cols_py(v, s, p, d, W, Wo):
    """Output columns j whose input column j*s + v*d - p lies inside [0, W): range(lo, hi)."""
    a = p - v * d
    lo = max(0, -((-a) // s))                  # ceil(a / s)
    hi = min(Wo, (W - 1 + a) // s + 1)
    return lo, hi


_valid_cols = njit(cache=True)(_valid_cols_py)


def _dw_fwd_loops(x, w, b, s, p, d, out):
    N, C, H, W = x.shape
    kH, kW = w.shape[1], w.shape[2]
    Ho, Wo = out.shape[2], out.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        o = out[n, c]
        o[:, :] = b[c]
        for i in range(Ho):
            for u in range(kH):
                ii = i * s + u * d - p
                if ii < 0 or ii >= H:
                    continue
                xrow = x[n, c, ii]
                for v in range(kW):
                    wv = w[c, u, v]
                    lo, hi = _valid_cols(v, s, p, d, W, Wo)
                    off = v * d - p
                    for j in range(lo, hi):
                        o[i, j] += wv * xrow[j * s + off]


def _dw_bwd_loops(x, w, dout, s, p, d, dx, dw, db):
    N, C, H, W = x.shape
    kH, kW = w.shape[1], w.shape[2]
    Ho, Wo = dout.shape[2], dout.shape[3]
    for c in prange(C):                        # one channel per task: no write conflicts
        acc = np.zeros((kH, kW))               # float64 accumulators for dw[c]
        bacc = 0.0
        for n in range(N):
            g = dout[n, c]
            dxc = dx[n, c]
            dxc[:, :] = 0
            for i in range(Ho):
                grow = g[i]
                rsum = grow[0] * 0
                for j in range(Wo):
                    rsum += grow[j]
                bacc += rsum
                for u in range(kH):
                    ii = i * s + u * d - p
                    if ii < 0 or ii >= H:
                        continue
                    xrow = x[n, c, ii]
                    dxrow = dxc[ii]
                    for v in range(kW):
                        wv = w[c, u, v]
                        lo, hi = _valid_cols(v, s, p, d, W, Wo)
                        off = v * d - p
                        part = grow[0] * 0             # row partial sum in the input dtype
                        for j in range(lo, hi):
                            dxrow[j * s + off] += wv * grow[j]
                            part += grow[j] * xrow[j * s + off]
                        acc[u, v] += part
        for u in range(kH):
            for v in range(kW):
                dw[c, u, v] = acc[u, v]
        db[c] = bacc


_dw_fwd = njit(cache=True, parallel=True)(_dw_fwd_loops)
_dw_bwd = njit(cache=True, parallel=True)(_dw_bwd_loops)


def depthwise_forward_fast(x, w, b=None, *, stride=1, padding=0, dilation=1):
    """Same contract as ``depthwise_forward_naive``; one Numba task per (n, c) plane."""
    Ho, Wo = _check_args(x, w, b, stride, padding, dilation)
    N, C = x.shape[:2]
    xc = np.ascontiguousarray(x)
    w3 = np.ascontiguousarray(w[:, 0])                              # (C, kH, kW)
    bias = b if b is not None else np.zeros(C, dtype=x.dtype)
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    _dw_fwd(xc, w3, bias, stride, padding, dilation, out)
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
    _dw_bwd(xc, w3, np.ascontiguousarray(dout), s, p, d, dx, dw3, db)
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
