"""Squeeze-and-excitation (Hu et al., arXiv:1709.01507) as MobileNetV3 uses it (§5.3).

Legend: N batch, C channels, S squeeze channels, H W spatial size.
torchvision ``SqueezeExcitation``: fc1, fc2 are 1x1 convs with bias, weights (S, C, 1, 1) and
(C, S, 1, 1); S = make_divisible(C // 4, 8); the gate is hard-sigmoid (torchvision
``mobilenetv3.py`` passes ``scale_activation=nn.Hardsigmoid``).

    s   = avgpool(x)                       (N, C)    squeeze
    h   = relu(fc1(s))                     (N, S)
    g   = hardsigmoid(fc2(h))              (N, C)    excitation: one gate per channel
    out = x * g[:, :, None, None]          (N, C, H, W)

x fans out to two places (the pooled branch and the product), so its gradient is the sum:
    dx = dout * g  +  avgpool_backward(dg path)        (the caller-visible ``dx_scale + dx_pool``)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_shape, choose_impl
from .activations import (
    hardsigmoid_backward,
    hardsigmoid_forward,
    relu_backward,
    relu_forward,
)
from .linear import linear_backward, linear_forward
from .merge import dgate_planes, scale_planes
from .pool import avgpool_backward, avgpool_forward


class SECache(NamedTuple):
    x: np.ndarray          # (N, C, H, W) input: needed for dg = sum(dout * x)
    gate: np.ndarray       # (N, C) the hard-sigmoid output g
    pool: tuple            # avgpool cache
    fc1: tuple             # linear cache (weights viewed as (S, C))
    act: tuple             # relu cache
    fc2: tuple             # linear cache (weights viewed as (C, S))
    gate_act: tuple        # hardsigmoid cache


def _check_args(x, w1, b1, w2, b2):
    check_array("x", x, ndim=4)
    C = x.shape[1]
    check_array("fc1.weight", w1, ndim=4, dtype=x.dtype)
    S = w1.shape[0]
    check_shape("fc1.weight", w1, (S, C, 1, 1), f"1x1 conv from the {C} channels of x {x.shape}")
    check_array("fc1.bias", b1, ndim=1, dtype=x.dtype)
    check_shape("fc1.bias", b1, (S,), f"one per output of fc1.weight {w1.shape}")
    check_array("fc2.weight", w2, ndim=4, dtype=x.dtype)
    check_shape("fc2.weight", w2, (C, S, 1, 1), f"1x1 conv back from {S} to {C} channels")
    check_array("fc2.bias", b2, ndim=1, dtype=x.dtype)
    check_shape("fc2.bias", b2, (C,), f"one per channel of x {x.shape}")


def _gate(x, w1, b1, w2, b2, impl):
    """The excitation MLP: returns the gate g (N, C) and the caches of its steps."""
    N, C = x.shape[:2]
    S = w1.shape[0]
    pooled, c_pool = avgpool_forward(x, impl=impl)                      # (N, C, 1, 1)
    z1, c_fc1 = linear_forward(pooled.reshape(N, C), w1.reshape(S, C), b1, impl=impl)  # (N, S)
    h, c_act = relu_forward(z1, impl=impl)                              # (N, S)
    z2, c_fc2 = linear_forward(h, w2.reshape(C, S), b2, impl=impl)     # (N, C)
    g, c_gate = hardsigmoid_forward(z2, impl=impl)                      # (N, C)
    return g, (c_pool, c_fc1, c_act, c_fc2, c_gate)


def _gate_backward(dg, cache: SECache, impl):
    """Back through the MLP: returns (dpooled (N, C), dw1, db1, dw2, db2)."""
    N, C = cache.gate.shape
    dz2 = hardsigmoid_backward(dg, cache.gate_act, impl=impl)           # (N, C)
    dh, dw2, db2 = linear_backward(dz2, cache.fc2, impl=impl)          # (N, S), (C, S)
    dz1 = relu_backward(dh, cache.act, impl=impl)                      # (N, S)
    dpooled, dw1, db1 = linear_backward(dz1, cache.fc1, impl=impl)     # (N, C), (S, C)
    S = dw1.shape[0]
    return dpooled, dw1.reshape(S, C, 1, 1), db1, dw2.reshape(C, S, 1, 1), db2


# ----------------------------------------------------------------------------- naive

def se_forward_naive(x, w1, b1, w2, b2):
    """Returns ``(out (N, C, H, W), SECache)``."""
    _check_args(x, w1, b1, w2, b2)
    g, steps = _gate(x, w1, b1, w2, b2, "naive")
    out = x * g[:, :, None, None]                                       # channel scale
    return out, SECache(x, g, *steps)


def se_backward_naive(dout, cache: SECache):
    """Returns ``(dx, dw1, db1, dw2, db2)``."""
    x, g = cache.x, cache.gate
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, x.shape, "the forward output's shape")
    dx_scale = dout * g[:, :, None, None]                               # through out = x * g
    dg = np.sum(dout * x, axis=(2, 3))                                  # (N, C)
    dpooled, dw1, db1, dw2, db2 = _gate_backward(dg, cache, "naive")
    N, C = g.shape
    dx_pool = avgpool_backward(dpooled.reshape(N, C, 1, 1), cache.pool, impl="naive")
    dx = dx_scale + dx_pool                                             # x fans out: add both
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------- fast
# The channel scale and dg = sum(dout * x) are ``merge.py``'s loops (LR-ASPP's gate uses them).

def _dx_loops(dout, g, dpool, dx):
    P, L = dout.shape
    for q in prange(P):
        gq = g[q]
        share = dpool[q]
        for t in range(L):
            dx[q, t] = dout[q, t] * gq + share                           # dx_scale + dx_pool


_dx = njit(cache=True, parallel=True)(_dx_loops)


def se_forward_fast(x, w1, b1, w2, b2):
    """Same contract as ``se_forward_naive``; the channel scale is one Numba pass."""
    _check_args(x, w1, b1, w2, b2)
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    g, steps = _gate(x, w1, b1, w2, b2, "fast")
    out = np.empty_like(x)
    scale_planes(x.reshape(N * C, H * W), np.ascontiguousarray(g).reshape(N * C),
                 out.reshape(N * C, H * W))
    return out, SECache(x, g, *steps)


def se_backward_fast(dout, cache: SECache):
    """Same contract as ``se_backward_naive``: one pass for dg, one for dx = dout*g + dpool/HW."""
    x, g = cache.x, cache.gate
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, x.shape, "the forward output's shape")
    N, C, H, W = x.shape
    d2 = np.ascontiguousarray(dout).reshape(N * C, H * W)
    dg = np.empty((N, C), dtype=x.dtype)
    dgate_planes(x.reshape(N * C, H * W), d2, dg.reshape(N * C))
    dpooled, dw1, db1, dw2, db2 = _gate_backward(dg, cache, "fast")
    # The pool's gradient is the constant dpooled / (H W) on every pixel of a plane: it is
    # added inside the dx pass instead of materialising avgpool_backward's array.
    share = (dpooled / (H * W)).astype(x.dtype)
    dx = np.empty_like(x)
    _dx(d2, np.ascontiguousarray(g).reshape(N * C), share.reshape(N * C),
        dx.reshape(N * C, H * W))
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------- public API

def se_forward(x, w1, b1, w2, b2, *, impl="fast"):
    """Squeeze-and-excitation of x (N, C, H, W) with fc1 (S, C, 1, 1), (S,) and fc2
    (C, S, 1, 1), (C,). Returns ``(out, cache)``."""
    return choose_impl(impl, se_forward_fast, se_forward_naive)(x, w1, b1, w2, b2)


def se_backward(dout, cache, *, impl="fast"):
    """Gradients of ``se_forward``: ``(dx, dw1, db1, dw2, db2)``."""
    return choose_impl(impl, se_backward_fast, se_backward_naive)(dout, cache)
