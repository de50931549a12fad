"""2-D convolution (cross-correlation, as torch defines it) and the 1x1 pointwise special case.

Legend: N batch, C in-channels, K out-channels, G groups, Cg = C/G, Kg = K/G, H W input size,
Ho Wo output size, kH kW kernel size, s stride, p zero padding, d dilation, L = Ho*Wo.

    out[n, k, i, j] = b[k] + sum_{c in group(k), u, v} w[k, c', u, v]
                                                    * xp[n, c, i*s + u*d, j*s + v*d]

with ``xp`` the input zero-padded by ``p`` on every side and ``c'`` the channel's index inside its
group. Weights use torch's layout (K, C/G, kH, kW). MobileNetV3 uses the general case for its
3x3 stride-2 stem, and 1x1 convolutions (``pointwise_*``: one matrix multiply per image) for
expansion, projection, the head and squeeze-and-excitation.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._checks import check_array, check_conv_geometry, check_positive_int, check_shape, choose_impl
from .depthwise import _tap_slice, _to_phases
from .epilogue import apply_act
from .threads import blas_single


class Conv2dCache(NamedTuple):
    x: np.ndarray          # (N, C, H, W) input; backward rebuilds the im2col matrix from it
    w: np.ndarray          # (K, C/G, kH, kW)
    has_bias: bool
    stride: int
    padding: int
    dilation: int
    groups: int


def _check_conv_args(x, w, b, stride, padding, dilation, groups):
    check_array("x", x, ndim=4)
    check_array("weight", w, ndim=4, dtype=x.dtype)
    groups = check_positive_int("groups", groups)
    N, C, H, W = x.shape
    K, Cg, kH, kW = w.shape
    if C % groups or K % groups:
        raise ValueError(f"in-channels {C} (x {x.shape}) and out-channels {K} (weight "
                         f"{w.shape}) must both be divisible by groups={groups}")
    if Cg != C // groups:
        raise ValueError(f"channel mismatch: x {x.shape} has {C} channels, so weight must have "
                         f"{C // groups} input channels per group (groups={groups}), but weight "
                         f"has shape {w.shape}")
    if b is not None:
        check_array("bias", b, ndim=1, dtype=x.dtype)
        check_shape("bias", b, (K,), f"one per output channel of weight {w.shape}")
    Ho, Wo = check_conv_geometry(x, kH, kW, stride, padding, dilation)
    return Ho, Wo


# ----------------------------------------------------------------------------- naive

def conv2d_forward_naive(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Convolution by the definition: loops over n, k, i, j and a sum over (c, u, v).

    Returns ``(out (N, K, Ho, Wo), Conv2dCache)``. Slow: meant for reading and tiny inputs.
    """
    Ho, Wo = _check_conv_args(x, w, b, stride, padding, dilation, groups)
    N, C, H, W = x.shape
    K, Cg, kH, kW = w.shape
    Kg = K // groups
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))  # (N, C, H+2p, W+2p)
    out = np.zeros((N, K, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for k in range(K):
            g = k // Kg                                    # the group this filter belongs to
            for i in range(Ho):
                for j in range(Wo):
                    rows = slice(i * stride, i * stride + dilation * (kH - 1) + 1, dilation)
                    cols = slice(j * stride, j * stride + dilation * (kW - 1) + 1, dilation)
                    patch = xp[n, g * Cg:(g + 1) * Cg, rows, cols]   # (Cg, kH, kW)
                    out[n, k, i, j] = np.sum(patch * w[k])
            if b is not None:
                out[n, k] += b[k]
    return out, Conv2dCache(x, w, b is not None, stride, padding, dilation, groups)


def conv2d_backward_naive(dout, cache: Conv2dCache, need_dx: bool = True):
    """Gradients by scattering each output's gradient back over its receptive field.

    dx[n, c, i*s+u*d-p, j*s+v*d-p] += w[k, c', u, v] * dout[n, k, i, j]
    dw[k, c', u, v] += xp[n, c, i*s+u*d, j*s+v*d] * dout[n, k, i, j];  db[k] = sum dout[:, k]
    Returns ``(dx, dw, db)``; ``db`` is None when the forward had no bias, ``dx`` is None when
    ``need_dx`` is false (the network's input needs no gradient in training).
    """
    x, w, has_bias, s, p, d, groups = cache
    N, C, H, W = x.shape
    K, Cg, kH, kW = w.shape
    Kg = K // groups
    _check_dout(dout, cache)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    Ho, Wo = dout.shape[2:]
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for i in range(Ho):
                for j in range(Wo):
                    rows = slice(i * s, i * s + d * (kH - 1) + 1, d)
                    cols = slice(j * s, j * s + d * (kW - 1) + 1, d)
                    dxp[n, g * Cg:(g + 1) * Cg, rows, cols] += w[k] * dout[n, k, i, j]
                    dw[k] += xp[n, g * Cg:(g + 1) * Cg, rows, cols] * dout[n, k, i, j]
    dx = dxp[:, :, p:p + H, p:p + W].copy() if need_dx else None
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db


def _check_dout(dout, cache):
    x, w, _, s, p, d, _ = cache
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    Ho, Wo = check_conv_geometry(x, w.shape[2], w.shape[3], s, p, d)
    check_shape("dout", dout, (x.shape[0], w.shape[0], Ho, Wo), "the forward output's shape")


# ----------------------------------------------------------------------------- fast (im2col + BLAS)

def _windows(xp, kH, kW, Ho, Wo, s, d):
    """Read-only strided view (N, C, kH, kW, Ho, Wo) of every receptive field: no copy."""
    sN, sC, sH, sW = xp.strides
    N, C = xp.shape[:2]
    return np.lib.stride_tricks.as_strided(
        xp, (N, C, kH, kW, Ho, Wo), (sN, sC, sH * d, sW * d, sH * s, sW * s), writeable=False)


def _im2col(x, kH, kW, Ho, Wo, s, p, d, groups):
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x       # (N, C, H+2p, W+2p)
    N, C = x.shape[:2]
    cols = _windows(xp, kH, kW, Ho, Wo, s, d)                           # (N, C, kH, kW, Ho, Wo)
    return cols.reshape(N, groups, (C // groups) * kH * kW, Ho * Wo)    # (N, G, Cg*kH*kW, L) copy


DIRECT_MAX_TAPS = 32    # C*kH*kW up to this (the 3x3 stem: 27) -> direct loop, not im2col


def _direct_conv_loops(x, w, b, s, p, d, kgroups, kfirst, act, z, three, six, out):
    """Dense conv for few input channels in the polyphase layout of ``depthwise.py``: per image,
    each input plane is split into stride phases once; each output plane then accumulates
    C*kH*kW contiguous tap slices. ``out`` is (N, K, Ho, Wo), or (K, N, Ho, Wo) if ``kfirst``;
    ``act`` fuses 0 none / 1 ReLU / 2 hard-swish. Tasks: (image, group of output channels)."""
    N, C, H, W = x.shape
    K, _, kH, kW = w.shape
    Ho, Wo = out.shape[2], out.shape[3]
    Hh, Wh = (H + 2 * p + s - 1) // s, (W + 2 * p + s - 1) // s
    L = (Ho - 1) * Wh + Wo
    for task in prange(N * kgroups):
        n, g = task // kgroups, task % kgroups
        ph = np.zeros((C, s * s, Hh * Wh), dtype=x.dtype)
        acc = np.empty(L, dtype=x.dtype)
        for c in range(C):
            _to_phases(x[n, c], s, p, Hh, Wh, ph[c])
        for k in range(g * K // kgroups, (g + 1) * K // kgroups):
            acc[:] = b[k]
            for c in range(C):
                for u in range(kH):
                    for v in range(kW):
                        wv = w[k, c, u, v]
                        src = _tap_slice(ph[c], s, d, Wh, L, u, v)
                        for t in range(L):
                            acc[t] += wv * src[t]
            o = out[k, n] if kfirst else out[n, k]
            for i in range(Ho):
                for j in range(Wo):
                    o[i, j] = apply_act(acc[i * Wh + j], act, z, three, six)


_direct_conv = njit(cache=True, parallel=True)(_direct_conv_loops)


def direct_conv_forward(x, w, b, *, stride, padding, dilation, act=0, kfirst=False):
    """Run ``_direct_conv`` (groups = 1, few input channels); returns the output array."""
    N, C, H, W = x.shape
    K, _, kH, kW = w.shape
    Ho = (H + 2 * padding - dilation * (kH - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kW - 1) - 1) // stride + 1
    out = np.empty((K, N, Ho, Wo) if kfirst else (N, K, Ho, Wo), dtype=x.dtype)
    bias = b if b is not None else np.zeros(K, dtype=x.dtype)
    kgroups = max(1, min(K, (4 * numba.get_num_threads() + N - 1) // N))
    t = x.dtype.type
    _direct_conv(np.ascontiguousarray(x), np.ascontiguousarray(w), bias, stride, padding,
                 dilation, kgroups, kfirst, act, t(0), t(3), t(6), out)
    return out


@blas_single
def conv2d_forward_fast(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Convolution as one matrix multiply per image and group: out = W @ im2col(x) + b
    (few input channels, like the 3-channel stem: the direct polyphase loop instead).

    Returns ``(out (N, K, Ho, Wo), Conv2dCache)``, the same as ``conv2d_forward_naive``.
    """
    Ho, Wo = _check_conv_args(x, w, b, stride, padding, dilation, groups)
    N = x.shape[0]
    K, Cg, kH, kW = w.shape
    if kH == kW == 1 and stride == 1 and padding == 0 and groups == 1:
        out, _ = pointwise_forward_fast(x, w, b)
        return out, Conv2dCache(x, w, b is not None, stride, padding, dilation, groups)
    if groups == 1 and Cg * kH * kW <= DIRECT_MAX_TAPS:                   # e.g. the stem
        out = direct_conv_forward(x, w, b, stride=stride, padding=padding, dilation=dilation)
        return out, Conv2dCache(x, w, b is not None, stride, padding, dilation, groups)
    cols = _im2col(x, kH, kW, Ho, Wo, stride, padding, dilation, groups)  # (N, G, Cg*kH*kW, L)
    wm = w.reshape(groups, K // groups, Cg * kH * kW)                     # (G, Kg, Cg*kH*kW)
    out = np.matmul(wm, cols).reshape(N, K, Ho, Wo)                       # (N, K, Ho, Wo)
    if b is not None:
        out += b[:, None, None]
    return out, Conv2dCache(x, w, b is not None, stride, padding, dilation, groups)


@blas_single
def conv2d_backward_fast(dout, cache: Conv2dCache, need_dx: bool = True):
    """dW = sum_n dout_n @ cols_n^T,  dcols = W^T @ dout, dx = col2im(dcols),  db = sum dout.

    Returns ``(dx, dw, db)`` like ``conv2d_backward_naive`` (``dx`` None unless ``need_dx``).
    """
    x, w, has_bias, s, p, d, groups = cache
    _check_dout(dout, cache)
    N, C, H, W = x.shape
    K, Cg, kH, kW = w.shape
    if kH == kW == 1 and s == 1 and p == 0 and groups == 1:
        dx, dw, db = pointwise_backward_fast(dout, PointwiseCache(x, w, has_bias))
        return (dx if need_dx else None), dw, db
    Ho, Wo = dout.shape[2:]
    G, Kg = groups, K // groups
    cols = _im2col(x, kH, kW, Ho, Wo, s, p, d, G)                  # (N, G, Cg*kH*kW, L)
    dy = dout.reshape(N, G, Kg, Ho * Wo)                           # (N, G, Kg, L)
    dw = np.zeros((G, Kg, Cg * kH * kW), dtype=x.dtype)
    for n in range(N):                                             # one GEMM per image
        dw += np.matmul(dy[n], cols[n].transpose(0, 2, 1))         # (G, Kg, Cg*kH*kW)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    if not need_dx:
        return None, dw.reshape(w.shape), db
    wm = w.reshape(G, Kg, Cg * kH * kW)
    dcols = np.matmul(wm.transpose(0, 2, 1), dy)                   # (N, G, Cg*kH*kW, L)
    dcols = dcols.reshape(N, C, kH, kW, Ho, Wo)
    dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    for u in range(kH):                                            # col2im: kH*kW strided adds
        for v in range(kW):
            dxp[:, :, u * d:u * d + s * (Ho - 1) + 1:s,
                v * d:v * d + s * (Wo - 1) + 1:s] += dcols[:, :, u, v]
    dx = np.ascontiguousarray(dxp[:, :, p:p + H, p:p + W])
    return dx, dw.reshape(w.shape), db


# ----------------------------------------------------------------------------- pointwise (1x1)

class PointwiseCache(NamedTuple):
    x: np.ndarray          # (N, C, H, W) input, kept for dw
    w: np.ndarray          # (K, C, 1, 1)
    has_bias: bool


def _check_pointwise(x, w, b):
    check_array("x", x, ndim=4)
    check_array("weight", w, ndim=(2, 4), dtype=x.dtype)
    if w.ndim == 4 and w.shape[2:] != (1, 1):
        raise ValueError(f"pointwise weight must be (K, C, 1, 1), got {w.shape}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: x {x.shape} has {x.shape[1]} channels but weight "
                         f"{w.shape} expects {w.shape[1]}")
    if b is not None:
        check_array("bias", b, ndim=1, dtype=x.dtype)
        check_shape("bias", b, (w.shape[0],), f"one per output channel of weight {w.shape}")


def pointwise_forward_naive(x, w, b=None):
    """1x1 convolution: out[n, k, i, j] = b[k] + sum_c w[k, c] x[n, c, i, j] (loops over n, k)."""
    _check_pointwise(x, w, b)
    N, C, H, W = x.shape
    K = w.shape[0]
    w2 = w.reshape(K, C)
    out = np.zeros((N, K, H, W), dtype=x.dtype)
    for n in range(N):
        for k in range(K):
            out[n, k] = np.tensordot(w2[k], x[n], axes=(0, 0))    # sum over c -> (H, W)
            if b is not None:
                out[n, k] += b[k]
    return out, PointwiseCache(x, w, b is not None)


def pointwise_backward_naive(dout, cache: PointwiseCache):
    """dx[n, c] = sum_k w[k, c] dout[n, k];  dw[k, c] = sum_{n,i,j} dout[n, k] x[n, c];  db = sum"""
    x, w, has_bias = cache
    N, C, H, W = x.shape
    K = w.shape[0]
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, (N, K, H, W), "the forward output's shape")
    w2 = w.reshape(K, C)
    dx = np.zeros_like(x)
    dw = np.zeros((K, C), dtype=x.dtype)
    for n in range(N):
        for k in range(K):
            dx[n] += w2[k][:, None, None] * dout[n, k]           # (C, H, W)
            dw[k] += np.tensordot(x[n], dout[n, k], axes=([1, 2], [0, 1]))   # (C,)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw.reshape(w.shape), db


@blas_single
def pointwise_forward_fast(x, w, b=None):
    """1x1 convolution as one GEMM per image: out_n (K, H*W) = W (K, C) @ x_n (C, H*W) + b."""
    _check_pointwise(x, w, b)
    N, C, H, W = x.shape
    K = w.shape[0]
    x3 = x.reshape(N, C, H * W)                                     # (N, C, HW) view
    out = np.matmul(w.reshape(K, C), x3)                            # (N, K, HW)
    if b is not None:
        out += b[:, None]
    return out.reshape(N, K, H, W), PointwiseCache(x, w, b is not None)


@blas_single
def pointwise_backward_fast(dout, cache: PointwiseCache):
    """dx_n = W^T @ dout_n;  dW = sum_n dout_n @ x_n^T;  db = sum over n, i, j of dout."""
    x, w, has_bias = cache
    N, C, H, W = x.shape
    K = w.shape[0]
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, (N, K, H, W), "the forward output's shape")
    w2 = w.reshape(K, C)
    dy = dout.reshape(N, K, H * W)                                  # (N, K, HW)
    x3 = x.reshape(N, C, H * W)                                     # (N, C, HW)
    dx = np.matmul(w2.T, dy).reshape(N, C, H, W)                    # (N, C, H, W)
    dw = np.zeros((K, C), dtype=x.dtype)
    for n in range(N):                                              # one GEMM per image
        dw += dy[n] @ x3[n].T                                       # (K, C)
    db = dy.sum(axis=(0, 2)) if has_bias else None
    return dx, dw.reshape(w.shape), db


# ----------------------------------------------------------------------------- public API

def conv2d_forward(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, impl="fast"):
    """2-D convolution ``out = conv(x, w) + b`` with torch's argument meanings.

    x (N, C, H, W), w (K, C/groups, kH, kW), b (K,) or None ->
    ``(out (N, K, Ho, Wo), cache)`` with Ho = floor((H + 2p - d(kH-1) - 1)/s) + 1.
    ``impl="naive"`` runs the loop version that reads like the definition.
    """
    f = choose_impl(impl, conv2d_forward_fast, conv2d_forward_naive)
    return f(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv2d_backward(dout, cache, *, impl="fast", need_dx=True):
    """Gradients of ``conv2d_forward``: returns ``(dx, dw, db)`` (db None without bias; dx None
    when ``need_dx`` is false, which skips its computation)."""
    return choose_impl(impl, conv2d_backward_fast, conv2d_backward_naive)(dout, cache, need_dx)


def pointwise_forward(x, w, b=None, *, impl="fast"):
    """1x1 convolution (stride 1, no padding): x (N, C, H, W), w (K, C, 1, 1) -> (N, K, H, W)."""
    return choose_impl(impl, pointwise_forward_fast, pointwise_forward_naive)(x, w, b)


def pointwise_backward(dout, cache, *, impl="fast"):
    """Gradients of ``pointwise_forward``: returns ``(dx, dw, db)`` (db None without bias)."""
    return choose_impl(impl, pointwise_backward_fast, pointwise_backward_naive)(dout, cache)

