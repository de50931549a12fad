"""Squeeze-and-excitation, global average pool, linear, dropout, cross-entropy vs torch."""

import numpy as np
import pytest
from support import RTOL64, assert_close, fd_check, randn, require_torch

from npmnv3.kernels import (
    avgpool_backward,
    avgpool_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    se_backward,
    se_forward,
)

DTYPES = [np.float32, np.float64]
IMPLS = ("naive", "fast")


def tensors(torch, *arrays):
    return [torch.from_numpy(a.copy()).requires_grad_() for a in arrays]


# ----------------------------------------------------------------------------- SE

def se_params(rng, C, S, dtype):
    return (randn(rng, (S, C, 1, 1), dtype, scale=0.5), randn(rng, (S,), dtype),
            randn(rng, (C, S, 1, 1), dtype, scale=0.5), randn(rng, (C,), dtype))


# (N, C, S, H, W): MobileNetV3 squeeze widths (72 -> 24, 16 -> 8), odd/non-square, batch 1 and 3
SE_CASES = [(1, 16, 8, 5, 7), (3, 72, 24, 6, 5), (2, 40, 16, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SE_CASES, ids=str)
def test_se_matches_torchvision(case, impl, dtype):
    torch = require_torch()
    from torchvision.ops.misc import SqueezeExcitation

    N, C, S, H, W = case
    rng = np.random.default_rng(30)
    x = randn(rng, (N, C, H, W), dtype, scale=2)
    p = se_params(rng, C, S, dtype)
    se = SqueezeExcitation(C, S, scale_activation=torch.nn.Hardsigmoid).to(
        torch.float32 if dtype == np.float32 else torch.float64)
    with torch.no_grad():
        for prm, a in zip((se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias), p):
            prm.copy_(torch.from_numpy(a))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = se(xt)
    dout = randn(rng, x.shape, dtype)
    yt.backward(torch.from_numpy(dout))
    out, cache = se_forward(x, *p, impl=impl)
    assert_close("out", out, yt, dtype)
    dx, dw1, db1, dw2, db2 = se_backward(dout, cache, impl=impl)
    assert_close("dx", dx, xt.grad, dtype)
    for name, ours, prm in (("fc1.weight", dw1, se.fc1.weight), ("fc1.bias", db1, se.fc1.bias),
                            ("fc2.weight", dw2, se.fc2.weight), ("fc2.bias", db2, se.fc2.bias)):
        assert_close(f"d{name}", ours, prm.grad, dtype)


def test_se_fan_out_is_summed():
    """dx is the sum of the product branch (dout * g) and the pooled branch, not either one."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 8, 3, 4))
    p = se_params(rng, 8, 8, np.float64)
    out, cache = se_forward(x, *p)
    dout = rng.standard_normal(out.shape)
    dx = se_backward(dout, cache)[0]
    product_only = dout * cache.gate[:, :, None, None]
    assert np.abs(dx - product_only).max() > 1e-3     # the pooled branch contributes
    fd_check("se dx", se_forward, [x, *p], 0, dx, dout)


def test_se_finite_differences_and_naive_equals_fast():
    rng = np.random.default_rng(32)
    x = rng.standard_normal((2, 6, 3, 5)) * 2
    p = se_params(rng, 6, 4, np.float64)
    out, cache = se_forward(x, *p)
    dout = rng.standard_normal(out.shape)
    grads = se_backward(dout, cache)
    for i, name in enumerate(("dx", "dw1", "db1", "dw2", "db2")):
        fd_check(f"se {name}", se_forward, [x, *p], i, grads[i], dout)
    y1, c1 = se_forward(x, *p, impl="naive")
    assert_close("out", out, y1, np.float64)
    for i, a1 in enumerate(se_backward(dout, c1, impl="naive")):
        assert_close(f"grad {i}", grads[i], a1, np.float64)


def test_se_bad_input():
    rng = np.random.default_rng(33)
    x = rng.standard_normal((2, 8, 3, 3))
    w1, b1, w2, b2 = se_params(rng, 8, 4, np.float64)
    with pytest.raises(ValueError, match="fc1.weight"):
        se_forward(x, w1[:, :7], b1, w2, b2)
    with pytest.raises(ValueError, match="fc2.weight"):
        se_forward(x, w1, b1, w2[:, :3], b2)
    with pytest.raises(ValueError, match="fc2.bias"):
        se_forward(x, w1, b1, w2, b2[:5])


# ----------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (3, 5, 4, 9), (2, 4, 1, 1)], ids=str)
def test_avgpool_matches_torch(shape, impl, dtype):
    torch = require_torch()
    rng = np.random.default_rng(34)
    x = randn(rng, shape, dtype)
    (xt,) = tensors(torch, x)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1)
    dout = randn(rng, yt.shape, dtype)
    yt.backward(torch.from_numpy(dout))
    out, cache = avgpool_forward(x, impl=impl)
    assert_close("out", out, yt, dtype)
    assert_close("dx", avgpool_backward(dout, cache, impl=impl), xt.grad, dtype)


def test_avgpool_finite_differences():
    rng = np.random.default_rng(35)
    x = rng.standard_normal((2, 3, 4, 5))
    out, cache = avgpool_forward(x)
    dout = rng.standard_normal(out.shape)
    fd_check("avgpool dx", avgpool_forward, [x], 0, avgpool_backward(dout, cache), dout)


# ----------------------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [(1, 96, 128, True), (5, 48, 10, True), (3, 7, 4, False)],
                         ids=str)
def test_linear_matches_torch(case, impl, dtype):
    torch = require_torch()
    N, I, O, bias = case
    rng = np.random.default_rng(36)
    x, w = randn(rng, (N, I), dtype), randn(rng, (O, I), dtype, scale=0.2)
    b = randn(rng, (O,), dtype) if bias else None
    ts = tensors(torch, x, w) + (tensors(torch, b) if bias else [None])
    yt = torch.nn.functional.linear(*ts)
    dout = randn(rng, yt.shape, dtype)
    yt.backward(torch.from_numpy(dout))
    out, cache = linear_forward(x, w, b, impl=impl)
    assert_close("out", out, yt, dtype)
    dx, dw, db = linear_backward(dout, cache, impl=impl)
    assert_close("dx", dx, ts[0].grad, dtype)
    assert_close("dw", dw, ts[1].grad, dtype)
    assert (db is None) if not bias else assert_close("db", db, ts[2].grad, dtype) is None


def test_linear_finite_differences_and_bad_input():
    rng = np.random.default_rng(37)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    out, cache = linear_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    grads = linear_backward(dout, cache)
    for i, name in enumerate(("dx", "dw", "db")):
        fd_check(f"linear {name}", linear_forward, [x, w, b], i, grads[i], dout)
    with pytest.raises(ValueError, match="feature mismatch"):
        linear_forward(x, w[:, :4])
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        linear_forward(x[0], w)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("rows", [4, 64])         # the fast face: NumPy below 65536 values, a loop
@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_with_torchs_mask_matches_torch(impl, rows):
    """Impose the mask torch drew: output and gradient then equal torch's exactly."""
    torch = require_torch()
    rng = np.random.default_rng(38)
    x = randn(rng, (rows, 1280), np.float32) + 3              # no zeros, so the mask is readable
    torch.manual_seed(0)
    (xt,) = tensors(torch, x)
    yt = torch.nn.functional.dropout(xt, p=0.2, training=True)
    dout = randn(rng, x.shape, np.float32)
    yt.backward(torch.from_numpy(dout))
    mask = yt.detach().numpy() != 0
    out, cache = dropout_forward(x, 0.2, training=True, mask=mask, impl=impl)
    np.testing.assert_array_equal(out, yt.detach().numpy())
    np.testing.assert_array_equal(dropout_backward(dout, cache, impl=impl), xt.grad.numpy())


def test_dropout_statistics_seed_and_modes():
    x = np.ones((200, 500))
    a, ca = dropout_forward(x, 0.2, training=True, rng=7, impl="naive")
    b, cb = dropout_forward(x, 0.2, training=True, rng=np.random.default_rng(7), impl="fast")
    np.testing.assert_array_equal(a, b)                      # same seed, same mask, both impls
    c, _ = dropout_forward(x, 0.2, training=True, rng=8)
    assert not np.array_equal(a, c)                          # another seed, another mask
    kept = np.mean(a != 0)
    assert abs(kept - 0.8) < 0.01, kept                      # Bernoulli(0.8), 1e5 draws: sd 1e-3
    np.testing.assert_allclose(a[a != 0], 1 / 0.8, rtol=RTOL64)   # inverted scaling
    assert abs(a.mean() - 1) < 0.01                          # expectation preserved
    dout = np.random.default_rng(9).standard_normal(x.shape)
    assert_close("dropout dx", dropout_backward(dout, ca), dout * (a != 0) / 0.8, np.float64)
    e, ce = dropout_forward(x, 0.2, training=False)          # eval: identity
    np.testing.assert_array_equal(e, x)
    np.testing.assert_array_equal(dropout_backward(dout, ce), dout)
    z, _ = dropout_forward(x, 1.0, training=True, rng=0)     # p = 1 drops everything
    assert not z.any()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dropout_forward(x, 1.5, training=True)
    with pytest.raises(ValueError, match="mask"):
        dropout_forward(x, 0.5, training=True, mask=np.ones((2, 2), bool))


# ----------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction, smoothing, impl, dtype):
    torch = require_torch()
    rng = np.random.default_rng(40)
    z = randn(rng, (7, 10), dtype, scale=3)
    y = rng.integers(0, 10, 7)
    (zt,) = tensors(torch, z)
    lt = torch.nn.functional.cross_entropy(zt, torch.from_numpy(y), label_smoothing=smoothing,
                                           reduction=reduction)
    dl = randn(rng, (7,), dtype) if reduction == "none" else np.asarray(1.7, dtype)
    lt.backward(torch.from_numpy(dl) if reduction == "none" else torch.tensor(1.7, dtype=lt.dtype))
    loss, cache = cross_entropy_forward(z, y, label_smoothing=smoothing, reduction=reduction,
                                        impl=impl)
    assert_close("loss", np.asarray(loss), lt, dtype)
    assert_close("dlogits", cross_entropy_backward(dl, cache, impl=impl), zt.grad, dtype)


def test_cross_entropy_finite_differences_and_stability():
    rng = np.random.default_rng(41)
    z = rng.standard_normal((4, 6)) * 3
    y = np.array([0, 5, 2, 2])
    loss, cache = cross_entropy_forward(z, y, label_smoothing=0.1)
    fd_check("cross-entropy dlogits",
             lambda a: np.asarray(cross_entropy_forward(a, y, label_smoothing=0.1)[0]), [z], 0,
             cross_entropy_backward(1.0, cache), np.asarray(1.0))
    big = np.array([[1000.0, 0.0, -1000.0]])                   # no overflow at large logits
    loss, _ = cross_entropy_forward(big, np.array([0]))
    assert np.isfinite(loss) and abs(loss) < RTOL64
    naive, _ = cross_entropy_forward(z, y, impl="naive", label_smoothing=0.1)
    fast, _ = cross_entropy_forward(z, y, impl="fast", label_smoothing=0.1)
    assert abs(naive - fast) <= RTOL64 * abs(fast)


def test_cross_entropy_bad_labels():
    z = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cross_entropy_forward(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        cross_entropy_forward(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy_forward(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        cross_entropy_forward(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_forward(z, np.array([0, 1, 2]), label_smoothing=2.0)
