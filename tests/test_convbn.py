"""conv_bn_act (the fused Conv-BN-Act kernel) vs torch, central differences, naive == fast."""

import numpy as np
import pytest
from support import assert_close, fd_check, randn, require_torch

from npmnv3.kernels import conv_bn_act_backward, conv_bn_act_forward

DTYPES = [np.float32, np.float64]
IMPLS = ("naive", "fast")
EPS, MOMENTUM = 1e-3, 0.01          # MobileNetV3's BatchNorm2d(eps=0.001, momentum=0.01)

# (kind, N, C, H, W, K, k, stride, padding, dilation, act): MobileNetV3's stem, expansions,
# projections and depthwise convs (3x3 / 5x5, stride 1 / 2, dilation 2), odd and non-square
# sizes, batch 1 and > 1, and a 1x1 output.
CASES = [
    ("conv", 2, 3, 9, 11, 5, 3, 2, 1, 1, "hardswish"),        # the stem
    ("conv", 1, 3, 7, 6, 4, 3, 1, 1, 1, None),
    ("pointwise", 3, 6, 5, 7, 9, 1, 1, 0, 1, "relu"),          # expansion
    ("pointwise", 2, 9, 4, 3, 5, 1, 1, 0, 1, None),            # projection
    ("pointwise", 4, 7, 1, 1, 6, 1, 1, 0, 1, "hardswish"),     # 1x1 maps
    ("depthwise", 2, 5, 9, 7, 5, 3, 2, 1, 1, "relu"),
    ("depthwise", 1, 6, 8, 9, 6, 5, 1, 2, 1, "hardswish"),
    ("depthwise", 3, 4, 7, 7, 4, 5, 2, 2, 1, None),
    ("depthwise", 2, 3, 6, 5, 3, 3, 1, 2, 2, "relu"),          # dilated
]
# stride 1 with >= FLAT_MAX_CHANNELS channels: the per-pixel channel loop, not the flat taps
WIDE = [("depthwise", 2, 128, 5, 6, 128, 3, 1, 1, 1, "hardswish")]


def make(rng, case, dtype):
    kind, N, C, H, W, K, k = case[:7]
    x = randn(rng, (N, C, H, W), dtype)
    w = randn(rng, (K, 1 if kind == "depthwise" else C, k, k), dtype, scale=0.5)
    bn = (randn(rng, (K,), dtype) * 0.3 + 1, randn(rng, (K,), dtype),
          randn(rng, (K,), dtype), rng.uniform(0.5, 2.0, K).astype(dtype))
    return x, w, bn


def kwargs(case, training):
    kind, *_, s, p, d, act = case
    return dict(kind=kind, stride=s, padding=p, dilation=d, act=act, training=training,
                momentum=MOMENTUM, eps=EPS, num_batches_tracked=3)


def torch_ref(torch, x, w, bn, case, training, dout):
    kind, *_, s, p, d, act = case
    F = torch.nn.functional
    xt, wt, gt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w) + bn[:2])
    rm, rv = (torch.from_numpy(a.copy()) for a in bn[2:])
    y = F.conv2d(xt, wt, stride=s, padding=p, dilation=d,
                 groups=x.shape[1] if kind == "depthwise" else 1)
    z = F.batch_norm(y, rm, rv, gt, bt, training=training, momentum=MOMENTUM, eps=EPS)
    z = {None: lambda t: t, "relu": F.relu, "hardswish": F.hardswish}[act](z)
    z.backward(torch.from_numpy(dout))
    return z, (xt.grad, wt.grad, gt.grad, bt.grad), (rm, rv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES + WIDE, ids=str)
def test_matches_torch(case, training, impl, dtype):
    """Output, dx, dW, dweight, dbias (random upstream gradient) and running statistics."""
    torch = require_torch()
    rng = np.random.default_rng(40)
    x, w, bn = make(rng, case, dtype)
    z, cache, stats = conv_bn_act_forward(x, w, *bn, impl=impl, **kwargs(case, training))
    dout = randn(rng, z.shape, dtype)
    zt, grads, (rm, rv) = torch_ref(torch, x, w, bn, case, training, dout)
    assert_close("out", z, zt, dtype)
    for name, ours, ref in zip(("dx", "dw", "dweight", "dbias"),
                               conv_bn_act_backward(dout, cache, impl=impl), grads):
        assert_close(name, ours, ref, dtype)
    assert_close("running_mean", stats.running_mean, rm, dtype)
    assert_close("running_var", stats.running_var, rv, dtype)
    assert stats.num_batches_tracked == (4 if training else 3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES[::2], ids=str)
def test_finite_differences(case, training):
    rng = np.random.default_rng(41)
    x, w, bn = make(rng, case, np.float64)
    kw = kwargs(case, training)
    z, cache, _ = conv_bn_act_forward(x, w, *bn, **kw)
    dout = rng.standard_normal(z.shape)
    grads = conv_bn_act_backward(dout, cache)

    def f(x, w, g, b):
        return conv_bn_act_forward(x, w, g, b, *bn[2:], **kw)[0]
    for i, name in enumerate(("dx", "dw", "dweight", "dbias")):
        fd_check(f"{case[0]} {name}", f, [x, w, *bn[:2]], i, grads[i], dout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_naive_equals_fast_and_caches_are_interchangeable(case, dtype):
    """Same values; either backward accepts either forward's cache; need_dx=False changes no
    other gradient (bitwise); keep_pre records batch norm's output and changes nothing."""
    rng = np.random.default_rng(42)
    x, w, bn = make(rng, case, dtype)
    kw = kwargs(case, True)
    zf, cf, sf = conv_bn_act_forward(x, w, *bn, keep_pre=True, **kw)
    zn, cn, sn = conv_bn_act_forward(x, w, *bn, impl="naive", **kw)
    assert_close("out", zf, zn, dtype)
    assert_close("pre", cf.bn.pre, cn.bn.pre, dtype)
    assert_close("running_var", sf.running_var, sn.running_var, dtype)
    dout = randn(rng, zf.shape, dtype)
    ref = conv_bn_act_backward(dout, cn, impl="naive")
    for cache in (cf, cn):
        for impl in IMPLS:
            for name, a, b in zip(("dx", "dw", "dweight", "dbias"),
                                  conv_bn_act_backward(dout, cache, impl=impl), ref):
                assert_close(f"{name} ({impl})", a, b, dtype)
    full = conv_bn_act_backward(dout, cf)
    part = conv_bn_act_backward(dout, cf, need_dx=False)
    assert part[0] is None
    for a, b in zip(full[1:], part[1:]):
        np.testing.assert_array_equal(a, b)
    z2, _, _ = conv_bn_act_forward(x, w, *bn, **kw)
    np.testing.assert_array_equal(z2, zf)


def test_fast_output_is_channels_last_and_inputs_are_untouched():
    """The fast kernel's arrays are NCHW-shaped views of channels-last memory (any input
    layout accepted); nothing it is given is modified."""
    rng = np.random.default_rng(43)
    case = CASES[5]
    x, w, bn = make(rng, case, np.float32)
    copies = [a.copy() for a in (x, w, *bn)]
    z, cache, _ = conv_bn_act_forward(x, w, *bn, **kwargs(case, True))
    assert z.shape == (2, 5, 5, 4) and z.transpose(0, 2, 3, 1).flags.c_contiguous
    z_again, _, _ = conv_bn_act_forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1))
                                        .transpose(0, 3, 1, 2), w, *bn, **kwargs(case, True))
    np.testing.assert_array_equal(z_again, z)            # channels-last input: same numbers
    dout = randn(rng, z.shape, np.float32)
    conv_bn_act_backward(dout, cache)
    for a, b in zip((x, w, *bn), copies):
        np.testing.assert_array_equal(a, b)


def test_bad_input():
    rng = np.random.default_rng(44)
    x, w, bn = make(rng, CASES[2], np.float64)
    with pytest.raises(ValueError, match="kind must be one of"):
        conv_bn_act_forward(x, w, *bn, **{**kwargs(CASES[2], True), "kind": "grouped"})
    with pytest.raises(ValueError, match="channel mismatch"):
        conv_bn_act_forward(x[:, :5], w, *bn, **kwargs(CASES[2], True))
    with pytest.raises(ValueError, match="act must be one of"):
        conv_bn_act_forward(x, w, *bn, **{**kwargs(CASES[2], True), "act": "gelu"})
    z, cache, _ = conv_bn_act_forward(x, w, *bn, **kwargs(CASES[2], True))
    with pytest.raises(ValueError, match="dout"):
        conv_bn_act_backward(z[:, :3], cache)
