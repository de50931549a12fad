"""conv2d (general), pointwise 1x1 and depthwise convolution against torch, FD, naive vs fast."""

import numpy as np
import pytest
from support import assert_close, fd_check, randn, require_torch

from npmnv3.kernels import (
    conv2d_backward,
    conv2d_forward,
    depthwise_backward,
    depthwise_forward,
    pointwise_backward,
    pointwise_forward,
)
from npmnv3.kernels.channels_last_conv import FLAT_MAX_CHANNELS, flat_taps

DTYPES = [np.float32, np.float64]
IMPLS = ("naive", "fast")

# (N, C, H, W, K, k, stride, padding, dilation, groups, bias): the MobileNetV3 stem, odd and
# non-square sizes, batch 1 and > 1, dilation, grouped, padding 0, 1x1.
CONV_CASES = [
    (2, 3, 9, 11, 4, 3, 2, 1, 1, 1, False),     # the stem: 3x3 stride 2 pad 1, no bias
    (1, 3, 8, 8, 5, 3, 2, 1, 1, 1, True),
    (3, 4, 7, 5, 6, 3, 1, 1, 1, 1, True),
    (2, 4, 10, 9, 4, 3, 1, 2, 2, 1, False),     # dilation 2
    (2, 6, 9, 7, 4, 5, 2, 2, 1, 2, True),       # groups 2
    (1, 5, 6, 9, 3, 1, 1, 0, 1, 1, True),       # 1x1 through the general path
    (2, 3, 5, 6, 2, 3, 1, 0, 1, 1, False),      # padding 0
    (2, 4, 6, 5, 4, 3, 1, 1, 1, 4, True),       # depthwise through conv2d
]


def torch_conv(torch, x, w, b, stride, padding, dilation, groups, dout):
    ts = [torch.from_numpy(a.copy()).requires_grad_() if a is not None else None
          for a in (x, w, b)]
    y = torch.nn.functional.conv2d(ts[0], ts[1], ts[2], stride=stride, padding=padding,
                                   dilation=dilation, groups=groups)
    y.backward(torch.from_numpy(dout))
    return y, [t.grad if t is not None else None for t in ts]


def make(rng, case, dtype):
    N, C, H, W, K, k, s, p, d, g, bias = case
    x = randn(rng, (N, C, H, W), dtype)
    w = randn(rng, (K, C // g, k, k), dtype, scale=0.5)
    b = randn(rng, (K,), dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_matches_torch(case, impl, dtype):
    torch = require_torch()
    rng = np.random.default_rng(10)
    x, w, b = make(rng, case, dtype)
    s, p, d, g = case[6:10]
    out, cache = conv2d_forward(x, w, b, stride=s, padding=p, dilation=d, groups=g, impl=impl)
    dout = randn(rng, out.shape, dtype)
    ref, grads = torch_conv(torch, x, w, b, s, p, d, g, dout)
    assert_close("out", out, ref, dtype)
    dx, dw, db = conv2d_backward(dout, cache, impl=impl)
    assert_close("dx", dx, grads[0], dtype)
    assert_close("dw", dw, grads[1], dtype)
    if b is None:
        assert db is None
    else:
        assert_close("db", db, grads[2], dtype)


@pytest.mark.parametrize("case", CONV_CASES[:5], ids=str)
def test_conv2d_finite_differences(case):
    rng = np.random.default_rng(11)
    case = (1,) + case[1:2] + (min(case[2], 6), min(case[3], 5)) + case[4:]
    x, w, b = make(rng, case, np.float64)
    s, p, d, g = case[6:10]
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    out, cache = conv2d_forward(x, w, b, **kw)
    dout = rng.standard_normal(out.shape)
    grads = conv2d_backward(dout, cache)
    args = [x, w, b]
    for i, name in enumerate(("dx", "dw", "db")):
        if args[i] is None:
            continue
        fd_check(f"conv2d {name}", lambda *a: conv2d_forward(*a, **kw), args, i, grads[i], dout)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_naive_equals_fast(case):
    rng = np.random.default_rng(12)
    x, w, b = make(rng, case, np.float64)
    s, p, d, g = case[6:10]
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    y1, c1 = conv2d_forward(x, w, b, impl="naive", **kw)
    y2, c2 = conv2d_forward(x, w, b, impl="fast", **kw)
    assert_close("out", y2, y1, np.float64)
    dout = rng.standard_normal(y1.shape)
    for name, a1, a2 in zip(("dx", "dw", "db"), conv2d_backward(dout, c1, impl="naive"),
                            conv2d_backward(dout, c2, impl="fast")):
        if a1 is None:
            assert a2 is None
        else:
            assert_close(name, a2, a1, np.float64)


@pytest.mark.parametrize("impl", ["naive", "fast"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_backward_without_dx(case, impl):
    """need_dx=False: dx is None, dw and db are exactly those of the full backward."""
    rng = np.random.default_rng(13)
    x, w, b = make(rng, case, np.float64)
    s, p, d, g = case[6:10]
    y, c = conv2d_forward(x, w, b, stride=s, padding=p, dilation=d, groups=g, impl=impl)
    dout = rng.standard_normal(y.shape)
    _, dw, db = conv2d_backward(dout, c, impl=impl)
    dx2, dw2, db2 = conv2d_backward(dout, c, impl=impl, need_dx=False)
    assert dx2 is None
    np.testing.assert_array_equal(dw2, dw)
    assert (db2 is None) == (db is None)
    if db is not None:
        np.testing.assert_array_equal(db2, db)


# ----------------------------------------------------------------------------- pointwise

PW_CASES = [(1, 16, 7, 9, 24, True), (3, 24, 5, 4, 72, False), (2, 8, 1, 1, 16, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PW_CASES, ids=str)
def test_pointwise_matches_torch(case, impl, dtype):
    torch = require_torch()
    N, C, H, W, K, bias = case
    rng = np.random.default_rng(13)
    x = randn(rng, (N, C, H, W), dtype)
    w = randn(rng, (K, C, 1, 1), dtype, scale=0.3)
    b = randn(rng, (K,), dtype) if bias else None
    out, cache = pointwise_forward(x, w, b, impl=impl)
    dout = randn(rng, out.shape, dtype)
    ref, grads = torch_conv(torch, x, w, b, 1, 0, 1, 1, dout)
    assert_close("out", out, ref, dtype)
    dx, dw, db = pointwise_backward(dout, cache, impl=impl)
    assert_close("dx", dx, grads[0], dtype)
    assert_close("dw", dw, grads[1], dtype)
    if bias:
        assert_close("db", db, grads[2], dtype)
    else:
        assert db is None


def test_pointwise_finite_differences_and_naive_equals_fast():
    rng = np.random.default_rng(14)
    x, w, b = rng.standard_normal((2, 5, 3, 4)), rng.standard_normal((6, 5, 1, 1)), \
        rng.standard_normal(6)
    out, cache = pointwise_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    grads = pointwise_backward(dout, cache)
    for i, name in enumerate(("dx", "dw", "db")):
        fd_check(f"pointwise {name}", pointwise_forward, [x, w, b], i, grads[i], dout)
    y1, c1 = pointwise_forward(x, w, b, impl="naive")
    assert_close("out", out, y1, np.float64)
    for name, a1, a2 in zip("xwb", pointwise_backward(dout, c1, impl="naive"), grads):
        assert_close(f"d{name}", a2, a1, np.float64)


# ----------------------------------------------------------------------------- depthwise

# Every kernel/stride/dilation combination MobileNetV3 uses (plus dilation with stride 2),
# batch 1 and 3, odd and non-square sizes; padding follows torchvision: (k - 1) // 2 * d.
DW_CASES = [(N, H, W, k, s, d) for (N, H, W) in [(1, 9, 9), (3, 11, 8)]
            for k in (3, 5) for s in (1, 2) for d in (1, 2)]


def dw_make(rng, N, H, W, k, dtype, C=6, bias=False):
    x = randn(rng, (N, C, H, W), dtype)
    w = randn(rng, (C, 1, k, k), dtype, scale=0.5)
    b = randn(rng, (C,), dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DW_CASES, ids=str)
def test_depthwise_matches_torch(case, impl, dtype):
    torch = require_torch()
    N, H, W, k, s, d = case
    p = (k - 1) // 2 * d
    rng = np.random.default_rng(15)
    x, w, b = dw_make(rng, N, H, W, k, dtype, bias=(s == 1))
    out, cache = depthwise_forward(x, w, b, stride=s, padding=p, dilation=d, impl=impl)
    dout = randn(rng, out.shape, dtype)
    ref, grads = torch_conv(torch, x, w, b, s, p, d, x.shape[1], dout)
    assert_close("out", out, ref, dtype)
    dx, dw, db = depthwise_backward(dout, cache, impl=impl)
    assert_close("dx", dx, grads[0], dtype)
    assert_close("dw", dw, grads[1], dtype)
    if b is not None:
        assert_close("db", db, grads[2], dtype)
    else:
        assert db is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [FLAT_MAX_CHANNELS - 1, FLAT_MAX_CHANNELS])
def test_depthwise_both_stride1_loops_match_torch(C, dtype):
    """Stride 1 runs flat taps over whole rows below FLAT_MAX_CHANNELS channels, the per-pixel
    channel loop from there on (DW_CASES have 6 channels): both against torch and naive."""
    torch = require_torch()
    assert flat_taps((3, 1, 1, 1), C) == (C < FLAT_MAX_CHANNELS)
    rng = np.random.default_rng(17)
    x, w, b = dw_make(rng, 2, 5, 6, 3, dtype, C=C, bias=True)
    out, cache = depthwise_forward(x, w, b, padding=1)
    dout = randn(rng, out.shape, dtype)
    ref, grads = torch_conv(torch, x, w, b, 1, 1, 1, C, dout)
    assert_close("out", out, ref, dtype)
    fast = depthwise_backward(dout, cache)
    for name, a, r in zip(("dx", "dw", "db"), fast, grads):
        assert_close(name, a, r, dtype)
    naive_out, naive_cache = depthwise_forward(x, w, b, padding=1, impl="naive")
    assert_close("out vs naive", out, naive_out, dtype)
    for name, a, r in zip(("dx", "dw", "db"), fast, depthwise_backward(dout, naive_cache,
                                                                        impl="naive")):
        assert_close(f"{name} vs naive", a, r, dtype)


@pytest.mark.parametrize("case", DW_CASES, ids=str)
def test_depthwise_equals_grouped_conv2d_and_naive(case):
    N, H, W, k, s, d = case
    p = (k - 1) // 2 * d
    rng = np.random.default_rng(16)
    x, w, b = dw_make(rng, N, H, W, k, np.float64, bias=True)
    kw = dict(stride=s, padding=p, dilation=d)
    ref, cref = conv2d_forward(x, w, b, groups=x.shape[1], **kw)
    dout = rng.standard_normal(ref.shape)
    gref = conv2d_backward(dout, cref)
    for impl in IMPLS:
        out, cache = depthwise_forward(x, w, b, impl=impl, **kw)
        assert_close(f"{impl} out", out, ref, np.float64)
        for name, a, r in zip(("dx", "dw", "db"), depthwise_backward(dout, cache, impl=impl),
                              gref):
            assert_close(f"{impl} {name}", a, r, np.float64)


@pytest.mark.parametrize("case", [c for c in DW_CASES if c[0] == 1], ids=str)
def test_depthwise_finite_differences(case):
    N, H, W, k, s, d = case
    p = (k - 1) // 2 * d
    rng = np.random.default_rng(17)
    x, w, b = dw_make(rng, N, H, W, k, np.float64, C=3, bias=True)
    kw = dict(stride=s, padding=p, dilation=d)
    out, cache = depthwise_forward(x, w, b, **kw)
    dout = rng.standard_normal(out.shape)
    grads = depthwise_backward(dout, cache)
    for i, name in enumerate(("dx", "dw", "db")):
        fd_check(f"depthwise {name}", lambda *a: depthwise_forward(*a, **kw), [x, w, b], i,
                 grads[i], dout)


def test_depthwise_non_contiguous_input():
    rng = np.random.default_rng(18)
    base = rng.standard_normal((2, 8, 9, 10)).astype(np.float32)
    x = base[:, ::2, :, 1:]                               # strided view (2, 4, 9, 9)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    y1, _ = depthwise_forward(x, w, padding=1, impl="naive")
    y2, _ = depthwise_forward(x, w, padding=1, impl="fast")
    assert_close("out", y2, y1, np.float32)


# ----------------------------------------------------------------------------- bad input

def test_conv_bad_input_names_the_argument():
    x = np.zeros((1, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    cases = [
        (lambda: conv2d_forward(x[0], w), "x must have 4 dimensions"),
        (lambda: conv2d_forward(x, w[:, :2]), "channel mismatch"),
        (lambda: conv2d_forward(x.astype(np.int32), w), "float32 or float64"),
        (lambda: conv2d_forward(x.astype(object), w), "float32 or float64"),
        (lambda: conv2d_forward(x, w.astype(np.float64)), "dtype"),
        (lambda: conv2d_forward(x, w, stride=0), "stride"),
        (lambda: conv2d_forward(x, w, padding=-1), "padding"),
        (lambda: conv2d_forward(x, w, dilation=0), "dilation"),
        (lambda: conv2d_forward(x, w, stride=1.5), "stride"),
        (lambda: conv2d_forward(x[:, :, :2, :2], w), "smaller than the dilated kernel"),
        (lambda: conv2d_forward(x, w, dilation=4), "smaller than the dilated kernel"),
        (lambda: conv2d_forward(x, w, np.zeros(3, np.float32)), "bias"),
        (lambda: conv2d_forward(x, w, groups=2), "divisible by groups"),
        (lambda: pointwise_forward(x, np.zeros((4, 5, 1, 1), np.float32)), "channel mismatch"),
        (lambda: pointwise_forward(x, w), r"\(K, C, 1, 1\)"),
        (lambda: depthwise_forward(x, np.zeros((4, 1, 3, 3), np.float32)), "channel mismatch"),
        (lambda: depthwise_forward(x, np.zeros((3, 1, 9, 9), np.float32)), "smaller than"),
        (lambda: depthwise_forward(x, np.zeros((3, 1, 3, 3), np.float32), impl="gpu"), "impl"),
        (lambda: depthwise_forward([[1.0]], np.zeros((3, 1, 3, 3))), "ndarray"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_conv_backward_rejects_wrong_dout():
    x = np.zeros((1, 3, 8, 8))
    _, cache = conv2d_forward(x, np.zeros((4, 3, 3, 3)), padding=1)
    with pytest.raises(ValueError, match="dout must have shape"):
        conv2d_backward(np.zeros((1, 4, 7, 8)), cache)
    _, cache = depthwise_forward(x, np.zeros((3, 1, 3, 3)), padding=1)
    with pytest.raises(ValueError, match="dout must have shape"):
        depthwise_backward(np.zeros((1, 3, 8, 7)), cache)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_never_modify_their_inputs(impl):
    rng = np.random.default_rng(19)
    x, w, b = dw_make(rng, 2, 7, 6, 3, np.float64, bias=True)
    wc = rng.standard_normal((5, 6, 3, 3))
    keep = [a.copy() for a in (x, w, b, wc)]
    calls = [
        lambda: conv2d_forward(x, wc, b[:5], stride=2, padding=1, impl=impl),
        lambda: depthwise_forward(x, w, b, padding=1, impl=impl),
        lambda: pointwise_forward(x, wc[:, :, :1, :1], b[:5], impl=impl),
    ]
    backs = [conv2d_backward, depthwise_backward, pointwise_backward]
    for fwd, back in zip(calls, backs):
        out, cache = fwd()
        dout = rng.standard_normal(out.shape)
        dkeep = dout.copy()
        back(dout, cache, impl=impl)
        np.testing.assert_array_equal(dout, dkeep)
    for a, k in zip((x, w, b, wc), keep):
        np.testing.assert_array_equal(a, k)
