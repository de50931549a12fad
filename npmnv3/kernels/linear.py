"""Fully connected layer (torch ``nn.Linear``): y = x W^T + b.

Legend: N batch, I in-features, O out-features. Weight layout (O, I) as in torch.

    y[n, o] = b[o] + sum_i W[o, i] x[n, i]                       (N, I) -> (N, O)
    dx = dy W  (N, I),   dW = dy^T x  (O, I),   db = sum_n dy  (O,)

MobileNetV3's classifier is Linear(960, 1280) -> hardswish -> dropout -> Linear(1280, classes).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_shape, choose_impl
from .threads import blas_single


class LinearCache(NamedTuple):
    x: np.ndarray          # (N, I) input, kept for dW
    w: np.ndarray          # (O, I)
    has_bias: bool


def _check_args(x, w, b):
    check_array("x", x, ndim=2)
    check_array("weight", w, ndim=2, dtype=x.dtype)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"feature mismatch: x {x.shape} has {x.shape[1]} features but weight "
                         f"{w.shape} expects {w.shape[1]}")
    if b is not None:
        check_array("bias", b, ndim=1, dtype=x.dtype)
        check_shape("bias", b, (w.shape[0],), f"one per output of weight {w.shape}")


def _check_dout(dout, cache):
    check_array("dout", dout, ndim=2, dtype=cache.x.dtype)
    check_shape("dout", dout, (cache.x.shape[0], cache.w.shape[0]), "the forward output's shape")


def linear_forward_naive(x, w, b=None):
    """y[n, o] = b[o] + sum_i W[o, i] x[n, i], one dot product per (n, o)."""
    _check_args(x, w, b)
    N, O = x.shape[0], w.shape[0]
    out = np.zeros((N, O), dtype=x.dtype)
    for n in range(N):
        for o in range(O):
            out[n, o] = np.dot(w[o], x[n]) + (b[o] if b is not None else 0)
    return out, LinearCache(x, w, b is not None)


def linear_backward_naive(dout, cache: LinearCache):
    """dx[n] = sum_o dy[n, o] W[o];  dW[o] = sum_n dy[n, o] x[n];  db = sum_n dy[n]."""
    x, w, has_bias = cache
    _check_dout(dout, cache)
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            dx[n] += dout[n, o] * w[o]
            dw[o] += dout[n, o] * x[n]
    db = dout.sum(axis=0) if has_bias else None
    return dx, dw, db


@blas_single
def linear_forward_fast(x, w, b=None):
    """One GEMM: y = x @ W.T (+ b)."""
    _check_args(x, w, b)
    out = x @ w.T                                   # (N, O)
    if b is not None:
        out += b
    return out, LinearCache(x, w, b is not None)


@blas_single
def linear_backward_fast(dout, cache: LinearCache):
    """Two GEMMs: dx = dy @ W, dW = dy.T @ x; db = column sums of dy."""
    x, w, has_bias = cache
    _check_dout(dout, cache)
    dx = dout @ w                                   # (N, I)
    dw = np.dot(dout.T, x)                          # (O, I); np.dot: matmul's transposed-
                                                    # operand path is ~7x slower at N = 1
    db = dout.sum(axis=0) if has_bias else None
    return dx, dw, db


def linear_forward(x, w, b=None, *, impl="fast"):
    """Linear layer, x (N, I), w (O, I), b (O,) or None -> ``(out (N, O), cache)``."""
    return choose_impl(impl, linear_forward_fast, linear_forward_naive)(x, w, b)


def linear_backward(dout, cache, *, impl="fast"):
    """Gradients of ``linear_forward``: ``(dx, dw, db)`` (db None without bias)."""
    return choose_impl(impl, linear_backward_fast, linear_backward_naive)(dout, cache)
