"""Batch norm, train and eval mode: outputs, every gradient, running statistics, vs torch."""

import numpy as np
import pytest
from support import assert_close, fd_check, randn, require_torch

from npmnv3.kernels import (
    activation_backward,
    activation_forward,
    batchnorm_act_backward,
    batchnorm_act_forward,
    batchnorm_backward,
    batchnorm_forward,
)

DTYPES = [np.float32, np.float64]
IMPLS = ("naive", "fast")
SHAPES = [(1, 4, 5, 7), (3, 5, 6, 6), (4, 3, 1, 1), (2, 6, 9, 4)]
EPS, MOMENTUM = 1e-3, 0.01          # MobileNetV3's BatchNorm2d(eps=0.001, momentum=0.01)


def params(rng, C, dtype):
    """Non-trivial affine parameters and running statistics: identity BN hides bugs."""
    return (randn(rng, (C,), dtype) + 1, randn(rng, (C,), dtype),
            randn(rng, (C,), dtype), rng.uniform(0.5, 2.0, C).astype(dtype))


PLAIN = "batchnorm"          # batchnorm_*; the other values are batchnorm_act_*'s act


def _torch_act(torch, act, y):
    F = torch.nn.functional
    return {PLAIN: lambda t: t, None: lambda t: t, "relu": F.relu,
            "hardswish": F.hardswish}[act](y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", [PLAIN, None, "relu", "hardswish"], ids=str)
def test_matches_torch(act, shape, training, impl, dtype):
    """batchnorm_* (PLAIN) and batchnorm_act_* (BN + activation) vs torch's F.batch_norm (+
    F.relu / F.hardswish): output, every gradient, running statistics."""
    torch = require_torch()
    rng = np.random.default_rng(20)
    x = randn(rng, shape, dtype, scale=2) + dtype(0.5)
    w, b, rm, rv = params(rng, shape[1], dtype)
    kw = dict(training=training, eps=EPS, momentum=MOMENTUM, num_batches_tracked=7, impl=impl)
    if act == PLAIN:
        out, cache, stats = batchnorm_forward(x, w, b, rm, rv, **kw)
    else:
        out, cache, stats = batchnorm_act_forward(x, w, b, rm, rv, act=act, **kw)
    dout = randn(rng, shape, dtype)                   # random: ones would make dx vanish
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = _torch_act(torch, act, torch.nn.functional.batch_norm(
        xt, rmt, rvt, wt, bt, training=training, momentum=MOMENTUM, eps=EPS))
    yt.backward(torch.from_numpy(dout))
    assert_close("out", out, yt, dtype)
    back = batchnorm_backward if act == PLAIN else batchnorm_act_backward
    dx, dw, db = back(dout, cache, impl=impl)
    assert_close("dx", dx, xt.grad, dtype)
    assert_close("dweight", dw, wt.grad, dtype)
    assert_close("dbias", db, bt.grad, dtype)
    assert_close("running_mean", stats.running_mean, rmt, dtype)
    assert_close("running_var", stats.running_var, rvt, dtype)
    assert stats.num_batches_tracked == (8 if training else 7)
    # The cache holds the statistics backward needs: batch (train) or running (eval).
    bn = cache if act == PLAIN else cache.bn
    if training:
        assert_close("cache.mean", bn.mean, x.mean(axis=(0, 2, 3)), dtype)
        assert_close("cache.rstd", bn.rstd, 1 / np.sqrt(x.var(axis=(0, 2, 3)) + EPS), dtype)
    else:
        np.testing.assert_array_equal(bn.mean, rm)


def test_eval_forward_is_bit_identical_to_torch_in_float32():
    """torch's CPU eval kernel: alpha = w / sqrt(var + eps), beta = fma(-mean, alpha, b),
    y = fma(x, alpha, beta)."""
    torch = require_torch()
    rng = np.random.default_rng(21)
    x = randn(rng, (4, 32, 14, 14), np.float32, scale=3)
    w, b, rm, rv = params(rng, 32, np.float32)
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.from_numpy(rm),
                                         torch.from_numpy(rv), torch.from_numpy(w),
                                         torch.from_numpy(b), training=False, eps=EPS).numpy()
    for impl in IMPLS:
        out, _, _ = batchnorm_forward(x, w, b, rm, rv, training=False, eps=EPS, impl=impl)
        frac = np.mean(out != ref)
        # fma is emulated with one float64 rounding then a float32 rounding: double rounding
        # may differ in the last bit on rare ties; allow at most 0.1 % of elements, 1 ulp.
        assert frac <= 1e-3, f"{impl}: {frac:.2%} of elements differ from torch"
        np.testing.assert_array_max_ulp(out, ref, maxulp=1)


@pytest.mark.parametrize("momentum", [0.01, 0.1, None])
@pytest.mark.parametrize("impl", IMPLS)
def test_running_statistics_after_train_steps_equal_torch(impl, momentum):
    """k train steps of nn.BatchNorm2d: running_mean, running_var (unbiased) and
    num_batches_tracked equal ours; momentum=None is torch's cumulative average."""
    torch = require_torch()
    rng = np.random.default_rng(22)
    C = 5
    bn = torch.nn.BatchNorm2d(C, eps=EPS, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.standard_normal(C) + 1))
        bn.bias.copy_(torch.from_numpy(rng.standard_normal(C)))
    bn.train()
    w, b = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    rm, rv, nbt = np.zeros(C), np.ones(C), 0
    for step in range(4):
        x = rng.standard_normal((3, C, 4 + step, 5)) * (step + 1) + step
        yt = bn(torch.from_numpy(x))
        out, _, stats = batchnorm_forward(x, w, b, rm, rv, training=True, eps=EPS,
                                          momentum=momentum, num_batches_tracked=nbt, impl=impl)
        rm, rv, nbt = stats
        assert_close(f"step {step} out", out, yt, np.float64)
    assert_close("running_mean", rm, bn.running_mean, np.float64)
    assert_close("running_var", rv, bn.running_var, np.float64)
    assert nbt == bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_finite_differences(training):
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
    w, b, rm, rv = params(rng, 3, np.float64)
    kw = dict(training=training, eps=EPS, momentum=MOMENTUM)
    out, cache, _ = batchnorm_forward(x, w, b, rm, rv, **kw)
    dout = rng.standard_normal(out.shape)
    grads = batchnorm_backward(dout, cache)
    for i, name in enumerate(("dx", "dweight", "dbias")):
        fd_check(f"batchnorm {name}", lambda *a: batchnorm_forward(*a, **kw)[0],
                 [x, w, b, rm, rv], i, grads[i], dout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_naive_equals_fast(training, dtype):
    rng = np.random.default_rng(24)
    x = randn(rng, (3, 6, 7, 5), dtype, scale=3)
    w, b, rm, rv = params(rng, 6, dtype)
    dout = randn(rng, x.shape, dtype)
    kw = dict(training=training, eps=EPS, momentum=MOMENTUM)
    y1, c1, s1 = batchnorm_forward(x, w, b, rm, rv, impl="naive", **kw)
    y2, c2, s2 = batchnorm_forward(x, w, b, rm, rv, impl="fast", **kw)
    assert_close("out", y2, y1, dtype)
    assert_close("running_mean", s2.running_mean, s1.running_mean, dtype)
    assert_close("running_var", s2.running_var, s1.running_var, dtype)
    for name, a1, a2 in zip(("dx", "dw", "db"), batchnorm_backward(dout, c1, impl="naive"),
                            batchnorm_backward(dout, c2, impl="fast")):
        assert_close(name, a2, a1, dtype)


def test_inputs_untouched_and_no_running_stats():
    rng = np.random.default_rng(25)
    x = rng.standard_normal((2, 3, 4, 4))
    w, b, rm, rv = params(rng, 3, np.float64)
    keep = [a.copy() for a in (x, w, b, rm, rv)]
    for impl in IMPLS:
        out, cache, stats = batchnorm_forward(x, w, b, rm, rv, training=True, impl=impl)
        batchnorm_backward(rng.standard_normal(out.shape), cache, impl=impl)
        _, _, none_stats = batchnorm_forward(x, w, b, None, None, training=True, impl=impl)
        assert none_stats.running_mean is None and none_stats.num_batches_tracked == 1
    for a, k in zip((x, w, b, rm, rv), keep):
        np.testing.assert_array_equal(a, k)


def test_bad_input():
    x = np.zeros((2, 3, 4, 4))
    ok = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        batchnorm_forward(x[0], *ok, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        batchnorm_forward(x, np.ones(4), *ok[1:], training=True)
    with pytest.raises(ValueError, match="running_var is required"):
        batchnorm_forward(x, *ok[:3], None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batchnorm_forward(x[:1, :, :1, :1], *ok, training=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        batchnorm_forward(x.astype(np.int64), *ok, training=True)
    with pytest.raises(ValueError, match="dtype"):
        batchnorm_forward(x.astype(np.float32), *ok, training=True)


# ----------------------------------------------------------------------------- batch norm + act
# batchnorm_act_*: act(batch_norm(x)) in one kernel, the tail of every Conv-BN-Act.

BN_ACTS = [None, "relu", "hardswish"]          # (batchnorm_act vs torch: test_matches_torch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", BN_ACTS, ids=str)
def test_bn_act_fast_is_bitwise_bn_then_act(act, training, dtype):
    """The fused fast kernel gives exactly the numbers of the two fast kernels in sequence,
    including values that sit on the activation's kinks (0 for ReLU, +-3 for hard-swish)."""
    rng = np.random.default_rng(27)
    x = randn(rng, (2, 4, 9, 5), dtype, scale=3)
    w, b, rm, rv = params(rng, 4, dtype)
    if not training:                      # running stats that put some outputs on the kinks
        rm, rv, w, b = (np.zeros(4, dtype), np.full(4, 1 - EPS, dtype), np.ones(4, dtype),
                        np.zeros(4, dtype))
        x.reshape(-1)[:6] = np.array([0, -3, 3, 6, -0.0, 1], dtype)
    kw = dict(training=training, eps=EPS, momentum=MOMENTUM)
    dout = randn(rng, x.shape, dtype)
    y, c, s = batchnorm_forward(x, w, b, rm, rv, **kw)
    if act:
        z, ca = activation_forward(act, y)
        g = activation_backward(act, dout, ca)
    else:
        z, g = y, dout
    ref = (z, *batchnorm_backward(g, c), s.running_mean, s.running_var)
    z2, c2, s2 = batchnorm_act_forward(x, w, b, rm, rv, act=act, **kw)
    got = (z2, *batchnorm_act_backward(dout, c2), s2.running_mean, s2.running_var)
    for name, a, r in zip(("out", "dx", "dweight", "dbias", "running_mean", "running_var"),
                          got, ref):
        np.testing.assert_array_equal(a, r, err_msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", BN_ACTS, ids=str)
def test_bn_act_finite_differences_and_naive_equals_fast(act, training):
    rng = np.random.default_rng(28)
    x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
    w, b, rm, rv = params(rng, 3, np.float64)
    kw = dict(act=act, training=training, eps=EPS, momentum=MOMENTUM)
    out, cache, _ = batchnorm_act_forward(x, w, b, rm, rv, **kw)
    dout = rng.standard_normal(out.shape)
    grads = batchnorm_act_backward(dout, cache)
    for i, name in enumerate(("dx", "dweight", "dbias")):
        fd_check(f"batchnorm_act {name}", lambda *a: batchnorm_act_forward(*a, **kw)[0],
                 [x, w, b, rm, rv], i, grads[i], dout)
    out_n, cache_n, _ = batchnorm_act_forward(x, w, b, rm, rv, impl="naive", **kw)
    assert_close("naive out", out_n, out, np.float64)
    for name, a, r in zip(("dx", "dw", "db"), batchnorm_act_backward(dout, cache_n,
                                                                     impl="naive"), grads):
        assert_close(f"naive {name}", a, r, np.float64)


def test_bn_act_bad_input_and_untouched_inputs():
    rng = np.random.default_rng(29)
    x = rng.standard_normal((2, 3, 4, 4))
    w, b, rm, rv = params(rng, 3, np.float64)
    keep = [a.copy() for a in (x, w, b, rm, rv)]
    for impl in IMPLS:
        out, cache, _ = batchnorm_act_forward(x, w, b, rm, rv, act="hardswish", training=True,
                                              impl=impl)
        batchnorm_act_backward(rng.standard_normal(out.shape), cache, impl=impl)
        with pytest.raises(ValueError, match="act must be one of"):
            batchnorm_act_forward(x, w, b, rm, rv, act="sigmoid", training=True, impl=impl)
        with pytest.raises(ValueError, match="dout"):
            batchnorm_act_backward(np.zeros((2, 3, 4, 5)), cache, impl=impl)
    for a, k in zip((x, w, b, rm, rv), keep):
        np.testing.assert_array_equal(a, k)
