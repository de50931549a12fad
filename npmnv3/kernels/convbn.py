"""Convolution -> batch norm -> activation as one kernel pair (torchvision's
``Conv2dNormActivation``, every conv of MobileNetV3).

Legend: N batch, C in-channels, K out-channels, H W in, Ho Wo out, P = N*Ho*Wo.

    y = conv(x, W)                     (N, K, Ho, Wo)   no bias (the batch norm follows)
    z = act(BN(y))                     BN with batch statistics (training) or running ones (eval)
Backward: g = act'(BN(y)) * dz, dy from batch norm's backward (``batchnorm.py``), then the
convolution's dx and dW from dy.

``kind`` names the convolution: "pointwise" (1x1: expansion, projection, the last conv),
"depthwise" (groups = C) or "conv" (dense, the 3-channel stem: run as a 1x1 convolution of
its im2col rows; other dense convs run the separate kernels). The naive version is literally
the two naive kernels in a row. The fast one runs on channels-last memory
(``channels_last.py``) in three passes over y each way:
forward  1. the convolution, one band of pixels at a time, and the batch statistics of the band
            while it is in cache;  2. z = act(alpha*y + beta) (y is kept for the backward);
backward 1. the sums of g and g * (y - mean) (dweight, dbias);  2. per band, dy from y and dz,
            used at once for dx and dW (dy is never stored).
Both versions return the same cache, so either backward accepts either forward's cache.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import channels_last, channels_last_conv
from ._checks import check_array, choose_impl
from .batchnorm import (
    BatchNormActCache,
    BatchNormCache,
    _check_act,
    batchnorm_act_backward,
    batchnorm_act_forward,
    bn_affine,
    bn_backward_coefs,
    coefs,
)
from .batchnorm import (
    _check_args as _check_bn_args,
)
from .callbacks import compile_ahead
from .channels_last import (
    affine_act,
    band_rows,
    bn_dx,
    grad_band_rows,
    grad_sums,
    kernel_consts,
    nchw_view,
    num_tasks,
    pointwise_bwd,
    pointwise_fwd,
    to_nhwc,
)
from .channels_last_conv import depthwise_bwd, depthwise_fwd, flat_taps, im2col
from .conv2d import (
    DIRECT_MAX_TAPS,
    Conv2dCache,
    PointwiseCache,
    _check_conv_args,
    _check_pointwise,
    conv2d_backward,
    conv2d_forward,
    pointwise_backward,
    pointwise_forward,
)
from .depthwise import DepthwiseCache, depthwise_backward, depthwise_forward
from .depthwise import _check_args as _check_dw_args
from .epilogue import act_code
from .threads import single_threaded_blas

KINDS = ("conv", "pointwise", "depthwise")
# The task kernels of a training step, in the order MobileNetV3's first step needs them (stem,
# blocks, SE, then the backward): on an empty cache a helper process compiles them from the end
# of the list while this one compiles from its start (``callbacks.compile_ahead``).
TRAINING_TASKS = (channels_last_conv._im2col_tasks, channels_last._pointwise_fwd_tasks,
                  channels_last._affine_act_tasks, channels_last_conv._depthwise_fwd_tasks,
                  channels_last._mean_pixels_tasks, channels_last._scale_pixels_tasks,
                  channels_last._grad_sums_tasks, channels_last._pointwise_bwd_tasks,
                  channels_last._dot_pixels_tasks, channels_last._scale_add_pixels_tasks,
                  channels_last_conv._depthwise_bwd_tasks)


class ConvBNActCache(NamedTuple):
    kind: str
    conv: tuple                # the convolution's cache (its input x and weight)
    bn: BatchNormActCache      # batch norm + act's cache (its input: the conv output y)


def _check_kind(kind, groups):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "conv" and groups != 1:
        raise ValueError(f"kind 'conv' is a dense convolution (groups=1), got groups={groups}")


# ----------------------------------------------------------------------------- naive

def _conv(x, w, kind, stride, padding, dilation, groups, impl):
    if kind == "pointwise":
        return pointwise_forward(x, w, impl=impl)
    if kind == "depthwise":
        return depthwise_forward(x, w, stride=stride, padding=padding, dilation=dilation,
                                 impl=impl)
    return conv2d_forward(x, w, stride=stride, padding=padding, dilation=dilation,
                          groups=groups, impl=impl)


def _conv_grad(dy, cache, kind, need_dx, impl):
    if kind == "pointwise":
        dx, dw, _ = pointwise_backward(dy, cache, impl=impl)
        return (dx if need_dx else None), dw
    if kind == "depthwise":
        dx, dw, _ = depthwise_backward(dy, cache, impl=impl)
        return (dx if need_dx else None), dw
    dx, dw, _ = conv2d_backward(dy, cache, impl=impl, need_dx=need_dx)
    return dx, dw


def conv_bn_act_forward_naive(x, w, weight, bias, running_mean, running_var, *, kind,
                              stride=1, padding=0, dilation=1, groups=1, act, training,
                              momentum=0.1, eps=1e-5, num_batches_tracked=0, keep_pre=False):
    """The convolution's naive kernel, then ``batchnorm_act_forward_naive``.
    Returns ``(z, ConvBNActCache, BatchNormStats)``."""
    _check_kind(kind, groups)
    y, c_conv = _conv(x, w, kind, stride, padding, dilation, groups, "naive")
    z, c_bn, stats = batchnorm_act_forward(
        y, weight, bias, running_mean, running_var, act=act, training=training,
        momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
        keep_pre=keep_pre, impl="naive")
    return z, ConvBNActCache(kind, c_conv, c_bn), stats


def conv_bn_act_backward_naive(dz, cache: ConvBNActCache, need_dx: bool = True):
    """``batchnorm_act_backward_naive``, then the convolution's naive backward.
    Returns ``(dx, dw, dweight, dbias)`` (dx None unless ``need_dx``)."""
    kind, c_conv, c_bn = cache
    dy, dweight, dbias = batchnorm_act_backward(dz, c_bn, impl="naive")
    dx, dw = _conv_grad(dy, c_conv, kind, need_dx, "naive")
    return dx, dw, dweight, dbias


# ----------------------------------------------------------------------------- fast

def _fused(kind, x, w, groups):
    """The fast fused loops cover the network's convolutions; anything else composes."""
    if kind == "conv":
        return w.shape[1] * w.shape[2] * w.shape[3] <= DIRECT_MAX_TAPS
    return True


def _conv_fwd_fast(x, w, kind, stride, padding, dilation, stats):
    """y in channels-last memory (N, Ho, Wo, K), its batch statistics mv (2, K), conv cache."""
    K = w.shape[0]
    mv = np.zeros((2, K))
    if kind == "pointwise":
        _check_pointwise(x, w, None)
        xl = to_nhwc(x)                                                # (N, H, W, C)
        N, H, W, C = xl.shape
        x2 = xl.reshape(-1, C)                                         # (P, C)
        y = np.empty((N, H, W, K), x.dtype)
        wt = np.ascontiguousarray(w.reshape(K, C).T)                   # (C, K)
        pointwise_fwd(x2, wt, band_rows(C + K, len(x2)), num_tasks(len(x2)), stats,
                      y.reshape(-1, K), mv)
        return y, mv, PointwiseCache(nchw_view(xl), w, False)
    if kind == "depthwise":
        Ho, Wo = _check_dw_args(x, w, None, stride, padding, dilation)
        xl = to_nhwc(x)
        N, k = xl.shape[0], w.shape[2]
        wl = np.ascontiguousarray(w.reshape(K, k * k).T)               # (k*k, C)
        y = np.empty((N, Ho, Wo, K), x.dtype)
        rb = max(1, -(-Ho * N // num_tasks(N * Ho)))                   # rows per task
        geom = (k, stride, padding, dilation)
        depthwise_fwd(xl, wl, np.zeros(K, x.dtype), geom, flat_taps(geom, K),
                      min(rb, Ho), stats, y, mv)
        return y, mv, DepthwiseCache(nchw_view(xl), w, False, stride, padding, dilation)
    Ho, Wo = _check_conv_args(x, w, None, stride, padding, dilation, 1)
    xc = np.ascontiguousarray(x)                                       # NCHW input (the image)
    cols = im2col(xc, (w.shape[2], stride, padding, dilation), Ho, Wo)  # (P, C*k*k)
    y = np.empty((x.shape[0], Ho, Wo, K), x.dtype)
    CKK = cols.shape[1]
    pointwise_fwd(cols, np.ascontiguousarray(w.reshape(K, CKK).T), band_rows(CKK + K, len(cols)),
                  num_tasks(len(cols)), stats, y.reshape(-1, K), mv)
    return y, mv, Conv2dCache(xc, w, False, stride, padding, dilation, 1)


def conv_bn_act_forward_fast(x, w, weight, bias, running_mean, running_var, *, kind,
                             stride=1, padding=0, dilation=1, groups=1, act, training,
                             momentum=0.1, eps=1e-5, num_batches_tracked=0, keep_pre=False):
    """Same contract as the naive version; the output is channels-last in memory."""
    _check_kind(kind, groups)
    _check_act(act)
    check_array("x", x, ndim=4)
    if not _fused(kind, x, w, groups):
        y, c_conv = _conv(x, w, kind, stride, padding, dilation, groups, "fast")
        z, c_bn, stats = batchnorm_act_forward(
            y, weight, bias, running_mean, running_var, act=act, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
            keep_pre=keep_pre)
        return z, ConvBNActCache(kind, c_conv, c_bn), stats
    if training:        # on an empty cache: the step's loops, shared with a helper process
        compile_ahead(TRAINING_TASKS, x.dtype)
    with single_threaded_blas():
        y, mv, c_conv = _conv_fwd_fast(x, w, kind, stride, padding, dilation, training)
        K = y.shape[3]
        yv = nchw_view(y)
        _check_bn_args(yv, weight, bias, running_mean, running_var, training)
        y2 = y.reshape(-1, K)
        mean, rstd, bc, stats = bn_affine(mv, weight, bias, running_mean, running_var,
                                          training, momentum, eps, num_batches_tracked,
                                          len(y2))
        z = np.empty_like(y)
        pre = np.empty_like(y) if keep_pre else np.empty((0, 0, 0, K), y.dtype)
        affine_act(y2, bc, act_code(act), kernel_consts(y.dtype), num_tasks(len(y2)),
                   z.reshape(-1, K), pre.reshape(-1, K))
    c_bn = BatchNormActCache(BatchNormCache(yv, weight, mean, rstd, training), act, bc[0],
                             bc[1], nchw_view(pre) if keep_pre else None)
    return nchw_view(z), ConvBNActCache(kind, c_conv, c_bn), stats


def conv_bn_act_backward_fast(dz, cache: ConvBNActCache, need_dx: bool = True):
    """Same contract as the naive version: ``(dx, dw, dweight, dbias)``."""
    kind, c_conv, c_bn = cache
    bn = c_bn.bn
    if c_bn.alpha is None or not _fused(kind, None, c_conv.w, 1):    # a composed forward
        dy, dweight, dbias = batchnorm_act_backward(dz, c_bn)
        dx, dw = _conv_grad(dy, c_conv, kind, need_dx, "fast")
        return dx, dw, dweight, dbias
    check_array("dout", dz, ndim=4, dtype=bn.x.dtype)
    if dz.shape != bn.x.shape:
        raise ValueError(f"dout must have the forward output's shape {bn.x.shape}, got "
                         f"{dz.shape}")
    with single_threaded_blas():
        yl, dl = to_nhwc(bn.x), to_nhwc(dz)                            # (N, Ho, Wo, K)
        K, dt = yl.shape[3], yl.dtype
        y2, d2 = yl.reshape(-1, K), dl.reshape(-1, K)
        bc = coefs(c_bn.alpha, c_bn.beta, bn.mean)
        kc = kernel_consts(dt)
        code = act_code(c_bn.act)
        sums = np.empty((2, K))
        grad_sums(y2, d2, bc, code, kc, num_tasks(len(y2)), sums)
        mode, dweight, dbias = bn_backward_coefs(bc, bn, sums, len(y2))
        dx, dw = _conv_bwd_fast(kind, c_conv, yl, dl, bc, code, mode, kc, need_dx)
    return dx, dw, dweight, dbias


def _conv_bwd_fast(kind, c, yl, dl, bc, code, mode, kc, need_dx):
    w = c.w
    K, dt = w.shape[0], w.dtype
    if kind == "pointwise":
        xl = to_nhwc(c.x)
        C = xl.shape[3]
        x2 = xl.reshape(-1, C)
        dx = np.empty_like(xl) if need_dx else np.empty((0, 0, 0, C), dt)
        dw = np.empty((K, C), dt)
        w2 = np.ascontiguousarray(w.reshape(K, C))
        pointwise_bwd(x2, yl.reshape(-1, K), dl.reshape(-1, K), w2, bc, code, mode, kc,
                      grad_band_rows(C, K, len(x2)), num_tasks(len(x2)), need_dx,
                      dx.reshape(-1, C), dw)
        return (nchw_view(dx) if need_dx else None), dw.reshape(w.shape)
    if kind == "depthwise":
        xl = to_nhwc(c.x)
        k = w.shape[2]
        dx = np.empty_like(xl)
        dwl = np.empty((k * k, K), dt)
        geom = (k, c.stride, c.padding, c.dilation)
        depthwise_bwd(xl, yl, dl, np.ascontiguousarray(w.reshape(K, k * k).T), bc, code, mode,
                      kc, geom, flat_taps(geom, K), dx, dwl,
                      np.empty(K, dt))
        dx = nchw_view(dx) if need_dx else None                         # (computed anyway)
        return dx, np.ascontiguousarray(dwl.T).reshape(w.shape)
    Ho, Wo = yl.shape[1], yl.shape[2]
    geom = (w.shape[2], c.stride, c.padding, c.dilation)
    cols = im2col(np.ascontiguousarray(c.x), geom, Ho, Wo)              # (P, C*k*k) again
    CKK = cols.shape[1]
    dwc = np.empty((K, CKK), dt)
    pointwise_bwd(cols, yl.reshape(-1, K), dl.reshape(-1, K),
                  np.ascontiguousarray(w.reshape(K, CKK)), bc, code, mode, kc,
                  grad_band_rows(CKK, K, len(cols)), num_tasks(len(cols)), False, cols[:0], dwc)
    dx = None
    if need_dx:                    # rare (the image's gradient): dy stored, the generic dx
        dy = np.empty_like(yl)
        bn_dx(yl.reshape(-1, K), dl.reshape(-1, K), bc, code, mode, kc,
              num_tasks(yl.size // K), dy.reshape(-1, K))
        dx = conv2d_backward(nchw_view(dy), c)[0]
    return dx, dwc.reshape(w.shape)


# ----------------------------------------------------------------------------- public API

def conv_bn_act_forward(x, w, weight, bias, running_mean, running_var, *, kind, stride=1,
                        padding=0, dilation=1, groups=1, act, training, momentum=0.1, eps=1e-5,
                        num_batches_tracked=0, keep_pre=False, impl="fast"):
    """z = act(batchnorm(conv(x, w))): x (N, C, H, W), w (K, C/groups, k, k), batch norm's
    weight, bias, running_mean, running_var (K,); act None, "relu" or "hardswish".

    Returns ``(z (N, K, Ho, Wo), cache, BatchNormStats)`` with the values of the convolution
    kernel followed by ``batchnorm_act_forward``; ``keep_pre`` keeps batch norm's output in
    ``cache.bn.pre`` and the conv output is ``cache.bn.bn.x`` (``forward_intermediates``).
    """
    f = choose_impl(impl, conv_bn_act_forward_fast, conv_bn_act_forward_naive)
    return f(x, w, weight, bias, running_mean, running_var, kind=kind, stride=stride,
             padding=padding, dilation=dilation, groups=groups, act=act, training=training,
             momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
             keep_pre=keep_pre)


def conv_bn_act_backward(dout, cache, *, need_dx=True, impl="fast"):
    """Gradients of ``conv_bn_act_forward``: ``(dx, dw, dweight, dbias)``; dx None when
    ``need_dx`` is false (the network's input needs none in training)."""
    f = choose_impl(impl, conv_bn_act_backward_fast, conv_bn_act_backward_naive)
    return f(dout, cache, need_dx)
