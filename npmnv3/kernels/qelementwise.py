"""Quantized elementwise ops and pooling: hard-swish, hard-sigmoid, add, mul, average pooling.

All tensors are quint8 (uint8 q with scale s and zero point z: x ~ s (q - z)). Each op follows
torch's qnnpack engine bit for bit (``aten/src/ATen/native/quantized/cpu/qnnpack/src``):

hard-swish, hard-sigmoid (``hardswish.c``, ``hardsigmoid.c``): a 256-entry lookup table, one
entry per input integer, computed in float32:
    x = s_x (i - z_x);  h = x * min(max(x + 3, 0), 6) / 6        (hard-sigmoid: h = min(..)/6)
    table[i] = lrint(clamp(h * (1 / s_out) + z_out, 0, 255))
Hard-sigmoid always outputs scale 1/256 and zero point 0 (torch fixes its output qparams; qnnpack
supports nothing else), so its output integer is round(256 * gate) clamped to 255.

add (``add.c``, ``requantization.h``, ``q8vadd/sse2.c``): integer only. With
r_a = s_a / s_out and r_b = s_b / s_out (float32), the larger ratio sets a shift
e = 21 - exponent(max(r_a, r_b)) and integer multipliers m_a = lrint(r_a 2^e), m_b = lrint(r_b 2^e)
(the larger one in [2^21, 2^22)); then
    acc = m_a (q_a - z_a) + m_b (q_b - z_b)                        (int32)
    q_out = clamp((acc >> e, rounded half away from zero) + z_out, 0, 255)
qnnpack refuses ratios outside [2^-14, 2^8) and needs the larger one >= 2^-10 (e <= 31);
``qadd`` raises ValueError there.

mul (``QuantizedOpKernels.cpp``, ``qmul_kernel``; qnnpack has no quint8 multiply):
    q_out = clamp(lrintf(float32((q_a - z_a)(q_b - z_b)) * M) + z_out),  M = s_a s_b (1/s_out)

adaptive average pooling to 1 x 1 over P = H*W pixels (``average-pooling.c``, q8avgpool):
    q_out = clamp(round(float32(sum (q - z)) * (s_in / (s_out * P))) + z_out), s_out = s_in
(torch sends a 1 x 1 input to its generic kernel instead, ``_qadaptive_avg_pool_kernel``;
its factor 1 / (1 / (s_in / s_out / P)) is then exactly 1 as well).

``round`` is round-half-to-even everywhere except the add's shift.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import choose_impl

HARDSIGMOID_SCALE = 1.0 / 256      # torch: fixed output qparams of quantized hardsigmoid
HARDSIGMOID_ZERO_POINT = 0

f32 = np.float32


def _check_u8(name, a):
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a numpy uint8 (quint8) array, got {got}")


# ----------------------------------------------------------------------------- LUT activations

def _hardswish_f32(x):
    """torch/qnnpack's float32 hard-swish: x * min(max(x + 3, 0), 6) / 6, in that order."""
    return x * np.minimum(np.maximum(x + f32(3), f32(0)), f32(6)) / f32(6)


def _hardsigmoid_f32(x):
    return np.minimum(np.maximum(x + f32(3), f32(0)), f32(6)) / f32(6)


def _lut_values(act, q, x_scale, x_zp, out_scale, out_zp):
    """The table formula evaluated at the integers q (any shape)."""
    x = f32(x_scale) * (q.astype(np.int32) - np.int32(x_zp)).astype(f32)
    h = _hardswish_f32(x) if act == "hardswish" else _hardsigmoid_f32(x)
    y = (f32(1) / f32(out_scale)) * h + f32(out_zp)
    return np.rint(np.clip(y, f32(0), f32(255))).astype(np.uint8)


def activation_table(act, x_scale, x_zp, out_scale, out_zp):
    """The 256-entry uint8 table of ``act`` ("hardswish" | "hardsigmoid")."""
    return _lut_values(act, np.arange(256, dtype=np.uint8), x_scale, x_zp, out_scale, out_zp)


def qhardswish(qx, x_scale, x_zp, out_scale, out_zp, *, impl="fast"):
    """Quantized hard-swish (torch ``quantized::hardswish``). naive: the float32 formula per
    element; fast: the 256-entry table indexed by q (the same numbers: the table caches them)."""
    _check_u8("input", qx)
    if choose_impl(impl, False, True):
        return _lut_values("hardswish", qx, x_scale, x_zp, out_scale, out_zp)
    return activation_table("hardswish", x_scale, x_zp, out_scale, out_zp)[qx]


def qhardsigmoid(qx, x_scale, x_zp, *, impl="fast"):
    """Quantized hard-sigmoid (torch ``F.hardsigmoid`` on a quint8 tensor): output scale 1/256,
    zero point 0 (``HARDSIGMOID_SCALE``, ``HARDSIGMOID_ZERO_POINT``)."""
    _check_u8("input", qx)
    args = (x_scale, x_zp, HARDSIGMOID_SCALE, HARDSIGMOID_ZERO_POINT)
    if choose_impl(impl, False, True):
        return _lut_values("hardsigmoid", qx, *args)
    return activation_table("hardsigmoid", *args)[qx]


# ----------------------------------------------------------------------------- add

def add_params(a_scale, b_scale, out_scale):
    """qnnpack's integer add parameters (m_a, m_b, shift) for the given scales."""
    ra = f32(a_scale) / f32(out_scale)
    rb = f32(b_scale) / f32(out_scale)
    for name, r in (("first", ra), ("second", rb)):
        if not (2.0 ** -14 <= r < 2.0 ** 8):
            raise ValueError(f"quantized add: {name} input scale / output scale = {r:.7g} is "
                             f"outside qnnpack's supported range [2**-14, 2**8)")
    exponent = int(np.array(max(ra, rb), dtype=f32).view(np.uint32) >> 23) - 127
    shift = 21 - exponent
    if shift > 31:               # qnnpack asserts shift <= 31; release builds compute garbage
        raise ValueError(f"quantized add: the larger input-to-output scale ratio "
                         f"{max(ra, rb):.7g} is below 2**-10, where qnnpack's integer add "
                         f"is undefined (shift {shift} > 31)")
    mult = f32(2.0 ** shift)                                  # exact power of two
    return int(np.rint(ra * mult)), int(np.rint(rb * mult)), shift


def _check_add(qa, qb):
    _check_u8("first input", qa)
    _check_u8("second input", qb)
    if qa.shape != qb.shape:
        raise ValueError(f"quantized add needs equal shapes (qnnpack does not broadcast), got "
                         f"{qa.shape} and {qb.shape}")


def qadd_naive(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp):
    """q_out = clamp(round_half_away((m_a (q_a - z_a) + m_b (q_b - z_b)) / 2^e) + z_out)."""
    _check_add(qa, qb)
    ma, mb, e = add_params(a_scale, b_scale, out_scale)
    acc = ma * (qa.astype(np.int64) - a_zp) + mb * (qb.astype(np.int64) - b_zp)
    half = np.int64(1) << (e - 1)
    r = np.where(acc >= 0, (acc + half) >> e, -((-acc + half) >> e))     # half away from zero
    return np.clip(r + out_zp, 0, 255).astype(np.uint8)


def _qadd_loops(a, b, ma, mb, za, zb, e, zo, out):
    """The integer add over flat arrays (rounding as qnnpack's remainder trick)."""
    mask = (np.int32(1) << e) - np.int32(1)
    thr = mask >> 1
    for i in prange(a.size):
        acc = np.int32(ma * (np.int32(a[i]) - za) + mb * (np.int32(b[i]) - zb))
        rem = (acc & mask) - np.int32(acc < 0)
        r = (acc >> e) + np.int32(rem > thr) + zo
        out[i] = min(max(r, 0), 255)


_qadd = njit(cache=True, parallel=True)(_qadd_loops)


def qadd_fast(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp):
    """Numba version of ``qadd_naive`` (same contract)."""
    _check_add(qa, qb)
    ma, mb, e = add_params(a_scale, b_scale, out_scale)
    out = np.empty(qa.shape, np.uint8)
    _qadd(np.ascontiguousarray(qa).reshape(-1), np.ascontiguousarray(qb).reshape(-1),
          np.int32(ma), np.int32(mb), np.int32(a_zp), np.int32(b_zp), np.int32(e),
          np.int32(out_zp), out.reshape(-1))
    return out


def qadd(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp, *, impl="fast"):
    """Quantized residual add (torch ``quantized::add``, ``FloatFunctional.add``), qnnpack."""
    f = choose_impl(impl, qadd_fast, qadd_naive)
    return f(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp)


# ----------------------------------------------------------------------------- mul

def mul_multiplier(a_scale, b_scale, out_scale):
    return f32(a_scale) * f32(b_scale) * (f32(1) / f32(out_scale))


def qmul_naive(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp):
    """q_out = clamp(round(float32((q_a - z_a)(q_b - z_b)) * M) + z_out); broadcasts."""
    _check_u8("first input", qa)
    _check_u8("second input", qb)
    c = (qa.astype(np.int32) - np.int32(a_zp)) * (qb.astype(np.int32) - np.int32(b_zp))
    y = np.rint(c.astype(f32) * mul_multiplier(a_scale, b_scale, out_scale)) + out_zp
    return np.clip(y, 0, 255).astype(np.uint8)


def _qmul_planes_loops(g, x, gz, xz, M, zo, out):
    """out[p, t] = requant((g[p] - gz) * (x[p, t] - xz)): one gate value per plane (the SE
    multiply: a (N, C, 1, 1) gate times a (N, C, H, W) input)."""
    P, L = x.shape
    for p in prange(P):
        gp = np.int32(g[p]) - gz
        for t in range(L):
            v = np.float32(gp * (np.int32(x[p, t]) - xz)) * M
            r = np.rint(v) + zo
            out[p, t] = min(max(r, np.float32(0)), np.float32(255))


_qmul_planes = njit(cache=True, parallel=True)(_qmul_planes_loops)


def qmul_fast(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp):
    """``qmul_naive``; a Numba loop for the SE case (qa (N, C, 1, 1) times qb (N, C, H, W))."""
    _check_u8("first input", qa)
    _check_u8("second input", qb)
    if not (qa.ndim == qb.ndim == 4 and qa.shape[:2] == qb.shape[:2] and qa.shape[2:] == (1, 1)):
        return qmul_naive(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp)
    N, C, H, W = qb.shape
    out = np.empty(qb.shape, np.uint8)
    _qmul_planes(np.ascontiguousarray(qa).reshape(-1), np.ascontiguousarray(qb).reshape(N * C, -1),
                 np.int32(a_zp), np.int32(b_zp), mul_multiplier(a_scale, b_scale, out_scale),
                 f32(out_zp), out.reshape(N * C, -1))
    return out


def qmul(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp, *, impl="fast"):
    """Quantized multiply (torch ``quantized::mul``, ``FloatFunctional.mul``), broadcasting."""
    f = choose_impl(impl, qmul_fast, qmul_naive)
    return f(qa, a_scale, a_zp, qb, b_scale, b_zp, out_scale, out_zp)


# ----------------------------------------------------------------------------- average pool

def pool_multiplier(x_scale, out_scale, P):
    """qnnpack's float32 factor applied to sum (q - z) over P pixels."""
    return f32(x_scale) / (f32(out_scale) * f32(P))


def qadaptive_avgpool2d(qx, x_scale, x_zp, *, impl="fast"):
    """Quantized global average pooling (torch ``adaptive_avg_pool2d(q, 1)``), (N, C, H, W)
    uint8 -> (N, C, 1, 1) uint8 with the input's scale and zero point (torch keeps them)."""
    _check_u8("input", qx)
    if qx.ndim != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {qx.shape}")
    naive = choose_impl(impl, False, True)
    N, C, H, W = qx.shape
    P = H * W
    if naive:
        acc = (qx.astype(np.int64) - x_zp).sum(axis=(2, 3), keepdims=True)   # (N, C, 1, 1)
    else:
        acc = qx.reshape(N, C, P).sum(axis=2, dtype=np.int64, keepdims=True)[..., None] \
            - np.int64(x_zp) * P
    m = pool_multiplier(x_scale, x_scale, P)
    y = np.rint(acc.astype(np.int32).astype(f32) * m) + x_zp
    return np.clip(y, 0, 255).astype(np.uint8)
