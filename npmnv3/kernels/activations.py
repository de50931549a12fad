"""Element-wise activations: ReLU, ReLU6, hard-sigmoid, hard-swish (MobileNetV3 §5.2).

Shapes: any; outputs and gradients have the input's shape and dtype.

Every forward is evaluated in the same order as torch's CPU kernels, so float32 results are
bit-identical to torch (``aten/src/ATen/native/cpu/Activation.cpp``): ``c = min(max(x + 3, 0),
6)``, then ``hardsigmoid = c / 6`` and ``hardswish = (x * c) / 6``.

Gradients at the kinks follow torch (checked by ``tests/test_activations.py``):

=============  ==============================  ======================================
activation     derivative used                 value exactly at the kink
=============  ==============================  ======================================
ReLU           1 if x > 0 else 0               x = 0 -> 0
ReLU6          1 if 0 < x < 6 else 0           x = 0 -> 0, x = 6 -> 0
hard-sigmoid   1/6 if -3 < x < 3 else 0        x = -3 -> 0, x = 3 -> 0
hard-swish     0 | x/3 + 1/2 | 1               x = -3 -> 0, x = 3 -> 1 (x <= -3: 0, x >= 3: 1)
=============  ==============================  ======================================

torch's CPU kernel multiplies the hard-sigmoid gradient by ``1.0f / 6.0f`` computed in float32
even for float64 tensors; ``HSIGMOID_SLOPE`` reproduces that so float64 gradients match torch to
the last bit (the difference from the exact 1/6 is 3e-8 relative).

Each ``*_forward`` returns ``(out, cache)`` and each ``*_backward(dout, cache)`` returns ``dx``.
The fast versions are fused Numba loops (one pass, no temporaries); the naive ones are NumPy
expressions that read like the formulas. Pass ``impl="naive"`` to select the latter.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from ._checks import check_array
from .epilogue import act_grad, apply_act

# torch: `const opmath_t one_sixth(1.0f / 6.0f)` in aten/src/ATen/native/cpu/Activation.cpp.
HSIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))


class ActCache(NamedTuple):
    x: np.ndarray  # the input, kept for the derivative


# ----------------------------------------------------------------------------- naive (NumPy)

def relu_forward_naive(x):
    """y = max(x, 0); like torch, -0.0 and NaN pass through unchanged."""
    return np.where(x < 0, 0, x).astype(x.dtype), ActCache(x)


def relu_backward_naive(dout, cache):
    """dx = dout * [x > 0]."""
    return np.where(cache.x > 0, dout, 0).astype(dout.dtype)


def relu6_forward_naive(x):
    """y = min(max(x, 0), 6); like torch, -0.0 and NaN pass through unchanged."""
    return np.where(x < 0, 0, np.where(x > 6, 6, x)).astype(x.dtype), ActCache(x)


def relu6_backward_naive(dout, cache):
    """dx = dout * [0 < x < 6]."""
    return np.where((cache.x > 0) & (cache.x < 6), dout, 0).astype(dout.dtype)


def hardsigmoid_forward_naive(x):
    """y = relu6(x + 3) / 6."""
    c = np.minimum(np.maximum(x + 3, 0), 6)
    return c / 6, ActCache(x)


def hardsigmoid_backward_naive(dout, cache):
    """dx = dout / 6 where -3 < x < 3, else 0."""
    inside = (cache.x > -3) & (cache.x < 3)
    return np.where(inside, dout * dout.dtype.type(HSIGMOID_SLOPE), 0).astype(dout.dtype)


def hardswish_forward_naive(x):
    """y = x * relu6(x + 3) / 6, evaluated as (x * c) / 6 like torch."""
    c = np.minimum(np.maximum(x + 3, 0), 6)
    return (x * c) / 6, ActCache(x)


def hardswish_backward_naive(dout, cache):
    """dx = 0 for x <= -3, dout * (x/3 + 1/2) for -3 < x < 3, dout for x >= 3."""
    x = cache.x
    mid = dout * (x / 3 + x.dtype.type(0.5))
    return np.where(x <= -3, 0, np.where(x >= 3, dout, mid)).astype(dout.dtype)


# ----------------------------------------------------------------------------- fast (Numba)
# One loop each over the flattened array; written in the Numba subset, so the same source
# runs as Python under NUMBA_DISABLE_JIT=1. ReLU and hard-swish use the shared epilogue
# (``epilogue.py``), so every kernel that fuses them computes exactly these values.

# Constants arrive as arguments of the input's dtype (``z``ero, ``three``, ``six``, ...):
# a bare literal such as ``x + 3`` would make Numba promote float32 to float64, and the
# result would no longer be bit-identical to torch.

def _relu_fwd_loop(x, z, out):
    for i in range(x.size):
        out[i] = apply_act(x[i], 1, z, z, z)


def _relu_bwd_loop(x, dout, z, dx):
    for i in range(x.size):
        dx[i] = act_grad(1, x[i], dout[i], z, z, z)


def _relu6_fwd_loop(x, z, six, out):
    for i in range(x.size):
        out[i] = min(max(x[i], z), six)


def _relu6_bwd_loop(x, dout, z, six, dx):
    for i in range(x.size):
        v = x[i]
        dx[i] = dout[i] if (v > z and v < six) else z


def _hsig_fwd_loop(x, z, three, six, out):
    for i in range(x.size):
        out[i] = min(max(x[i] + three, z), six) / six


def _hsig_bwd_loop(x, dout, z, three, slope, dx):
    for i in range(x.size):
        v = x[i]
        dx[i] = dout[i] * slope if (v > -three and v < three) else z


def _hswish_fwd_loop(x, z, three, six, out):
    for i in range(x.size):
        out[i] = apply_act(x[i], 2, z, three, six)


def _hswish_bwd_loop(x, dout, z, three, half, dx):
    for i in range(x.size):
        dx[i] = act_grad(2, x[i], dout[i], z, three, half)


# Serial: in a training step these run on the SE gates and the classifier's (N, 1280) only
# (every convolution fuses its activation); a prange loop compiled ~3x slower on an empty cache.
# Below ``LOOP_MIN_SIZE`` elements the fast functions evaluate the naive NumPy expression
# instead (the same operations in the same order, so the same bits): on arrays that small it is
# as fast, and it spares a first training step the loops' compilation (~1 s on an empty cache).
LOOP_MIN_SIZE = 1 << 16
_jit = njit(cache=True)
_relu_fwd = _jit(_relu_fwd_loop)
_relu_bwd = _jit(_relu_bwd_loop)
_relu6_fwd = _jit(_relu6_fwd_loop)
_relu6_bwd = _jit(_relu6_bwd_loop)
_hsig_fwd = _jit(_hsig_fwd_loop)
_hsig_bwd = _jit(_hsig_bwd_loop)
_hswish_fwd = _jit(_hswish_fwd_loop)
_hswish_bwd = _jit(_hswish_bwd_loop)


def _small(x):
    return x.size < LOOP_MIN_SIZE


def _unary(kernel, x, *extra):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    kernel(x.reshape(-1), *extra, out.reshape(-1))
    return out


def _binary(kernel, cache, dout, *extra):
    check_array("dout", dout, dtype=cache.x.dtype)
    if dout.shape != cache.x.shape:
        raise ValueError(f"dout must have the input's shape {cache.x.shape}, got {dout.shape}")
    x = np.ascontiguousarray(cache.x)
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(x)
    kernel(x.reshape(-1), dout.reshape(-1), *extra, dx.reshape(-1))
    return dx


def _consts(x, *values):
    return tuple(x.dtype.type(v) for v in values)


def relu_forward_fast(x):
    if _small(x):
        return relu_forward_naive(x)
    return _unary(_relu_fwd, x, *_consts(x, 0)), ActCache(x)


def relu_backward_fast(dout, cache):
    if _small(cache.x):
        return relu_backward_naive(dout, cache)
    return _binary(_relu_bwd, cache, dout, *_consts(cache.x, 0))


def relu6_forward_fast(x):
    if _small(x):
        return relu6_forward_naive(x)
    return _unary(_relu6_fwd, x, *_consts(x, 0, 6)), ActCache(x)


def relu6_backward_fast(dout, cache):
    if _small(cache.x):
        return relu6_backward_naive(dout, cache)
    return _binary(_relu6_bwd, cache, dout, *_consts(cache.x, 0, 6))


def hardsigmoid_forward_fast(x):
    if _small(x):
        return hardsigmoid_forward_naive(x)
    return _unary(_hsig_fwd, x, *_consts(x, 0, 3, 6)), ActCache(x)


def hardsigmoid_backward_fast(dout, cache):
    if _small(cache.x):
        return hardsigmoid_backward_naive(dout, cache)
    return _binary(_hsig_bwd, cache, dout, *_consts(cache.x, 0, 3, HSIGMOID_SLOPE))


def hardswish_forward_fast(x):
    if _small(x):
        return hardswish_forward_naive(x)
    return _unary(_hswish_fwd, x, *_consts(x, 0, 3, 6)), ActCache(x)


def hardswish_backward_fast(dout, cache):
    if _small(cache.x):
        return hardswish_backward_naive(dout, cache)
    return _binary(_hswish_bwd, cache, dout, *_consts(cache.x, 0, 3, 0.5))


# ----------------------------------------------------------------------------- public API

_IMPLS = {
    "relu": (relu_forward_naive, relu_backward_naive, relu_forward_fast, relu_backward_fast),
    "relu6": (relu6_forward_naive, relu6_backward_naive, relu6_forward_fast,
              relu6_backward_fast),
    "hardsigmoid": (hardsigmoid_forward_naive, hardsigmoid_backward_naive,
                    hardsigmoid_forward_fast, hardsigmoid_backward_fast),
    "hardswish": (hardswish_forward_naive, hardswish_backward_naive,
                  hardswish_forward_fast, hardswish_backward_fast),
}
ACTIVATIONS = tuple(_IMPLS)


def _pick(name: str, impl: str, backward: bool):
    if impl not in ("fast", "naive"):
        raise ValueError(f"impl must be 'fast' or 'naive', got {impl!r}")
    if name not in _IMPLS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return _IMPLS[name][(2 if impl == "fast" else 0) + int(backward)]


def activation_forward(name: str, x, *, impl: str = "fast"):
    """Apply activation ``name`` (relu, relu6, hardsigmoid, hardswish); returns (out, cache)."""
    check_array("x", x)
    return _pick(name, impl, False)(x)


def activation_backward(name: str, dout, cache: ActCache, *, impl: str = "fast"):
    """Gradient of activation ``name`` w.r.t. its input; returns dx (same shape as dout)."""
    check_array("dout", dout, dtype=cache.x.dtype)
    if dout.shape != cache.x.shape:
        raise ValueError(f"dout must have the input's shape {cache.x.shape}, got {dout.shape}")
    return _pick(name, impl, True)(dout, cache)


def relu_forward(x, *, impl="fast"):
    return activation_forward("relu", x, impl=impl)


def relu_backward(dout, cache, *, impl="fast"):
    return activation_backward("relu", dout, cache, impl=impl)


def relu6_forward(x, *, impl="fast"):
    return activation_forward("relu6", x, impl=impl)


def relu6_backward(dout, cache, *, impl="fast"):
    return activation_backward("relu6", dout, cache, impl=impl)


def hardsigmoid_forward(x, *, impl="fast"):
    return activation_forward("hardsigmoid", x, impl=impl)


def hardsigmoid_backward(dout, cache, *, impl="fast"):
    return activation_backward("hardsigmoid", dout, cache, impl=impl)


def hardswish_forward(x, *, impl="fast"):
    return activation_forward("hardswish", x, impl=impl)


def hardswish_backward(dout, cache, *, impl="fast"):
    return activation_backward("hardswish", dout, cache, impl=impl)
