"""The logistic sigmoid, LR-ASPP's global gate (MobileNetV3 §6.3; torchvision ``lraspp.py``
``LRASPPHead.scale`` ends in ``nn.Sigmoid``).

Shapes: any; outputs and gradients have the input's shape and dtype.

    y = 1 / (1 + exp(-x))                 dx = dout * (1 - y) * y      (evaluated in this order)

torch computes the backward from the *output* y (``sigmoid_backward(grad, y)``), so the cache
keeps y, not x, and the gradient given the same y is torch's to the last bit. The forward is
not bitwise torch's: torch's vectorised CPU loop takes exp from SLEEF, the fast version here
libm's (through Numba), the naive one NumPy's SIMD exp; in float32 each is within 2-3 ulp of
the exact value (``tests/test_seg_kernels.py``). No kinks; for x -> -inf the exp overflows to
inf and y is exactly 0, as in torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_shape, choose_impl


class SigmoidCache(NamedTuple):
    y: np.ndarray          # the output: dy/dx = y (1 - y)


def sigmoid_forward_naive(x):
    """y = 1 / (1 + exp(-x)); returns ``(y, cache)``."""
    check_array("x", x)
    one = x.dtype.type(1)
    with np.errstate(over="ignore"):                  # exp(-x) = inf for x < -88 (float32): y = 0
        y = one / (one + np.exp(-x))
    return y, SigmoidCache(y)


def sigmoid_backward_naive(dout, cache: SigmoidCache):
    """dx = dout * (1 - y) * y."""
    _check_dout(dout, cache)
    y = cache.y
    return dout * (y.dtype.type(1) - y) * y


def _check_dout(dout, cache):
    check_array("dout", dout, dtype=cache.y.dtype)
    check_shape("dout", dout, cache.y.shape, "the forward output's shape")


def _sigmoid_fwd_loop(x, one, out):
    for i in prange(x.size):
        out[i] = one / (one + math.exp(-x[i]))


def _sigmoid_bwd_loop(y, dout, one, dx):
    for i in prange(y.size):
        dx[i] = dout[i] * (one - y[i]) * y[i]


_sigmoid_fwd = njit(cache=True, parallel=True)(_sigmoid_fwd_loop)
_sigmoid_bwd = njit(cache=True, parallel=True)(_sigmoid_bwd_loop)


def sigmoid_forward_fast(x):
    """Same contract as ``sigmoid_forward_naive``: one Numba pass."""
    check_array("x", x)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _sigmoid_fwd(x.reshape(-1), x.dtype.type(1), y.reshape(-1))
    return y, SigmoidCache(y)


def sigmoid_backward_fast(dout, cache: SigmoidCache):
    """Same contract as ``sigmoid_backward_naive`` (bitwise the same values)."""
    _check_dout(dout, cache)
    y = np.ascontiguousarray(cache.y)       # the naive forward may keep x's memory order
    dx = np.empty(y.shape, dtype=y.dtype)
    _sigmoid_bwd(y.reshape(-1), np.ascontiguousarray(dout).reshape(-1), y.dtype.type(1),
                 dx.reshape(-1))
    return dx


def sigmoid_forward(x, *, impl="fast"):
    """Logistic sigmoid of x (any shape): ``(y, cache)``."""
    return choose_impl(impl, sigmoid_forward_fast, sigmoid_forward_naive)(x)


def sigmoid_backward(dout, cache, *, impl="fast"):
    """Gradient of ``sigmoid_forward``: dx, the shape of dout."""
    return choose_impl(impl, sigmoid_backward_fast, sigmoid_backward_naive)(dout, cache)
