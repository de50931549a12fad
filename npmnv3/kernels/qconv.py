"""Quantized convolution and linear layers: int32 accumulation, then requantization to uint8.

Legend: N batch, C in-channels, K out-channels, G groups, Cg = C/G, H W input size, Ho Wo output
size, kH kW kernel size, s stride, p padding, d dilation. Activations are quint8 (uint8 with
scale s_x and zero point z_x), weights qint8 (int8, K filters, scale s_w[k], zero point
z_w[k]: per tensor when all filters share them), biases float32.

    acc[n, k, i, j] = sum_{c, u, v} (q_x[n, c, i*s + u*d - p, j*s + v*d - p] - z_x)
                                     * (q_w[k, c, u, v] - z_w[k])   +   q_b[k]          (int32)
    q_out[n, k, i, j] = clamp(round(float32(acc) * M[k]) + z_out, lo, 255)

with q_b = round(b / (s_x s_w[k])) (``quantize.quantize_bias``), M[k] = (s_w[k] s_x) / s_out in
float32 (``quantize.requant_multipliers``), lo = 0, or lo = z_out for the fused ReLU of torch's
``QuantizedConvReLU2d`` (ReLU in the integer domain: the integer of 0.0 is z_out). Padding reads
the input zero point, so padded taps add nothing (qnnpack fills its "zero buffer" with z_x).
Only the requantization uses floats; this is exactly what torch's qnnpack engine computes
(``aten/src/ATen/native/quantized/cpu/qconv.cpp``, ``PackedConvWeightsQnnp``; kernels in
``qnnpack/src/q8conv``, ``q8gemm``, ``q8dwconv``). ``qlinear`` is the same with H = W = 1.

Fast versions: 1x1 and general convolutions run the integer sums through a float BLAS GEMM,
which is exact while every partial sum is an integer below 2**24 in float32 (2**53 in float64):
``_gemm_dtype`` checks the bound max_k sum_c |q_w - z_w| * max |q_x - z_x| per call and picks
float32 or float64. Depthwise sums at most kH*kW products (25 * 255 * 128 < 2**24 for k = 5),
so npmnv3's float32 depthwise kernel is exact too (float64 past that bound).
"""

from __future__ import annotations

import numpy as np

from ._checks import check_conv_geometry, check_positive_int, choose_impl
from .depthwise import depthwise_forward_fast
from .quantize import quantize_bias, requant_multipliers, requantize_fast, requantize_naive

FLOAT32_EXACT = 2 ** 24     # every integer of magnitude <= 2**24 is exact in float32


def _check_q(name, a, dtype, ndim):
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a numpy {np.dtype(dtype).name} array, got {got}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")


def _per_channel(name, v, K, dtype):
    v = np.asarray(v, dtype=dtype).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, K)
    if v.size != K:
        raise ValueError(f"{name} must be a scalar or have one value per output channel ({K}), "
                         f"got {v.size}")
    return v


def _prepare(qx, qw, w_scale, w_zp, bias, groups, stride, padding, dilation):
    _check_q("input", qx, np.uint8, 4)
    _check_q("weight", qw, np.int8, 4)
    groups = check_positive_int("groups", groups)
    N, C, H, W = qx.shape
    K, Cg = qw.shape[:2]
    if C % groups or K % groups or Cg != C // groups:
        raise ValueError(f"channel mismatch: input {qx.shape}, weight {qw.shape}, groups "
                         f"{groups} (weight must be (K, C/groups, kH, kW))")
    sw = _per_channel("weight scale", w_scale, K, np.float32)
    zw = _per_channel("weight zero point", w_zp, K, np.int64)
    b = np.zeros(K, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    if b.shape != (K,):
        raise ValueError(f"bias must have shape ({K},), got {b.shape}")
    Ho, Wo = check_conv_geometry(qx, qw.shape[2], qw.shape[3], stride, padding, dilation)
    return sw, zw, b, groups, Ho, Wo


# ----------------------------------------------------------------------------- naive

def qconv2d_naive(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, out_scale, out_zp, *, stride=1,
                  padding=0, dilation=1, groups=1, relu=False):
    """The formula: one shifted multiply-add per kernel tap, in int64, then requantize."""
    sw, zw, b, groups, Ho, Wo = _prepare(qx, qw, w_scale, w_zp, bias, groups, stride, padding,
                                         dilation)
    N, C = qx.shape[:2]
    K, Cg, kH, kW = qw.shape
    Kg = K // groups
    p = padding
    x = np.pad(qx.astype(np.int64) - int(x_zp), ((0, 0), (0, 0), (p, p), (p, p)))  # z_x -> 0
    w = qw.astype(np.int64) - zw[:, None, None, None]                    # (K, Cg, kH, kW)
    acc = np.zeros((N, K, Ho, Wo), np.int64)
    for k in range(K):
        g = k // Kg
        for u in range(kH):
            for v in range(kW):
                tap = x[:, g * Cg:(g + 1) * Cg,
                        u * dilation:u * dilation + stride * (Ho - 1) + 1:stride,
                        v * dilation:v * dilation + stride * (Wo - 1) + 1:stride]  # (N,Cg,Ho,Wo)
                acc[:, k] += np.tensordot(tap, w[k, :, u, v], axes=([1], [0]))
    M = requant_multipliers(x_scale, sw, out_scale, K)
    return requantize_naive(acc, M, out_zp, out_zp if relu else 0, 255,
                            bias=quantize_bias(b, x_scale, sw))


# ----------------------------------------------------------------------------- fast

def _gemm_dtype(wm, xmax):
    """float32 if every partial sum of W @ X is an exact float32 integer, else float64."""
    bound = float(np.abs(wm).sum(axis=1).max(initial=0)) * xmax
    return np.float32 if bound <= FLOAT32_EXACT else np.float64


def _centered(qx, x_zp):
    """q_x - z_x as int16 (N, C, H, W), and max |q_x - z_x|."""
    x = qx.astype(np.int16) - np.int16(x_zp)
    return x, int(max(x.max(initial=0), -int(x.min(initial=0))))


def _im2col(x, kH, kW, Ho, Wo, s, p, d):
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x       # (N, C, H+2p, W+2p)
    N, C = x.shape[:2]
    sN, sC, sH, sW = xp.strides
    win = np.lib.stride_tricks.as_strided(
        xp, (N, C, kH, kW, Ho, Wo), (sN, sC, sH * d, sW * d, sH * s, sW * s), writeable=False)
    return win.reshape(N, C * kH * kW, Ho * Wo)                         # (N, C*kH*kW, L) copy


def qconv2d_fast(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, out_scale, out_zp, *, stride=1,
                 padding=0, dilation=1, groups=1, relu=False):
    """Same contract as ``qconv2d_naive``: GEMM (1x1, general) or Numba (depthwise) sums."""
    sw, zw, b, groups, Ho, Wo = _prepare(qx, qw, w_scale, w_zp, bias, groups, stride, padding,
                                         dilation)
    N, C = qx.shape[:2]
    K, Cg, kH, kW = qw.shape
    x, xmax = _centered(qx, x_zp)
    wm = qw.astype(np.int16) - zw.astype(np.int16)[:, None, None, None]  # (K, Cg, kH, kW)
    if groups == C == K and groups > 1:                                   # depthwise
        # at most kH*kW products per sum (k <= 5: 25 * 255 * 128 < 2**24): float32 is exact;
        # float64 for anything wider
        t = np.float32 if kH * kW * xmax * int(np.abs(wm).max(initial=0)) <= FLOAT32_EXACT \
            else np.float64
        acc, _ = depthwise_forward_fast(x.astype(t), wm.astype(t), stride=stride,
                                        padding=padding, dilation=dilation)
    else:
        if kH == kW == 1 and stride == 1 and padding == 0:
            cols = x.reshape(N, C, -1)                                    # (N, C, H*W)
        else:
            cols = _im2col(x, kH, kW, Ho, Wo, stride, padding, dilation)  # (N, C*kH*kW, L)
        G, R = groups, Cg * kH * kW
        wg = wm.reshape(G, K // G, R)                                     # (G, Kg, R)
        t = _gemm_dtype(wm.reshape(K, R), xmax)
        cg = cols.reshape(N, G, R, -1).astype(t)                          # (N, G, R, L)
        acc = np.matmul(wg.astype(t), cg).reshape(N, K, Ho, Wo)           # exact integers
    qb = quantize_bias(b, x_scale, sw)
    M = requant_multipliers(x_scale, sw, out_scale, K)
    return requantize_fast(acc, M, out_zp, out_zp if relu else 0, 255, bias=qb)


def qconv2d(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, out_scale, out_zp, *, stride=1,
            padding=0, dilation=1, groups=1, relu=False, impl="fast"):
    """Quantized 2-D convolution (torch ``quantized::conv2d`` / ``conv2d_relu``, qnnpack).

    qx (N, C, H, W) uint8, qw (K, C/groups, kH, kW) int8, w_scale / w_zp scalars or (K,),
    bias (K,) float32 or None. Returns q_out (N, K, Ho, Wo) uint8 with (out_scale, out_zp).
    """
    f = choose_impl(impl, qconv2d_fast, qconv2d_naive)
    return f(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, out_scale, out_zp, stride=stride,
             padding=padding, dilation=dilation, groups=groups, relu=relu)


def qlinear(qx, x_scale, x_zp, qw, w_scale, w_zp, bias, out_scale, out_zp, *, relu=False,
            impl="fast"):
    """Quantized linear layer (torch ``quantized::linear``): qx (N, I) uint8, qw (O, I) int8,
    bias (O,) -> (N, O) uint8; the same sums and requantization as a 1x1 convolution."""
    _check_q("input", qx, np.uint8, 2)
    _check_q("weight", qw, np.int8, 2)
    y = qconv2d(qx[:, :, None, None], x_scale, x_zp, qw[:, :, None, None], w_scale, w_zp, bias,
                out_scale, out_zp, relu=relu, impl=impl)
    return y[:, :, 0, 0]
