"""int8 kernels against torch's quantized CPU ops on the qnnpack engine: every output integer equal.

Integer kernels have no tolerance: torch's result is a set of integers and ours must be the same
set. Inputs are random integers and scales; the float inputs of ``quantize`` sit on and around
the half-way points between two integers, where the rounding rule decides.
"""

from __future__ import annotations

import numpy as np
import pytest

from npmnv3 import kernels as K
from npmnv3.kernels.qconv import FLOAT32_EXACT, _gemm_dtype
from tests.support import require_torch

IMPLS = ("naive", "fast")


@pytest.fixture
def torch_qnnpack():
    torch = require_torch()
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    yield torch
    torch.backends.quantized.engine = old


def f32(v):
    return float(np.float32(v))


def rand_u8(rng, shape):
    return rng.integers(0, 256, shape).astype(np.uint8)


def tq(torch, q, scale, zp):
    """A torch quint8 tensor with our integers."""
    return torch._make_per_tensor_quantized_tensor(torch.from_numpy(q.copy()), scale, zp)


def assert_same(name, ours, ref):
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != torch {ref.shape}"
    diff = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    assert diff.max(initial=0) == 0, (f"{name}: {np.count_nonzero(diff)} of {diff.size} integers "
                                      f"differ from torch (max {diff.max()} steps)")


# ----------------------------------------------------------------------------- quantize

def test_quantize_dequantize_match_torch(torch_qnnpack):
    torch = torch_qnnpack
    rng = np.random.default_rng(0)
    for dtype, tdt in (("quint8", torch.quint8), ("qint8", torch.qint8)):
        for _ in range(20):
            s = f32(rng.uniform(1e-3, 0.1))
            z = int(rng.integers(0, 256)) if dtype == "quint8" else 0
            x = ((rng.integers(-300, 300, 2000) + 0.5) * np.float32(s)).astype(np.float32)
            x = (x + rng.integers(-2, 3, x.shape) * np.spacing(x)).astype(np.float32)  # ties
            ref = torch.quantize_per_tensor(torch.from_numpy(x), s, z, tdt)
            q = K.quantize_per_tensor(x, s, z, dtype)
            assert_same(f"quantize {dtype}", q, ref.int_repr().numpy())
            np.testing.assert_array_equal(K.dequantize(q, s, z), ref.dequantize().numpy())


def test_quantize_per_channel_and_bias_match_torch(torch_qnnpack):
    torch = torch_qnnpack
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    s = (np.abs(w).reshape(8, -1).max(1) / 127.5).astype(np.float32)
    ref = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(s).double(),
                                     torch.zeros(8, dtype=torch.long), 0, torch.qint8)
    assert_same("per-channel weight", K.quantize_per_channel(w, s, np.zeros(8), 0),
                ref.int_repr().numpy())
    b = (rng.standard_normal(8) * 3).astype(np.float32)
    sx = f32(0.0173)
    ref_b = torch.quantize_per_channel(torch.from_numpy(b), torch.from_numpy(s).double() * sx,
                                       torch.zeros(8, dtype=torch.long), 0, torch.qint32)
    assert_same("int32 bias", K.quantize_bias(b, sx, s), ref_b.int_repr().numpy())


def test_requantize_naive_equals_fast():
    """int32 sums (or exact integers in float32, from a GEMM) + int32 bias -> uint8, with and
    without the fused-ReLU floor, values spanning both clamps."""
    rng = np.random.default_rng(9)
    acc = rng.integers(-200_000, 200_000, (2, 6, 5, 3)).astype(np.int32)
    bias = rng.integers(-5000, 5000, 6).astype(np.int32)
    M = rng.uniform(1e-4, 2e-3, 6).astype(np.float32)
    for qmin in (0, 37):
        want = K.requantize(acc, M, 37, qmin, bias=bias, impl="naive")
        assert want.min() == qmin and want.max() == 255          # both clamps are reached
        for a in (acc, acc.astype(np.float32)):
            assert_same("requantize", K.requantize(a, M, 37, qmin, bias=bias), want)


# ----------------------------------------------------------------------------- conv / linear

CONVS = [  # C, K, k, stride, groups: MobileNetV3's stem, depthwise 3/5 at stride 1/2, 1x1
    (3, 16, 3, 2, 1), (16, 16, 3, 1, 16), (24, 24, 5, 2, 24), (40, 40, 5, 1, 40),
    (16, 64, 1, 1, 1), (72, 24, 1, 1, 1), (8, 12, 3, 1, 2)]


def torch_conv(torch, C, Kout, k, stride, groups, per_channel, relu, rng):
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    w = torch.from_numpy(rng.standard_normal((Kout, C // groups, k, k)).astype(np.float32) * 0.3)
    if per_channel:
        sw = (w.abs().amax(dim=(1, 2, 3)) / 127.5).float()
        qw = torch.quantize_per_channel(w, sw.double(), torch.zeros(Kout, dtype=torch.long), 0,
                                        torch.qint8)
        scales = sw.numpy()
    else:
        qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127.5, 0, torch.qint8)
        scales = np.float32(qw.q_scale())
    b = torch.from_numpy(rng.standard_normal(Kout).astype(np.float32) * 0.5)
    mod = (nniq.ConvReLU2d if relu else nnq.Conv2d)(C, Kout, k, stride=stride,
                                                    padding=(k - 1) // 2, groups=groups)
    mod.set_weight_bias(qw, b)
    mod.scale, mod.zero_point = f32(rng.uniform(0.02, 0.2)), int(rng.integers(0, 256))
    return mod, qw.int_repr().numpy(), scales, b.numpy()


@pytest.mark.parametrize("C,Kout,k,stride,groups", CONVS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_qconv2d_matches_torch(torch_qnnpack, C, Kout, k, stride, groups, per_channel):
    torch = torch_qnnpack
    rng = np.random.default_rng(C * 100 + Kout + k)
    for relu in (False, True):
        mod, qw, sw, b = torch_conv(torch, C, Kout, k, stride, groups, per_channel, relu, rng)
        sx, zx = f32(rng.uniform(0.01, 0.05)), int(rng.integers(0, 256))
        qx = rand_u8(rng, (2, C, 9, 7))                        # N > 1, H != W, odd sizes
        ref = mod(tq(torch, qx, sx, zx)).int_repr().numpy()
        for impl in IMPLS:
            ours = K.qconv2d(qx, sx, zx, qw, sw, 0, b, mod.scale, mod.zero_point,
                             stride=stride, padding=(k - 1) // 2, groups=groups, relu=relu,
                             impl=impl)
            assert_same(f"qconv2d {impl} relu={relu}", ours, ref)


def test_qconv2d_float64_gemm_when_float32_is_not_exact(torch_qnnpack):
    """Sums that leave float32's exact-integer range go through float64 and stay exact."""
    torch = torch_qnnpack
    import torch.ao.nn.quantized as nnq
    rng = np.random.default_rng(3)
    C = 700
    w = np.where(rng.random((4, C, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    qw = torch.quantize_per_tensor(torch.from_numpy(w), 1 / 127, 0, torch.qint8)  # all +-127
    qx = np.where(w[:1] > 0, 255, 0).astype(np.uint8).repeat(2, axis=0)           # extremes
    wm = qw.int_repr().numpy().astype(np.int16).reshape(4, C)
    assert _gemm_dtype(wm, 255) == np.float64 and 127 * 255 * C > FLOAT32_EXACT
    mod = nnq.Conv2d(C, 4, 1)
    mod.set_weight_bias(qw, None)
    mod.scale, mod.zero_point = 300.0, 128
    ref = mod(tq(torch, qx, 0.5, 0)).int_repr().numpy()
    for impl in IMPLS:
        ours = K.qconv2d(qx, 0.5, 0, qw.int_repr().numpy(), qw.q_scale(), 0, None, 300.0, 128,
                         impl=impl)
        assert_same(f"qconv2d {impl} wide sums", ours, ref)
    # depthwise: 23 x 23 taps of 255 * 127 pass 2**24 as well (3x3 and 5x5 never do)
    k = 23
    wd = np.where(rng.random((2, 1, k, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    qwd = torch.quantize_per_tensor(torch.from_numpy(wd), 1 / 127, 0, torch.qint8)
    xd = np.where(rng.random((1, 2, k, k)) < 0.5, 0, 255).astype(np.uint8)
    assert k * k * 255 * 127 > FLOAT32_EXACT
    mod = nnq.Conv2d(2, 2, k, groups=2)
    mod.set_weight_bias(qwd, None)
    mod.scale, mod.zero_point = 300.0, 128
    ref = mod(tq(torch, xd, 0.5, 0)).int_repr().numpy()
    for impl in IMPLS:
        ours = K.qconv2d(xd, 0.5, 0, qwd.int_repr().numpy(), qwd.q_scale(), 0, None, 300.0, 128,
                         groups=2, impl=impl)
        assert_same(f"depthwise {impl} wide sums", ours, ref)


def test_qlinear_matches_torch(torch_qnnpack):
    torch = torch_qnnpack
    import torch.ao.nn.quantized as nnq
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_normal((40, 96)).astype(np.float32) * 0.2)
    qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127.5, 0, torch.qint8)
    b = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    mod = nnq.Linear(96, 40)
    mod.set_weight_bias(qw, b)
    mod.scale, mod.zero_point = 0.07, 131
    qx = rand_u8(rng, (5, 96))
    ref = mod(tq(torch, qx, 0.02, 120)).int_repr().numpy()
    for impl in IMPLS:
        ours = K.qlinear(qx, 0.02, 120, qw.int_repr().numpy(), qw.q_scale(), 0, b.numpy(), 0.07,
                         131, impl=impl)
        assert_same(f"qlinear {impl}", ours, ref)


# ----------------------------------------------------------------------------- elementwise

def test_qhardswish_and_qhardsigmoid_match_torch(torch_qnnpack):
    torch = torch_qnnpack
    rng = np.random.default_rng(5)
    q = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8)            # every input integer
    for _ in range(50):
        si, so = f32(rng.uniform(0.005, 0.1)), f32(rng.uniform(0.005, 0.1))
        zi, zo = (int(v) for v in rng.integers(0, 256, 2))
        ref = torch.ops.quantized.hardswish(tq(torch, q, si, zi), so, zo).int_repr().numpy()
        sig = torch.nn.functional.hardsigmoid(tq(torch, q, si, zi))
        assert (sig.q_scale(), sig.q_zero_point()) == (K.HARDSIGMOID_SCALE,
                                                       K.HARDSIGMOID_ZERO_POINT)
        for impl in IMPLS:
            assert_same(f"qhardswish {impl}", K.qhardswish(q, si, zi, so, zo, impl=impl), ref)
            assert_same(f"qhardsigmoid {impl}", K.qhardsigmoid(q, si, zi, impl=impl),
                        sig.int_repr().numpy())


def test_qadd_matches_torch(torch_qnnpack):
    torch = torch_qnnpack
    rng = np.random.default_rng(6)
    for t in range(60):
        sa, sb, so = (f32(v) for v in rng.uniform(0.005, 0.1, 3))
        if t < 4:                 # ratio ends: shift 31, 2**8 - eps, b at 2**-14 (shift 21)
            sa, sb, so = [(1.0, 0.3, 1024.0), (0.1, 0.05, 0.1 / 255), (0.1, 2.0 ** -14, 1.0),
                          (0.07, 0.06, 0.069)][t]
        za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
        qa, qb = rand_u8(rng, (2, 8, 5, 7)), rand_u8(rng, (2, 8, 5, 7))
        ref = torch.ops.quantized.add(tq(torch, qa, sa, za), tq(torch, qb, sb, zb), so, zo)
        for impl in IMPLS:
            assert_same(f"qadd {impl} case {t}", K.qadd(qa, sa, za, qb, sb, zb, so, zo,
                                                        impl=impl), ref.int_repr().numpy())


def test_qmul_matches_torch(torch_qnnpack):
    torch = torch_qnnpack
    rng = np.random.default_rng(7)
    for t in range(30):
        sa, sb, so = (f32(v) for v in rng.uniform(0.003, 0.08, 3))
        sa = K.HARDSIGMOID_SCALE if t % 2 else sa                    # the SE gate's scale
        za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
        shape_a = (2, 8, 1, 1) if t < 20 else (2, 8, 5, 7)           # SE broadcast, same shape
        qa, qb = rand_u8(rng, shape_a), rand_u8(rng, (2, 8, 5, 7))
        ref = torch.ops.quantized.mul(tq(torch, qa, sa, za), tq(torch, qb, sb, zb), so, zo)
        for impl in IMPLS:
            assert_same(f"qmul {impl} case {t}", K.qmul(qa, sa, za, qb, sb, zb, so, zo,
                                                        impl=impl), ref.int_repr().numpy())


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (7, 7), (14, 14)])
def test_qadaptive_avgpool2d_matches_torch(torch_qnnpack, hw):
    torch = torch_qnnpack
    rng = np.random.default_rng(8)
    for t in range(10):
        s, z = f32(rng.uniform(0.01, 0.1)), int(rng.integers(0, 256))
        qx = rand_u8(rng, (2, 24) + hw)
        x = tq(torch, qx, s, z)
        if t % 2:
            x = x.contiguous(memory_format=torch.channels_last)     # as torch's convs return
        ref = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        assert (ref.q_scale(), ref.q_zero_point()) == (s, z)
        for impl in IMPLS:
            assert_same(f"avgpool {impl}", K.qadaptive_avgpool2d(qx, s, z, impl=impl),
                        ref.int_repr().numpy())


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_refused():
    q = np.zeros((1, 2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        K.qhardswish(q.astype(np.int8), 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="int8"):
        K.qconv2d(q, 0.1, 0, np.zeros((2, 2, 1, 1), np.uint8), 0.1, 0, None, 0.1, 0)
    with pytest.raises(ValueError, match="one value per output channel"):
        K.qconv2d(q, 0.1, 0, np.zeros((2, 2, 1, 1), np.int8), [0.1, 0.2, 0.3], 0, None, 0.1, 0)
    with pytest.raises(ValueError, match=r"\[2\*\*-14, 2\*\*8\)"):
        K.qadd(q, 1.0, 0, q, 1.0, 0, 1e-3, 0)
    with pytest.raises(ValueError, match="undefined"):
        K.qadd(q, 1.0, 0, q, 1.0, 0, 2.0 ** 11, 0)
    with pytest.raises(ValueError, match="equal shapes"):
        K.qadd(q, 0.1, 0, q[:, :1], 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="positive"):
        K.quantize_per_tensor(np.zeros(3, np.float32), 0.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        K.quantize_per_tensor(np.zeros(3, np.float32), 0.1, 0, "quint4")
