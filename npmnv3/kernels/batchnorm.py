"""Batch normalisation over (N, H, W) per channel (Ioffe & Szegedy, arXiv:1502.03167).

Legend: N batch, C channels, H W spatial size, M = N*H*W values per channel.

Training mode (batch statistics):
    mean = sum x / M,   var = sum (x - mean)^2 / M,   rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,   y = weight * xhat + bias
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)
    num_batches_tracked <- num_batches_tracked + 1
  ``momentum=None`` uses torch's cumulative average: momentum = 1 / num_batches_tracked.
  Backward:  dbias = sum dy,  dweight = sum dy * xhat,
             dx = weight * rstd / M * (M * dy - dbias - xhat * dweight)

Eval mode (running statistics, a fixed affine map per channel):
    alpha = weight / sqrt(running_var + eps),  beta = bias - running_mean * alpha
    y = x * alpha + beta
  Backward: dx = dy * alpha, dweight = sum dy * xhat, dbias = sum dy.

Batch norm + activation (``batchnorm_act_*``, act None / ReLU / hard-swish): out = act(y).
  Backward: g = dL/dy = act'(y) * dout, then batch norm's backward with dy = g. The fast
  version never stores y: one pass writes act(alpha * x + beta) (alpha, beta as in eval mode,
  from the batch statistics in training), and the backward recomputes y from x.

torch's defaults are eps=1e-5, momentum=0.1; MobileNetV3 uses eps=1e-3, momentum=0.01
(torchvision ``mobilenetv3.py``: ``partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)``).
Kernels never touch their inputs: the forward returns the new running statistics as a
``BatchNormStats`` next to ``(out, cache)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._checks import check_array, check_shape, choose_impl
from .activations import ActCache, activation_backward, activation_forward
from .epilogue import act_code, act_grad, apply_act


class BatchNormStats(NamedTuple):
    running_mean: np.ndarray | None   # (C,)
    running_var: np.ndarray | None    # (C,)
    num_batches_tracked: int


class BatchNormCache(NamedTuple):
    x: np.ndarray          # (N, C, H, W) input; backward recomputes xhat from it
    weight: np.ndarray     # (C,)
    mean: np.ndarray       # (C,) batch mean (train) or running mean (eval)
    rstd: np.ndarray       # (C,) 1 / sqrt(var + eps) of the same statistics
    training: bool


def _check_args(x, weight, bias, running_mean, running_var, training):
    check_array("x", x, ndim=4)
    C = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if a is None and name in ("running_mean", "running_var") and training:
            continue
        if a is None:
            raise ValueError(f"{name} is required{'' if training else ' in eval mode'}")
        check_array(name, a, ndim=1, dtype=x.dtype)
        check_shape(name, a, (C,), f"one per channel of x {x.shape}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    M = x.shape[0] * x.shape[2] * x.shape[3]
    if training and M <= 1:
        raise ValueError(f"training-mode batch norm needs more than 1 value per channel, "
                         f"x has shape {x.shape}")


def _new_stats(mean, var, M, running_mean, running_var, momentum, nbt):
    """Running-statistics update, torch convention (unbiased variance, see module docstring)."""
    nbt = int(nbt) + 1
    if running_mean is None:
        return BatchNormStats(None, None, nbt)
    m = 1.0 / nbt if momentum is None else momentum
    dt = running_mean.dtype
    new_mean = ((1 - m) * running_mean + m * mean).astype(dt)
    new_var = ((1 - m) * running_var + m * var * (M / (M - 1))).astype(dt)
    return BatchNormStats(new_mean, new_var, nbt)


def _eval_affine(weight, bias, mean, var, eps):
    """alpha, beta of eval mode, rounded like torch's CPU kernel
    (``aten/src/ATen/native/cpu/batch_norm_kernel.cpp``: alpha = invstd * weight, then
    beta and y = x * alpha + beta with fused multiply-adds)."""
    dt = weight.dtype
    rstd = (1 / np.sqrt(var + dt.type(eps))).astype(dt)
    alpha = rstd * weight
    # beta = fma(-mean, alpha, bias): exact product, one rounding (float64 holds the product).
    beta = (-(mean.astype(np.float64)) * alpha + bias).astype(dt)
    return rstd, alpha, beta


# ----------------------------------------------------------------------------- naive

def batchnorm_forward_naive(x, weight, bias, running_mean, running_var, *, training,
                            momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """Batch norm as the formulas read. Returns ``(out, cache, BatchNormStats)``."""
    _check_args(x, weight, bias, running_mean, running_var, training)
    bc = (None, slice(None), None, None)                       # (C,) -> (1, C, 1, 1)
    if training:
        M = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3))                           # (C,)
        var = ((x - mean[bc]) ** 2).mean(axis=(0, 2, 3))        # (C,) biased
        rstd = 1 / np.sqrt(var + x.dtype.type(eps))             # (C,)
        xhat = (x - mean[bc]) * rstd[bc]                        # (N, C, H, W)
        out = weight[bc] * xhat + bias[bc]
        stats = _new_stats(mean, var, M, running_mean, running_var, momentum,
                           num_batches_tracked)
        return out, BatchNormCache(x, weight, mean, rstd, True), stats
    rstd, alpha, beta = _eval_affine(weight, bias, running_mean, running_var, eps)
    out = (x.astype(np.float64) * alpha[bc] + beta[bc]).astype(x.dtype)  # fma, like torch
    stats = BatchNormStats(running_mean, running_var, int(num_batches_tracked))
    return out, BatchNormCache(x, weight, running_mean, rstd, False), stats


def batchnorm_backward_naive(dout, cache: BatchNormCache):
    """Returns ``(dx, dweight, dbias)``; see the module docstring for the formulas."""
    x, weight, mean, rstd, training = cache
    _check_dout(dout, x)
    bc = (None, slice(None), None, None)
    M = x.shape[0] * x.shape[2] * x.shape[3]
    xhat = (x - mean[bc]) * rstd[bc]
    dbias = dout.sum(axis=(0, 2, 3))
    dweight = (dout * xhat).sum(axis=(0, 2, 3))
    if training:
        dx = (weight * rstd / M)[bc] * (M * dout - dbias[bc] - xhat * dweight[bc])
    else:
        dx = dout * (weight * rstd)[bc]
    return dx.astype(x.dtype), dweight, dbias


def _check_dout(dout, x):
    check_array("dout", dout, ndim=4, dtype=x.dtype)
    check_shape("dout", dout, x.shape, "the forward output's shape")


# ----------------------------------------------------------------------------- fast (Numba)
# Sums and statistics: one task per channel, accumulated in float64. Element-wise passes: one
# task per (image, channel) plane.

def _bn_stats_loops(x, mean, var):
    # One pass over x. Each row: float64 sums of t = x - (the row's first value) give the row's
    # mean and sum of squared deviations; rows are merged with Chan et al.'s pairwise update
    # (no E[x^2] - E[x]^2 cancellation, however large the mean).
    N, C, H, W = x.shape
    for c in prange(C):
        cnt = 0.0
        mu = 0.0
        m2 = 0.0
        for n in range(N):
            for i in range(H):
                k = np.float64(x[n, c, i, 0])
                r = 0.0
                r2 = 0.0
                for j in range(W):
                    t = np.float64(x[n, c, i, j]) - k
                    r += t
                    r2 += t * t
                row_mu = k + r / W
                row_m2 = r2 - r * r / W
                tot = cnt + W
                delta = row_mu - mu
                mu += delta * (W / tot)
                m2 += row_m2 + delta * delta * (cnt * W / tot)
                cnt = tot
        mean[c] = mu
        var[c] = max(m2 / cnt, 0.0)


# --- batch norm + activation (the Conv-BN-Act tail) -----------------------------------------
# act codes (``epilogue.ACT_CODES``): 0 none, 1 ReLU, 2 hard-swish. The pre-activation
# v = alpha*x + beta is evaluated in float64 and rounded to x's dtype (torch's eval kernel is
# an FMA: one rounding); the activation and its gradient come from ``epilogue.py`` (torch's
# order and kink conventions), so the fused results are bitwise those of batch norm followed
# by the activation.
# act 0 is plain batch norm: ``batchnorm_*_fast`` run these same loops.

def _bn_act_fwd_loops(x, alpha, beta, act, z, three, six, out, pre):
    # pre: the pre-activation is also written there if it has x's size (else it is empty)
    N, C, H, W = x.shape
    keep = pre.size == x.size
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        a = np.float64(alpha[c])
        b = np.float64(beta[c])
        for i in range(H):
            for j in range(W):
                v = x.dtype.type(a * x[n, c, i, j] + b)
                if keep:
                    pre[n, c, i, j] = v
                out[n, c, i, j] = apply_act(v, act, z, three, six)


def _bn_act_grad_sums_loops(x, dout, alpha, beta, act, mean, rstd, z, three, half, dweight,
                            dbias, g_out):
    # with an activation, g = act'(alpha*x + beta) * dout is stored in g_out (the future dx
    # buffer) on the way; without one g is dout itself and nothing is stored
    N, C, H, W = x.shape
    for c in prange(C):
        sb = 0.0
        sw = 0.0
        mu = np.float64(mean[c])
        a = np.float64(alpha[c])
        b = np.float64(beta[c])
        for n in range(N):
            for i in range(H):
                for j in range(W):
                    xv = x[n, c, i, j]
                    g = act_grad(act, x.dtype.type(a * xv + b), dout[n, c, i, j], z, three,
                                  half)
                    if act != 0:
                        g_out[n, c, i, j] = g
                    g64 = np.float64(g)
                    sb += g64
                    sw += g64 * (xv - mu)
        dbias[c] = sb
        dweight[c] = sw * rstd[c]


def _bn_act_dx_loops(x, g, mean, k, dbias, sq, training, dx):
    # training dx = k * (M*g - dbias - (x - mean) * sq); eval dx = g * k (g may be dx itself)
    N, C, H, W = x.shape
    M = N * H * W
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        kc = k[c]
        if training:
            mu = mean[c]
            sb = dbias[c]
            sqc = sq[c]
            for i in range(H):
                for j in range(W):
                    dx[n, c, i, j] = kc * (M * np.float64(g[n, c, i, j]) - sb
                                           - (x[n, c, i, j] - mu) * sqc)
        else:
            for i in range(H):
                for j in range(W):
                    dx[n, c, i, j] = g[n, c, i, j] * kc


_par = njit(cache=True, parallel=True)
_bn_act_fwd = _par(_bn_act_fwd_loops)
_bn_act_grad_sums = _par(_bn_act_grad_sums_loops)
_bn_act_dx = _par(_bn_act_dx_loops)
_bn_stats = _par(_bn_stats_loops)


def _forward_core(x, weight, bias, running_mean, running_var, act, training, momentum, eps,
                  num_batches_tracked, keep_pre=False):
    """act(batch norm(x)) with the fast loops: (out, BatchNormCache, stats, alpha, beta, pre);
    ``pre`` (the pre-activation, written in the same pass) only if ``keep_pre``."""
    _check_args(x, weight, bias, running_mean, running_var, training)
    x = np.ascontiguousarray(x)
    C = x.shape[1]
    dt = x.dtype
    if training:
        M = x.shape[0] * x.shape[2] * x.shape[3]
        mean64, var64 = np.empty(C), np.empty(C)
        _bn_stats(x, mean64, var64)
        rstd64 = 1 / np.sqrt(var64 + eps)
        alpha = rstd64 * weight
        beta = bias - mean64 * alpha
        stats = _new_stats(mean64, var64, M, running_mean, running_var, momentum,
                           num_batches_tracked)
        cache = BatchNormCache(x, weight, mean64.astype(dt), rstd64.astype(dt), True)
    else:
        rstd, alpha, beta = _eval_affine(weight, bias, running_mean, running_var, eps)
        stats = BatchNormStats(running_mean, running_var, int(num_batches_tracked))
        cache = BatchNormCache(x, weight, running_mean, rstd, False)
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    out = np.empty_like(x)
    pre = np.empty_like(x) if keep_pre else np.empty((0, 0, 0, 0), dt)
    t = dt.type
    _bn_act_fwd(x, alpha, beta, act_code(act), t(0), t(3), t(6), out, pre)
    return out, cache, stats, alpha, beta, (pre if keep_pre else None)


def _backward_core(dout, cache: BatchNormCache, act, alpha, beta):
    """Two passes: the sums of g = act'(alpha*x + beta) * dout (g = dout without act) and of
    g * (x - mean), g kept in the dx buffer; then dx from g (in place). (dx, dweight, dbias)."""
    x, weight, mean, rstd, training = cache
    _check_dout(dout, x)
    dout = np.ascontiguousarray(dout)
    C = x.shape[1]
    dt = x.dtype
    t = dt.type
    dweight64, dbias64 = np.empty(C), np.empty(C)
    dx = np.empty_like(x)
    _bn_act_grad_sums(x, dout, alpha, beta, act_code(act), mean, rstd, t(0), t(3), t(0.5),
                      dweight64, dbias64, dx)
    g = dx if act else dout
    if training:
        M = x.shape[0] * x.shape[2] * x.shape[3]
        r64 = rstd.astype(np.float64)
        _bn_act_dx(x, g, mean, weight * r64 / M, dbias64, dweight64 * r64, True, dx)
    else:
        _bn_act_dx(x, g, mean, (weight * rstd).astype(np.float64), dbias64, dbias64, False, dx)
    return dx, dweight64.astype(dt), dbias64.astype(dt)


def batchnorm_forward_fast(x, weight, bias, running_mean, running_var, *, training,
                           momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """Same contract as ``batchnorm_forward_naive``; fused Numba passes, float64 sums."""
    out, cache, stats, *_ = _forward_core(x, weight, bias, running_mean, running_var, None,
                                          training, momentum, eps, num_batches_tracked)
    return out, cache, stats


def batchnorm_backward_fast(dout, cache: BatchNormCache):
    """Same contract as ``batchnorm_backward_naive``: ``(dx, dweight, dbias)``."""
    unused = np.zeros(cache.x.shape[1])
    return _backward_core(dout, cache, None, unused, unused)


# ----------------------------------------------------------------------------- batch norm + act

class BatchNormActCache(NamedTuple):
    bn: BatchNormCache
    act: str | None
    alpha: np.ndarray | None    # fast: (C,) float64, the pre-activation is alpha * x + beta
    beta: np.ndarray | None     #   (naive: None)
    pre: np.ndarray | None      # the pre-activation: naive always; fast only with keep_pre
    #                             (the fast backward recomputes it either way)


def _check_act(act):
    act_code(act)                             # raises for an unknown activation


def batchnorm_act_forward_naive(x, weight, bias, running_mean, running_var, *, act, training,
                                momentum=0.1, eps=1e-5, num_batches_tracked=0, keep_pre=False):
    """act(batch_norm(x)): ``batchnorm_forward_naive`` followed by the activation, as written."""
    _check_act(act)
    pre, c_bn, stats = batchnorm_forward_naive(
        x, weight, bias, running_mean, running_var, training=training, momentum=momentum,
        eps=eps, num_batches_tracked=num_batches_tracked)
    out = activation_forward(act, pre, impl="naive")[0] if act else pre
    return out, BatchNormActCache(c_bn, act, None, None, pre), stats


def batchnorm_act_backward_naive(dout, cache: BatchNormActCache):
    """The activation's backward (g = act'(y) * dout), then batch norm's with dy = g."""
    bn, act, alpha, beta, pre = cache
    _check_dout(dout, bn.x)
    if pre is None:                           # a fast forward's cache: rebuild y = alpha*x + beta
        bc = (None, slice(None), None, None)
        pre = (alpha[bc] * bn.x + beta[bc]).astype(bn.x.dtype)
    g = activation_backward(act, dout, ActCache(pre), impl="naive") if act else dout
    return batchnorm_backward_naive(g, bn)


def batchnorm_act_forward_fast(x, weight, bias, running_mean, running_var, *, act, training,
                               momentum=0.1, eps=1e-5, num_batches_tracked=0, keep_pre=False):
    """Same contract as the naive version. After the statistics pass (training), one pass writes
    act(alpha * x + beta): bitwise ``batchnorm_forward_fast`` followed by the fast activation,
    without storing the pre-activation (the backward recomputes it from x) unless ``keep_pre``
    (then the same pass also writes it, into ``cache.pre``: the numbers do not change)."""
    _check_act(act)
    out, bn, stats, alpha, beta, pre = _forward_core(
        x, weight, bias, running_mean, running_var, act, training, momentum, eps,
        num_batches_tracked, keep_pre)
    return out, BatchNormActCache(bn, act, alpha, beta, pre), stats


def batchnorm_act_backward_fast(dout, cache: BatchNormActCache):
    """Same contract as the naive version, in two fused passes: the first recomputes the
    pre-activation, applies the activation's gradient and sums dbias and dweight, leaving
    g = act'(y) * dout in the dx buffer; the second turns g into dx in place."""
    if cache.alpha is None:                   # a naive forward's cache
        return batchnorm_act_backward_naive(dout, cache)
    return _backward_core(dout, cache.bn, cache.act, cache.alpha, cache.beta)


# ----------------------------------------------------------------------------- public API

def batchnorm_forward(x, weight, bias, running_mean, running_var, *, training, momentum=0.1,
                      eps=1e-5, num_batches_tracked=0, impl="fast"):
    """Batch norm of x (N, C, H, W) with per-channel weight/bias/running stats (C,).

    Returns ``(out, cache, BatchNormStats)``; in training mode the stats are the updated running
    statistics (None when ``running_mean``/``running_var`` are None), in eval mode the inputs.
    """
    f = choose_impl(impl, batchnorm_forward_fast, batchnorm_forward_naive)
    return f(x, weight, bias, running_mean, running_var, training=training, momentum=momentum,
             eps=eps, num_batches_tracked=num_batches_tracked)


def batchnorm_backward(dout, cache, *, impl="fast"):
    """Gradients of ``batchnorm_forward``: ``(dx, dweight, dbias)``."""
    return choose_impl(impl, batchnorm_backward_fast, batchnorm_backward_naive)(dout, cache)


def batchnorm_act_forward(x, weight, bias, running_mean, running_var, *, act, training,
                          momentum=0.1, eps=1e-5, num_batches_tracked=0, keep_pre=False,
                          impl="fast"):
    """``act(batchnorm(x))`` for act None, "relu" or "hardswish": the tail of every Conv-BN-Act.

    Returns ``(out, cache, BatchNormStats)`` like ``batchnorm_forward``, with the values of
    ``batchnorm_forward`` followed by ``activation_forward`` (bitwise, for the fast versions) in
    fewer passes over memory: the pre-activation is not stored, the backward recomputes it.
    ``keep_pre=True`` also returns the pre-activation (batch norm's output) as ``cache.pre``,
    from the same pass (``forward_intermediates`` records it).
    """
    f = choose_impl(impl, batchnorm_act_forward_fast, batchnorm_act_forward_naive)
    return f(x, weight, bias, running_mean, running_var, act=act, training=training,
             momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
             keep_pre=keep_pre)


def batchnorm_act_backward(dout, cache, *, impl="fast"):
    """Gradients of ``batchnorm_act_forward``: ``(dx, dweight, dbias)``."""
    f = choose_impl(impl, batchnorm_act_backward_fast, batchnorm_act_backward_naive)
    return f(dout, cache)
