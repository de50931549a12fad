"""Dropout (Srivastava et al., JMLR 2014), torch's "inverted" convention.

Training:  keep ~ Bernoulli(1 - p) per element,  y = x * keep / (1 - p),  dx = dout * keep / (1 - p)
Eval, or p == 0:  y = x,  dx = dout.

torch and NumPy draw different random numbers, so a mask cannot be reproduced across them from a
seed; pass ``rng`` (a ``numpy.random.Generator`` or an int seed) for reproducible masks within
npmnv3, or ``mask`` (a boolean array of x's shape) to impose one, e.g. torch's.
MobileNetV3's classifier uses p = 0.2 (torchvision default ``dropout=0.2``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from ._checks import check_array, check_shape, choose_impl
from .activations import LOOP_MIN_SIZE


class DropoutCache(NamedTuple):
    keep: np.ndarray | None   # boolean mask of kept elements (None: identity)
    scale: float              # 1 / (1 - p)
    shape: tuple
    dtype: np.dtype


def _make_mask(x, p, training, rng, mask):
    check_array("x", x)
    if not (isinstance(p, (int, float, np.floating)) and 0.0 <= p <= 1.0):
        raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
    if not training or p == 0:
        return None
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise ValueError("mask must be a boolean numpy array")
        check_shape("mask", mask, x.shape, "one entry per element of x")
        return mask
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.random(x.shape) >= p                   # (x.shape) True where the element is kept


def _scale(p):
    return 0.0 if p == 1 else 1.0 / (1.0 - p)         # p == 1 drops everything (torch: zeros)


def dropout_forward_naive(x, p=0.5, *, training, rng=None, mask=None):
    """Returns ``(out, cache)``; out = x * keep / (1 - p) in training mode, x in eval mode."""
    keep = _make_mask(x, p, training, rng, mask)
    if keep is None:
        return x.copy(), DropoutCache(None, 1.0, x.shape, x.dtype)
    noise = keep.astype(x.dtype) * x.dtype.type(_scale(p))     # torch: bernoulli_(1-p).div_(1-p)
    return x * noise, DropoutCache(keep, _scale(p), x.shape, x.dtype)


def dropout_backward_naive(dout, cache: DropoutCache):
    """dx = dout * keep / (1 - p) (or dout in eval mode)."""
    check_array("dout", dout, dtype=cache.dtype)
    check_shape("dout", dout, cache.shape, "the forward output's shape")
    if cache.keep is None:
        return dout.copy()
    return dout * (cache.keep.astype(dout.dtype) * dout.dtype.type(cache.scale))


def _masked_scale_loops(a, keep, scale, out):
    for i in range(a.size):
        out[i] = a[i] * scale if keep[i] else a[i] * 0


_masked_scale = njit(cache=True)(_masked_scale_loops)     # (N, 1280) in MobileNetV3: serial


def _apply(a, keep, scale):
    if a.size < LOOP_MIN_SIZE:         # the same expression in NumPy (no loop to compile)
        s = a.dtype.type(scale)
        return np.where(keep, a * s, a * a.dtype.type(0))
    a = np.ascontiguousarray(a)
    out = np.empty_like(a)
    _masked_scale(a.reshape(-1), np.ascontiguousarray(keep).reshape(-1), a.dtype.type(scale),
                  out.reshape(-1))
    return out


def dropout_forward_fast(x, p=0.5, *, training, rng=None, mask=None):
    """Same contract and (given the same rng) the same mask as ``dropout_forward_naive``."""
    keep = _make_mask(x, p, training, rng, mask)
    if keep is None:
        return x.copy(), DropoutCache(None, 1.0, x.shape, x.dtype)
    return _apply(x, keep, _scale(p)), DropoutCache(keep, _scale(p), x.shape, x.dtype)


def dropout_backward_fast(dout, cache: DropoutCache):
    check_array("dout", dout, dtype=cache.dtype)
    check_shape("dout", dout, cache.shape, "the forward output's shape")
    if cache.keep is None:
        return dout.copy()
    return _apply(dout, cache.keep, cache.scale)


def dropout_forward(x, p=0.5, *, training, rng=None, mask=None, impl="fast"):
    """Dropout with drop probability ``p``; returns ``(out, cache)``."""
    f = choose_impl(impl, dropout_forward_fast, dropout_forward_naive)
    return f(x, p, training=training, rng=rng, mask=mask)


def dropout_backward(dout, cache, *, impl="fast"):
    """Gradient of ``dropout_forward``."""
    return choose_impl(impl, dropout_backward_fast, dropout_backward_naive)(dout, cache)
