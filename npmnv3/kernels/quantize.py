"""Affine quantization: float <-> 8-bit integers, and requantization of int32 accumulators.

A quantized tensor stores integers q with a scale s > 0 and a zero point z (the integer that
stands for the real number 0):

    real value    x ~ s * (q - z)                                   (dequantize)
    quantize      q = clamp(round(x * (1/s)) + z, qmin, qmax)

``round`` is round-half-to-even and ``1/s`` is computed in float32 before the multiply, as torch
does (``quantize_val`` in ``aten/src/ATen/native/quantized/AffineQuantizer.cpp`` and fbgemm's
``Quantize``: "multiply with inv_scale instead of dividing by scale"); dividing by s instead
changes a few values in every thousand. Activations are ``quint8`` (uint8, 0..255, any z);
weights are ``qint8`` (int8, -128..127, z = 0 for the symmetric schemes torch uses), per tensor
or per output channel (``axis`` 0): one (s, z) per filter.

Requantization is where float arithmetic enters an integer layer. A convolution accumulates
exact int32 sums acc = sum (q_x - z_x)(q_w - z_w) + q_bias; the output integer is

    q_out = clamp(round(float32(acc) * M) + z_out, qmin, qmax),   M = (s_w * s_x) * (1 / s_out)

with M, the product and the rounding all in float32 (qnnpack's "fp32 requantization":
``qnnpack/src/q8gemm/4x4c2-sse2.c``: ``_mm_cvtps_epi32(_mm_mul_ps(_mm_cvtepi32_ps(acc), M))``,
then saturating packs and a clamp to [output_min, output_max]). The float bias is quantized
with scale s_x * s_w and zero point 0 (``quant_utils::QuantizeBias``).

Legend: N batch, K channels, ``...`` any trailing dims.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import choose_impl

QRANGES = {"quint8": (0, 255), "qint8": (-128, 127), "qint32": (-2**31, 2**31 - 1)}
NP_DTYPES = {"quint8": np.uint8, "qint8": np.int8, "qint32": np.int32}


def _qrange(dtype: str):
    try:
        return QRANGES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(QRANGES)}, got {dtype!r}") from None


def _check_scale(name, s):
    s = np.asarray(s, dtype=np.float32)
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise ValueError(f"{name} must be finite and positive, got {s}")
    return s


def quantize_per_tensor(x, scale, zero_point, dtype="quint8"):
    """q = clamp(round(x * float32(1/s)) + z) as uint8 (quint8), int8 (qint8) or int32."""
    qmin, qmax = _qrange(dtype)
    s = _check_scale("scale", scale)
    inv = np.float32(1) / s                                      # float32, as torch
    q = np.rint(np.asarray(x, dtype=np.float32) * inv) + np.float64(zero_point)
    return np.clip(q, qmin, qmax).astype(NP_DTYPES[dtype])


def quantize_per_channel(x, scales, zero_points, axis=0, dtype="qint8"):
    """Per-channel quantization along ``axis``: channel c uses (scales[c], zero_points[c])."""
    qmin, qmax = _qrange(dtype)
    x = np.asarray(x, dtype=np.float32)
    s = _check_scale("scales", scales).reshape(-1)
    z = np.asarray(zero_points, dtype=np.float64).reshape(-1)
    if s.shape[0] != x.shape[axis] or z.shape[0] != x.shape[axis]:
        raise ValueError(f"per-channel quantization along axis {axis} of shape {x.shape} needs "
                         f"{x.shape[axis]} scales and zero points, got {s.shape[0]} and "
                         f"{z.shape[0]}")
    shape = [1] * x.ndim
    shape[axis] = -1
    inv = (np.float32(1) / s).reshape(shape)
    q = np.rint(x * inv) + z.reshape(shape)
    return np.clip(q, qmin, qmax).astype(NP_DTYPES[dtype])


def dequantize(q, scale, zero_point, axis=None):
    """x = float32(s) * float32(q - z) (per channel along ``axis`` if given)."""
    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (s * (q.astype(np.float32) - z)).astype(np.float32)


def quantize_bias(bias, x_scale, w_scale):
    """int32 bias (K,) with scale s_x * s_w[k] and zero point 0 (torch ``QuantizeBias``).

    The product of the two float32 scales is rounded once to float32 (torch forms it in double
    and narrows it: the same float32); then q = round(b * float32(1 / scale)).
    """
    b = np.asarray(bias, dtype=np.float32)
    sw = np.broadcast_to(np.asarray(w_scale, dtype=np.float32), b.shape)
    inv = np.float32(1) / _check_scale("bias scale", sw * np.float32(x_scale))
    lo, hi = QRANGES["qint32"]
    return np.clip(np.rint(b * inv), lo, hi).astype(np.int32)


def requant_multipliers(x_scale, w_scale, out_scale, channels):
    """M[k] = (s_w[k] * s_x) * (1 / s_out), float32 (qnnpack ``generate_requantization_scales``)."""
    sw = np.broadcast_to(np.asarray(w_scale, dtype=np.float32), (channels,))
    inv_out = np.float32(1) / np.float32(out_scale)
    return ((sw * np.float32(x_scale)) * inv_out).astype(np.float32)


# ----------------------------------------------------------------------------- requantize

def requantize_naive(acc, multiplier, out_zp, qmin=0, qmax=255, bias=None):
    """uint8 (N, K, ...) = clamp(round(float32(acc + q_b[k]) * M[k]) + z_out, qmin, qmax).

    ``acc``: integer sums (N, K, ...) (int32, or exact integers in a float array); ``bias``:
    q_b (K,) int32 or None; ``M`` (K,) float32. A fused ReLU is qmin = z_out (torch's
    ``activationLimits``: the integer of 0.0).
    """
    acc = np.asarray(acc).astype(np.int64)
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    if bias is not None:
        acc = acc + np.asarray(bias, dtype=np.int64).reshape(shape)
    M = np.asarray(multiplier, dtype=np.float32).reshape(shape)
    y = np.rint(acc.astype(np.int32).astype(np.float32) * M) + np.float32(out_zp)
    return np.clip(y, qmin, qmax).astype(np.uint8)


def _requant_loops(acc, bias, M, zp, qmin, qmax, out):
    """out[n, k, t] = clamp(rint(float32(int32(acc[n, k, t]) + bias[k]) * M[k]) + zp)."""
    N, K, L = acc.shape
    for nk in prange(N * K):
        n, k = nk // K, nk % K
        b, m = bias[k], M[k]
        for t in range(L):
            v = np.float32(np.int32(acc[n, k, t]) + b) * m
            r = np.rint(v) + zp
            out[n, k, t] = min(max(r, qmin), qmax)


_requant = njit(cache=True, parallel=True)(_requant_loops)


def requantize_fast(acc, multiplier, out_zp, qmin=0, qmax=255, bias=None):
    """Numba version of ``requantize_naive`` (same contract), one pass over the sums."""
    N, K = acc.shape[:2]
    a3 = acc.reshape(N, K, -1)
    out = np.empty(a3.shape, dtype=np.uint8)
    b = np.zeros(K, np.int32) if bias is None else np.asarray(bias, dtype=np.int32)
    _requant(a3, b, np.asarray(multiplier, dtype=np.float32), np.float32(out_zp),
             np.float32(qmin), np.float32(qmax), out)
    return out.reshape(acc.shape)


def requantize(acc, multiplier, out_zp, qmin=0, qmax=255, bias=None, *, impl="fast"):
    """Integer sums (N, K, ...) -> uint8 with per-channel float32 multipliers M (K,)."""
    f = choose_impl(impl, requantize_fast, requantize_naive)
    return f(acc, multiplier, out_zp, qmin, qmax, bias)
