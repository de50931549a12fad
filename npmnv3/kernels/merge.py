"""Where two branches meet: channel concatenation and the per-channel product (a gate).

Legend: N batch, C channels (C_k of input k), H W spatial size.

Concatenation along channels (torch.cat(xs, dim=1); DeepLabV3's ASPP joins its five branches,
torchvision ``deeplabv3.py`` ``ASPP.forward``):
    out[:, o_k + c] = xs[k][:, c]    with o_k = C_0 + ... + C_{k-1}
    dxs[k] = dout[:, o_k : o_k + C_k]                           (the gradient is split back)

Per-channel product (LR-ASPP's ``x * s``, torchvision ``lraspp.py`` ``LRASPPHead.forward``;
squeeze-and-excitation's scale, ``se.py``):
    out[n, c, i, j] = x[n, c, i, j] * s[n, c]                   s: (N, C, 1, 1)
    dx = dout * s,   ds[n, c] = sum_{i, j} dout[n, c, i, j] x[n, c, i, j]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_shape, choose_impl

# ----------------------------------------------------------------------------- concatenation


class ConcatCache(NamedTuple):
    channels: tuple        # C_k of every input, in order
    shape: tuple           # (N, sum C_k, H, W) of the output
    dtype: np.dtype


def _check_concat(xs):
    if not isinstance(xs, (list, tuple)) or not xs:
        raise ValueError("concat needs a non-empty list of arrays")
    first = check_array("xs[0]", xs[0], ndim=4)
    for k, x in enumerate(xs[1:], start=1):
        check_array(f"xs[{k}]", x, ndim=4, dtype=first.dtype)
        if x.shape[0] != first.shape[0] or x.shape[2:] != first.shape[2:]:
            raise ValueError(f"xs[{k}] has shape {x.shape}; every input must share N, H, W "
                             f"with xs[0] {first.shape}")
    N, _, H, W = first.shape
    channels = tuple(x.shape[1] for x in xs)
    return ConcatCache(channels, (N, sum(channels), H, W), first.dtype)


def concat_forward_naive(xs):
    """Copy channel by channel; returns ``(out (N, sum C_k, H, W), cache)``."""
    cache = _check_concat(xs)
    out = np.empty(cache.shape, dtype=cache.dtype)
    o = 0
    for x in xs:
        for c in range(x.shape[1]):
            out[:, o + c] = x[:, c]
        o += x.shape[1]
    return out, cache


def concat_backward_naive(dout, cache: ConcatCache):
    """Returns the list of dxs[k] (N, C_k, H, W), fresh arrays."""
    _check_concat_dout(dout, cache)
    dxs, o = [], 0
    for Ck in cache.channels:
        dx = np.empty((dout.shape[0], Ck) + dout.shape[2:], dtype=dout.dtype)
        for c in range(Ck):
            dx[:, c] = dout[:, o + c]
        dxs.append(dx)
        o += Ck
    return dxs


def _check_concat_dout(dout, cache):
    check_array("dout", dout, ndim=4, dtype=cache.dtype)
    check_shape("dout", dout, cache.shape, "the forward output's shape")


def concat_forward_fast(xs):
    """Same contract as ``concat_forward_naive``: one ``np.concatenate``."""
    cache = _check_concat(xs)
    return np.concatenate(xs, axis=1), cache


def concat_backward_fast(dout, cache: ConcatCache):
    """Same contract as ``concat_backward_naive``: one contiguous copy per slice."""
    _check_concat_dout(dout, cache)
    bounds = np.cumsum((0,) + cache.channels)
    return [np.ascontiguousarray(dout[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def concat_forward(xs, *, impl="fast"):
    """``torch.cat(xs, dim=1)`` of (N, C_k, H, W) arrays: ``(out, cache)``."""
    return choose_impl(impl, concat_forward_fast, concat_forward_naive)(xs)


def concat_backward(dout, cache, *, impl="fast"):
    """Gradient of ``concat_forward``: the list of per-input gradients."""
    return choose_impl(impl, concat_backward_fast, concat_backward_naive)(dout, cache)


# ----------------------------------------------------------------------------- channel product

class ScaleCache(NamedTuple):
    x: np.ndarray          # (N, C, H, W): ds needs it
    s: np.ndarray          # (N, C, 1, 1): dx needs it


def _check_scale(x, s):
    check_array("x", x, ndim=4)
    check_array("s", s, ndim=4, dtype=x.dtype)
    check_shape("s", s, x.shape[:2] + (1, 1), f"one factor per (image, channel) of x {x.shape}")


def channel_scale_forward_naive(x, s):
    """out = x * s (broadcast over H, W); returns ``(out, cache)``."""
    _check_scale(x, s)
    return x * s, ScaleCache(x, s)


def channel_scale_backward_naive(dout, cache: ScaleCache):
    """Returns ``(dx, ds)``: dx = dout * s, ds = sum over H, W of dout * x."""
    x, s = cache
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, x.shape, "the forward output's shape")
    return dout * s, np.sum(dout * x, axis=(2, 3), keepdims=True)


def _scale_loops(x, g, out):
    P, L = x.shape
    for q in prange(P):
        gq = g[q]
        for t in range(L):
            out[q, t] = x[q, t] * gq


def _dgate_loops(x, dout, dg):
    P, L = x.shape
    for q in prange(P):
        s = 0.0
        for t in range(L):
            s += dout[q, t] * x[q, t]
        dg[q] = s


_par = njit(cache=True, parallel=True)
scale_planes = _par(_scale_loops)        # out[q, :] = x[q, :] * g[q]      (also SE's scale)
dgate_planes = _par(_dgate_loops)        # dg[q] = sum_t dout[q, t] x[q, t] (float64 sum)


def channel_scale_forward_fast(x, s):
    """Same contract as ``channel_scale_forward_naive``: one Numba pass."""
    _check_scale(x, s)
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    out = np.empty_like(x)
    scale_planes(x.reshape(N * C, H * W), np.ascontiguousarray(s).reshape(N * C),
                 out.reshape(N * C, H * W))
    return out, ScaleCache(x, s)


def channel_scale_backward_fast(dout, cache: ScaleCache):
    """Same contract as ``channel_scale_backward_naive``: one pass for dx, one for ds."""
    x, s = cache
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, x.shape, "the forward output's shape")
    N, C, H, W = x.shape
    d2 = np.ascontiguousarray(dout).reshape(N * C, H * W)
    dx = np.empty(x.shape, dtype=x.dtype)
    scale_planes(d2, np.ascontiguousarray(s).reshape(N * C), dx.reshape(N * C, H * W))
    ds = np.empty((N, C, 1, 1), dtype=x.dtype)
    dgate_planes(np.ascontiguousarray(x).reshape(N * C, H * W), d2, ds.reshape(N * C))
    return dx, ds


def channel_scale_forward(x, s, *, impl="fast"):
    """Per-channel product x (N, C, H, W) * s (N, C, 1, 1): ``(out, cache)``."""
    return choose_impl(impl, channel_scale_forward_fast, channel_scale_forward_naive)(x, s)


def channel_scale_backward(dout, cache, *, impl="fast"):
    """Gradients of ``channel_scale_forward``: ``(dx, ds)``."""
    return choose_impl(impl, channel_scale_backward_fast, channel_scale_backward_naive)(
        dout, cache)
