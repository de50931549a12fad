"""Bilinear interpolation (torch ``F.interpolate(x, mode="bilinear")``), forward and backward.

Legend: N batch, C channels, H W input size, Ho Wo output size.

Each output row i has a source coordinate s(i), two source rows h0 <= h1 and weights
(l0, l1) = (1 - f, f) with f = s - h0 (likewise columns j -> w0, w1, m0, m1):

    out[n, c, i, j] = l0[i] (m0[j] x[n, c, h0, w0] + m1[j] x[n, c, h0, w1])
                    + l1[i] (m0[j] x[n, c, h1, w0] + m1[j] x[n, c, h1, w1])
    dx[n, c, h, w] = sum over (i, j) reading (h, w) of  (its row weight * column weight) dout

Source coordinate (aten ``UpSample.h``: ``area_pixel_compute_scale``,
``area_pixel_compute_source_index``, ``compute_source_index_and_lambda``):
    align_corners=False:  s = max(r (i + 1/2) - 1/2, 0),  r = 1 / scale_factor if a scale
                          factor reaches the kernel, else r = in / out      (pixel centres)
    align_corners=True:   s = r i,  r = (in - 1) / (out - 1)  (0 when out == 1; without
                          align_corners out == 1 reads the centre, s = in/2 - 1/2)
    h0 = min(floor(s), in - 1),  h1 = h0 + 1 (h0 at the last row),  f = clamp(s - h0, 0, 1).
    in == out copies the input (torch's special case, whatever the scale factor).
r and s are rounded to the input's dtype as torch does (float32 for float32 tensors), so the
two source pixels of every output pixel are torch's. Output size: ``size``, or
floor(in * scale_factor); ``recompute_scale_factor=True`` then derives r from the sizes.
Segmentation uses it to bring the head's logits back to the input size
(torchvision ``segmentation/_utils.py`` ``_SimpleSegmentationModel.forward``, ``lraspp.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_shape, choose_impl


class AxisWeights(NamedTuple):
    i0: np.ndarray         # (out,) int64 lower source index
    i1: np.ndarray         # (out,) upper source index (i0 + 1, or i0 at the last pixel)
    l0: np.ndarray         # (out,) weight of i0, in the input's dtype
    l1: np.ndarray         # (out,) weight of i1


class BilinearCache(NamedTuple):
    shape: tuple           # (N, C, H, W) of the input: backward needs nothing else
    dtype: np.dtype
    rows: AxisWeights      # height axis, Ho entries
    cols: AxisWeights      # width axis, Wo entries


def axis_weights(n_in: int, n_out: int, *, align_corners: bool = False, scale=None,
                 dtype=np.float32) -> AxisWeights:
    """Source indices and weights of one axis, torch's rule (module docstring) in ``dtype``.

    ``scale`` is the scale factor that reaches torch's kernel (None: derived from the sizes).
    """
    t = np.dtype(dtype).type
    dst = np.arange(n_out)
    if n_out == n_in:                          # torch copies: "scale_factor = 1"
        return AxisWeights(dst, dst.copy(), np.ones(n_out, t), np.zeros(n_out, t))
    if align_corners:
        r = t(n_in - 1) / t(n_out - 1) if n_out > 1 else t(0)
    elif scale is not None and scale > 0:
        r = t(1.0 / scale)
    else:
        r = t(n_in) / t(n_out)
    if align_corners:
        src = r * dst.astype(t)                                       # (out,)
    else:
        src = np.maximum(_centre_source(r, n_out).astype(t), t(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)                  # floor: src >= 0
    i1 = i0 + (i0 < n_in - 1)
    l1 = np.clip(src - i0.astype(t), t(0), t(1)).astype(t)
    return AxisWeights(i0, i1, (t(1) - l1).astype(t), l1)


def _centre_source(r, n_out):
    """r (i + 1/2) - 1/2 for i < n_out, exact, rounded once to float64.

    torch evaluates ``scale * (dst_index + 0.5) - 0.5`` in double (the literals are double
    even for float32 tensors), and its x86 AVX2/AVX-512 and ARM builds fuse it into one
    multiply-add: a single rounding. With r = p / q (q a power of two) the value is the
    fraction (p (2i + 1) - q) / (2q), and Python's integer division rounds it correctly.
    For a float32 r the product is exact in double, so this is also the unfused value.
    """
    p, q = float(r).as_integer_ratio()
    return np.array([(p * (2 * i + 1) - q) / (2 * q) for i in range(n_out)], dtype=np.float64)


def output_size(shape, size=None, scale_factor=None):
    """(Ho, Wo) and the per-axis scale factors torch passes on: F.interpolate's rules."""
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size and scale_factor")
    H, W = shape[2], shape[3]
    if size is not None:
        pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(pair) != 2 or any(isinstance(v, (bool, np.bool_)) or not isinstance(
                v, (int, np.integer)) or v < 1 for v in pair):
            raise ValueError(f"size must be a positive int or a pair of them, got {size!r}")
        return (int(pair[0]), int(pair[1])), (None, None)
    pair = (scale_factor,) * 2 if np.isscalar(scale_factor) else tuple(scale_factor)
    if len(pair) != 2 or not all(isinstance(v, (int, float, np.floating, np.integer))
                                 and math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"scale_factor must be a positive number or a pair of them, "
                         f"got {scale_factor!r}")
    out = (math.floor(H * float(pair[0])), math.floor(W * float(pair[1])))
    if min(out) < 1:
        raise ValueError(f"scale_factor {scale_factor!r} maps the input size {(H, W)} to an "
                         f"empty output {out}")
    return out, (float(pair[0]), float(pair[1]))


def _prepare(x, size, scale_factor, align_corners, recompute_scale_factor):
    check_array("x", x, ndim=4)
    if 0 in x.shape:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    (Ho, Wo), scales = output_size(x.shape, size, scale_factor)
    if recompute_scale_factor or align_corners:
        scales = (None, None)                  # torch ignores the factor with align_corners
    H, W = x.shape[2:]
    rows = axis_weights(H, Ho, align_corners=align_corners, scale=scales[0], dtype=x.dtype)
    cols = axis_weights(W, Wo, align_corners=align_corners, scale=scales[1], dtype=x.dtype)
    return BilinearCache(x.shape, x.dtype, rows, cols)


def _check_dout(dout, cache):
    N, C = cache.shape[:2]
    check_array("dout", dout, ndim=4, dtype=cache.dtype)
    check_shape("dout", dout, (N, C, cache.rows.i0.size, cache.cols.i0.size),
                "the forward output's shape")


# ----------------------------------------------------------------------------- naive

def bilinear_forward_naive(x, size=None, *, scale_factor=None, align_corners=False,
                           recompute_scale_factor=None):
    """The formula, one output pixel at a time (all images and channels at once)."""
    cache = _prepare(x, size, scale_factor, align_corners, recompute_scale_factor)
    (h0, h1, l0, l1), (w0, w1, m0, m1) = cache.rows, cache.cols
    N, C = x.shape[:2]
    out = np.empty((N, C, h0.size, w0.size), dtype=x.dtype)
    for i in range(h0.size):
        for j in range(w0.size):
            top = m0[j] * x[:, :, h0[i], w0[j]] + m1[j] * x[:, :, h0[i], w1[j]]     # (N, C)
            bottom = m0[j] * x[:, :, h1[i], w0[j]] + m1[j] * x[:, :, h1[i], w1[j]]
            out[:, :, i, j] = l0[i] * top + l1[i] * bottom
    return out, cache


def bilinear_backward_naive(dout, cache: BilinearCache):
    """Each output pixel's gradient scattered back onto its four source pixels."""
    _check_dout(dout, cache)
    (h0, h1, l0, l1), (w0, w1, m0, m1) = cache.rows, cache.cols
    dx = np.zeros(cache.shape, dtype=cache.dtype)
    for i in range(h0.size):
        for j in range(w0.size):
            g = dout[:, :, i, j]                                                      # (N, C)
            dx[:, :, h0[i], w0[j]] += (l0[i] * m0[j]) * g
            dx[:, :, h0[i], w1[j]] += (l0[i] * m1[j]) * g
            dx[:, :, h1[i], w0[j]] += (l1[i] * m0[j]) * g
            dx[:, :, h1[i], w1[j]] += (l1[i] * m1[j]) * g
    return dx


# ----------------------------------------------------------------------------- fast (Numba)
# One task per (image, channel) plane: the backward's scatter stays inside its own plane, so
# the parallel loop needs no atomics.

def _bilinear_fwd_loops(x, h0, h1, l0, l1, w0, w1, m0, m1, out):
    P = x.shape[0]
    Ho, Wo = out.shape[1], out.shape[2]
    for p in prange(P):
        for i in range(Ho):
            r0, r1, a0, a1 = x[p, h0[i]], x[p, h1[i]], l0[i], l1[i]
            for j in range(Wo):
                top = m0[j] * r0[w0[j]] + m1[j] * r0[w1[j]]
                bottom = m0[j] * r1[w0[j]] + m1[j] * r1[w1[j]]
                out[p, i, j] = a0 * top + a1 * bottom


def _bilinear_bwd_loops(dout, h0, h1, l0, l1, w0, w1, m0, m1, dx):
    P = dout.shape[0]
    Ho, Wo = dout.shape[1], dout.shape[2]
    for p in prange(P):
        dx[p] = 0
        for i in range(Ho):
            r0, r1, a0, a1 = dx[p, h0[i]], dx[p, h1[i]], l0[i], l1[i]
            for j in range(Wo):
                g = dout[p, i, j]
                r0[w0[j]] += (a0 * m0[j]) * g
                r0[w1[j]] += (a0 * m1[j]) * g
                r1[w0[j]] += (a1 * m0[j]) * g
                r1[w1[j]] += (a1 * m1[j]) * g


_bilinear_fwd = njit(cache=True, parallel=True)(_bilinear_fwd_loops)
_bilinear_bwd = njit(cache=True, parallel=True)(_bilinear_bwd_loops)


def bilinear_forward_fast(x, size=None, *, scale_factor=None, align_corners=False,
                          recompute_scale_factor=None):
    """Same contract as ``bilinear_forward_naive``: one Numba pass, a task per plane."""
    cache = _prepare(x, size, scale_factor, align_corners, recompute_scale_factor)
    N, C, H, W = x.shape
    Ho, Wo = cache.rows.i0.size, cache.cols.i0.size
    out = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    _bilinear_fwd(np.ascontiguousarray(x).reshape(N * C, H, W), *cache.rows, *cache.cols,
                  out.reshape(N * C, Ho, Wo))
    return out, cache


def bilinear_backward_fast(dout, cache: BilinearCache):
    """Same contract as ``bilinear_backward_naive``."""
    _check_dout(dout, cache)
    N, C, H, W = cache.shape
    Ho, Wo = dout.shape[2:]
    dx = np.empty(cache.shape, dtype=cache.dtype)
    _bilinear_bwd(np.ascontiguousarray(dout).reshape(N * C, Ho, Wo), *cache.rows, *cache.cols,
                  dx.reshape(N * C, H, W))
    return dx


# ----------------------------------------------------------------------------- public API

def bilinear_forward(x, size=None, *, scale_factor=None, align_corners=False,
                     recompute_scale_factor=None, impl="fast"):
    """``F.interpolate(x, size, scale_factor, mode="bilinear", align_corners,
    recompute_scale_factor)``: x (N, C, H, W) -> ``(out (N, C, Ho, Wo), cache)``."""
    f = choose_impl(impl, bilinear_forward_fast, bilinear_forward_naive)
    return f(x, size, scale_factor=scale_factor, align_corners=align_corners,
             recompute_scale_factor=recompute_scale_factor)


def bilinear_backward(dout, cache, *, impl="fast"):
    """Gradient of ``bilinear_forward``: dout (N, C, Ho, Wo) -> dx (N, C, H, W)."""
    return choose_impl(impl, bilinear_backward_fast, bilinear_backward_naive)(dout, cache)
