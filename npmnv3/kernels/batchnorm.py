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

from ._checks import check_array, check_shape, choose_impl
from .activations import ActCache, activation_backward, activation_forward
from .channels_last import (
    affine_act,
    batch_stats,
    bn_dx,
    grad_sums,
    kernel_consts,
    nchw_view,
    num_tasks,
    to_nhwc,
)
from .epilogue import act_code


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
# The loops are ``channels_last.py``'s: x is taken as channels-last memory, a (P, C) matrix with
# P = N*H*W, so every per-channel sum is vectorised over channels; sums are float64. The
# pre-activation v = alpha*x + beta is evaluated in float64 and rounded to x's dtype (torch's
# eval kernel is an FMA: one rounding); the activation and its gradient come from
# ``epilogue.py`` (torch's order and kink conventions), so the fused results are bitwise those
# of batch norm followed by the activation. ``bn_affine`` and ``bn_backward_coefs`` are shared
# with the fused convolution kernels (``convbn.py``).

def bn_affine(mv, weight, bias, running_mean, running_var, training, momentum, eps,
              num_batches_tracked, M):
    """Batch norm's per-channel map alpha*x + beta from the batch statistics ``mv`` (2, C)
    float64 (training) or the running ones (eval). Returns ``(mean, rstd, bc, stats)``: mean
    and rstd in the dtype (for the cache), ``bc`` (6, C) float64 with rows alpha, beta, mean
    filled (``channels_last.py``), and the new running statistics."""
    dt = weight.dtype
    if training:
        mean64, var64 = mv[0], mv[1]
        rstd64 = 1 / np.sqrt(var64 + eps)
        alpha = rstd64 * weight
        beta = bias - mean64 * alpha
        stats = _new_stats(mean64, var64, M, running_mean, running_var, momentum,
                           num_batches_tracked)
        mean, rstd = mean64.astype(dt), rstd64.astype(dt)
    else:
        rstd, alpha, beta = _eval_affine(weight, bias, running_mean, running_var, eps)
        stats = BatchNormStats(running_mean, running_var, int(num_batches_tracked))
        mean = running_mean
    return mean, rstd, coefs(alpha, beta, mean), stats


def coefs(alpha, beta, mean):
    """The (6, C) float64 coefficient rows of ``channels_last.py``: alpha, beta, mean, then
    k1, sb, sq (filled by ``bn_backward_coefs``)."""
    bc = np.zeros((6, len(alpha)))
    bc[0], bc[1], bc[2] = alpha, beta, mean
    return bc


def bn_backward_coefs(bc, cache: BatchNormCache, sums, M):
    """From ``grad_sums``' sums (2, C) of g and g * (x - mean): fill bc's rows k1, sb, sq and
    return ``(mode, dweight, dbias)`` (mode 1 training, 2 eval; gradients in the dtype)."""
    _, weight, _, rstd, training = cache
    dbias64 = sums[0]
    dweight64 = sums[1] * rstd
    r64 = rstd.astype(np.float64)
    if training:                           # dx = k1 * (M*g - dbias - (x - mean) * sq)
        bc[3], bc[4], bc[5] = weight * r64 / M, dbias64, dweight64 * r64
    else:                                  # dx = g * weight * rstd
        bc[3] = (weight * rstd).astype(np.float64)
    dt = weight.dtype
    return (1 if training else 2), dweight64.astype(dt), dbias64.astype(dt)


def _forward_core(x, weight, bias, running_mean, running_var, act, training, momentum, eps,
                  num_batches_tracked, keep_pre=False):
    """act(batch norm(x)) with the fast loops: (out, BatchNormCache, stats, bc, pre); ``pre``
    (the pre-activation, written in the same pass) only if ``keep_pre``."""
    _check_args(x, weight, bias, running_mean, running_var, training)
    xl = to_nhwc(x)                                            # (N, H, W, C)
    C, dt = xl.shape[3], xl.dtype
    x2 = xl.reshape(-1, C)                                     # (P, C)
    T = num_tasks(len(x2))
    mv = np.zeros((2, C))
    if training:
        batch_stats(x2, T, mv)
    mean, rstd, bc, stats = bn_affine(mv, weight, bias, running_mean, running_var, training,
                                      momentum, eps, num_batches_tracked, len(x2))
    out = np.empty_like(xl)
    pre = np.empty_like(xl) if keep_pre else np.empty((0, 0, 0, C), dt)
    affine_act(x2, bc, act_code(act), kernel_consts(dt), T, out.reshape(-1, C),
               pre.reshape(-1, C))
    cache = BatchNormCache(nchw_view(xl), weight, mean, rstd, training)
    return nchw_view(out), cache, stats, bc, (nchw_view(pre) if keep_pre else None)


def _backward_core(dout, cache: BatchNormCache, act, alpha, beta):
    """Two passes: the sums of g = act'(alpha*x + beta) * dout and of g * (x - mean), then dx
    from g (recomputed, never stored). Returns (dx, dweight, dbias)."""
    x = cache.x
    _check_dout(dout, x)
    xl = to_nhwc(x)
    C, dt = xl.shape[3], xl.dtype
    x2, d2 = xl.reshape(-1, C), to_nhwc(dout).reshape(-1, C)
    T = num_tasks(len(x2))
    bc = coefs(alpha, beta, cache.mean)
    sums = np.empty((2, C))
    kc = kernel_consts(dt)
    grad_sums(x2, d2, bc, act_code(act), kc, T, sums)
    mode, dweight, dbias = bn_backward_coefs(bc, cache, sums, len(x2))
    dx = np.empty_like(xl)
    bn_dx(x2, d2, bc, act_code(act), mode, kc, T, dx.reshape(-1, C))
    return nchw_view(dx), dweight, dbias


def batchnorm_forward_fast(x, weight, bias, running_mean, running_var, *, training,
                           momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """Same contract as ``batchnorm_forward_naive``; Numba passes on channels-last memory
    (the output is channels-last too, ``channels_last.py``), float64 sums."""
    out, cache, stats, *_ = _forward_core(x, weight, bias, running_mean, running_var, None,
                                          training, momentum, eps, num_batches_tracked)
    return out, cache, stats


def batchnorm_backward_fast(dout, cache: BatchNormCache):
    """Same contract as ``batchnorm_backward_naive``: ``(dx, dweight, dbias)``."""
    C = cache.x.shape[1]
    return _backward_core(dout, cache, None, np.ones(C), np.zeros(C))


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
    out, bn, stats, bc, pre = _forward_core(
        x, weight, bias, running_mean, running_var, act, training, momentum, eps,
        num_batches_tracked, keep_pre)
    return out, BatchNormActCache(bn, act, bc[0], bc[1], pre), stats


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
