"""Global average pooling (torch ``AdaptiveAvgPool2d(1)``).

Legend: N batch, C channels, H W spatial size.

    out[n, c, 0, 0] = (1 / (H W)) sum_{i, j} x[n, c, i, j]          (N, C, H, W) -> (N, C, 1, 1)
    dx[n, c, i, j]  = dout[n, c, 0, 0] / (H W)                      every pixel gets an equal share

MobileNetV3 pools once before the classifier and once inside every squeeze-and-excitation block.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_shape, choose_impl
from .channels_last import mean_pixels, nchw_view, to_nhwc


class PoolCache(NamedTuple):
    shape: tuple[int, int, int, int]   # (N, C, H, W) of the input: all backward needs
    dtype: np.dtype


def avgpool_forward_naive(x):
    """Mean over the spatial axes; returns ``(out (N, C, 1, 1), cache)``."""
    check_array("x", x, ndim=4)
    N, C, H, W = x.shape
    out = np.zeros((N, C, 1, 1), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            out[n, c, 0, 0] = x[n, c].sum() / (H * W)
    return out, PoolCache(x.shape, x.dtype)


def avgpool_backward_naive(dout, cache: PoolCache):
    """dx = dout / (H W) broadcast over every pixel."""
    N, C, H, W = cache.shape
    _check_dout(dout, cache)
    return np.broadcast_to(dout / (H * W), cache.shape).copy()


def _check_dout(dout, cache):
    check_array("dout", dout, ndim=4, dtype=cache.dtype)
    check_shape("dout", dout, cache.shape[:2] + (1, 1), "the forward output's shape")


def avgpool_forward_fast(x):
    """Same contract as ``avgpool_forward_naive``; one Numba pass on channels-last memory
    (``channels_last.mean_pixels``: float64 sums, vectorised over channels)."""
    check_array("x", x, ndim=4)
    N, C, H, W = x.shape
    out = np.empty((N, C), dtype=x.dtype)
    mean_pixels(to_nhwc(x).reshape(N, H * W, C), out)
    return out.reshape(N, C, 1, 1), PoolCache(x.shape, x.dtype)


def avgpool_backward_fast(dout, cache: PoolCache):
    """Same contract as ``avgpool_backward_naive``; the result is channels-last in memory."""
    N, C, H, W = cache.shape
    _check_dout(dout, cache)
    dx = np.empty((N, H, W, C), dtype=cache.dtype)
    dx[...] = (dout / (H * W)).reshape(N, 1, 1, C)
    return nchw_view(dx)


def avgpool_forward(x, *, impl="fast"):
    """Global average pool: x (N, C, H, W) -> ``(out (N, C, 1, 1), cache)``."""
    return choose_impl(impl, avgpool_forward_fast, avgpool_forward_naive)(x)


def avgpool_backward(dout, cache, *, impl="fast"):
    """Gradient of ``avgpool_forward``: dout (N, C, 1, 1) -> dx (N, C, H, W)."""
    return choose_impl(impl, avgpool_backward_fast, avgpool_backward_naive)(dout, cache)
