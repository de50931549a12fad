"""ReLU, ReLU6, hard-sigmoid, hard-swish: bit-exact forward, torch's gradients, kinks, FD."""

import numpy as np
import pytest
from support import RTOL_FD, assert_close, fd_check, randn, require_torch

from npmnv3.kernels import ACTIVATIONS, activation_backward, activation_forward

KINKS = np.array([-3.0, 0.0, 3.0, 6.0, -6.0, -0.0])   # where some derivative jumps
IMPLS = ("naive", "fast")


def torch_fn(torch, name):
    F = torch.nn.functional
    return {"relu": F.relu, "relu6": F.relu6, "hardsigmoid": F.hardsigmoid,
            "hardswish": F.hardswish}[name]


def sample(rng, dtype, n=200_000):
    """Dense in [-4, 7] (all pieces of every activation) plus the kinks and their neighbours."""
    x = rng.uniform(-4, 7, n).astype(dtype)
    near = np.concatenate([np.nextafter(KINKS.astype(dtype), dtype.type(np.inf)),
                           np.nextafter(KINKS.astype(dtype), dtype.type(-np.inf)),
                           KINKS.astype(dtype), np.array([np.nan, np.nan], dtype=dtype)])
    return np.concatenate([x, near]).reshape(-1, 2)   # 2-D: shapes other than 1-D work too


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_bit_identical_to_torch(name, impl, dtype):
    torch = require_torch()
    x = sample(np.random.default_rng(0), np.dtype(dtype))
    out, _ = activation_forward(name, x, impl=impl)
    ref = torch_fn(torch, name)(torch.from_numpy(x)).numpy()
    assert out.dtype == x.dtype
    mism = np.flatnonzero((out != ref) & ~(np.isnan(out) & np.isnan(ref)))
    assert mism.size == 0, (f"{name}/{impl}: {mism.size} elements differ from torch, e.g. "
                            f"x={x.reshape(-1)[mism[:3]]} ours={out.reshape(-1)[mism[:3]]} "
                            f"torch={ref.reshape(-1)[mism[:3]]}")
    # Signed zeros match too (hardswish(-5) is -0.0 in torch).
    np.testing.assert_array_equal(np.signbit(out), np.signbit(ref), err_msg=f"{name} sign bits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_matches_torch(name, impl, dtype):
    torch = require_torch()
    rng = np.random.default_rng(1)
    x = sample(rng, np.dtype(dtype))
    x[np.isnan(x)] = 0                                # NaN inputs are for the forward test
    dout = randn(rng, x.shape, dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    torch_fn(torch, name)(xt).backward(torch.from_numpy(dout))
    _, cache = activation_forward(name, x, impl=impl)
    dx = activation_backward(name, dout, cache, impl=impl)
    # The gradient is a single multiply per element, so it must be bit-identical as well.
    np.testing.assert_array_equal(dx, xt.grad.numpy(), err_msg=f"{name}/{impl} dx")
    assert_close(f"{name}/{impl} dx", dx, xt.grad, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_gradients_exactly_at_the_kinks(impl):
    """The convention table of npmnv3.kernels.activations, checked literally."""
    x = np.array([-3.0, 0.0, 3.0, 6.0])
    g = np.array([2.0, 2.0, 2.0, 2.0])
    expected = {   # name: (forward at -3, 0, 3, 6), (gradient at -3, 0, 3, 6) for dout = 2
        "relu": ([0, 0, 3, 6], [0, 0, 2, 2]),
        "relu6": ([0, 0, 3, 6], [0, 0, 2, 0]),
        "hardsigmoid": ([0, 0.5, 1, 1], [0, 2 * float(np.float32(1) / np.float32(6)), 0, 0]),
        "hardswish": ([0, 0, 3, 6], [0, 1, 2, 2]),
    }
    for name, (fwd, grad) in expected.items():
        out, cache = activation_forward(name, x, impl=impl)
        np.testing.assert_array_equal(out, fwd, err_msg=f"{name} forward at the kinks")
        np.testing.assert_array_equal(activation_backward(name, g, cache, impl=impl), grad,
                                      err_msg=f"{name} gradient at the kinks")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_kinks_match_torch(name, dtype):
    torch = require_torch()
    x = np.array([-3.0, 0.0, 3.0, 6.0, -0.0, -5.0], dtype=dtype)
    dout = np.array([1.5, -2.0, 0.7, 3.0, 1.0, 1.0], dtype=dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch_fn(torch, name)(xt)
    yt.backward(torch.from_numpy(dout))
    for impl in IMPLS:
        out, cache = activation_forward(name, x, impl=impl)
        np.testing.assert_array_equal(out, yt.detach().numpy(), err_msg=f"{name}/{impl} value")
        np.testing.assert_array_equal(activation_backward(name, dout, cache, impl=impl),
                                      xt.grad.numpy(), err_msg=f"{name}/{impl} gradient")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_finite_differences(name):
    rng = np.random.default_rng(2)
    x = rng.uniform(-5, 8, (3, 4, 5))
    # Keep samples away from the kinks, where the derivative is not defined.
    for k in KINKS:
        x[np.abs(x - k) < 1e-3] += 2e-3
    dout = rng.standard_normal(x.shape)
    for impl in IMPLS:
        _, cache = activation_forward(name, x, impl=impl)
        dx = activation_backward(name, dout, cache, impl=impl)
        fwd = lambda a, impl=impl: activation_forward(name, a, impl=impl)  # noqa: E731
        fd_check(f"{name}/{impl}", fwd, [x], 0, dx, dout, rtol=RTOL_FD)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 3, 100, 120)])   # NumPy / the loop
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_naive_and_fast_agree_bitwise(name, dtype, shape):
    rng = np.random.default_rng(3)
    x = randn(rng, shape, dtype, scale=4)
    dout = randn(rng, x.shape, dtype)
    y1, c1 = activation_forward(name, x, impl="naive")
    y2, c2 = activation_forward(name, x, impl="fast")
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(activation_backward(name, dout, c1, impl="naive"),
                                  activation_backward(name, dout, c2, impl="fast"))


def test_non_contiguous_input_and_no_mutation():
    rng = np.random.default_rng(4)
    base = randn(rng, (4, 6, 8), np.float32, scale=4)
    x = base[:, ::2, 1:].transpose(2, 0, 1)          # a strided view
    keep = x.copy()
    for name in ACTIVATIONS:
        y1, _ = activation_forward(name, x, impl="naive")
        y2, c = activation_forward(name, x, impl="fast")
        np.testing.assert_array_equal(y1, y2, err_msg=name)
        activation_backward(name, np.ones_like(y2), c)
    np.testing.assert_array_equal(x, keep)


def test_bad_input():
    with pytest.raises(ValueError, match="float32 or float64"):
        activation_forward("relu", np.arange(4))
    with pytest.raises(ValueError, match="float32 or float64"):
        activation_forward("hardswish", np.array([1.0, None], dtype=object))
    with pytest.raises(ValueError, match="unknown activation"):
        activation_forward("swish", np.zeros(3))
    with pytest.raises(ValueError, match="impl"):
        activation_forward("relu", np.zeros(3), impl="cuda")
    _, cache = activation_forward("relu", np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        activation_backward("relu", np.zeros((3, 2)), cache)
    with pytest.raises(ValueError, match="dtype"):
        activation_backward("relu", np.zeros((2, 3), dtype=np.float32), cache)
