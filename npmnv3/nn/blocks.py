"""MobileNetV3's blocks as forward/backward pairs (placeholder on branch ``seg``).

This file stands in for the lead's ``nn/blocks.py`` until it lands on main, with the same
calling convention (``out, cache = <block>_forward(x, m, p, ctx)``, ``dx, grads =
<block>_backward(dout, cache)``, ``Ctx``); on ``git merge main`` main's version replaces it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import kernels as K
from .modules import ConvBNAct, InvertedResidual, SqueezeExcite


class Ctx(NamedTuple):
    """How a forward runs, and what it hands back besides its output."""
    training: bool
    impl: str = "fast"
    bn_eps: float = 1e-3              # torchvision mobilenetv3.py: BatchNorm2d(eps=0.001,
    bn_momentum: float | None = 0.01  #                                momentum=0.01)
    updates: dict | None = None       # training: key -> new running statistic
    record: dict | None = None        # module name -> output, if recording
    rng: object = None                # dropout's numpy Generator (train mode)


class ConvBNActCache(NamedTuple):
    m: ConvBNAct
    impl: str
    conv: tuple
    bn: tuple
    act: tuple | None      # the activation's cache when BN and it ran apart (recording)
    fused: bool            # batchnorm_act ran (nothing recorded)


def conv_bn_act_forward(x, m: ConvBNAct, p, ctx: Ctx):
    """torchvision's ``Conv2dNormActivation``: z = act(BN(conv(x, W)))."""
    w, impl = p[f"{m.name}.0.weight"], ctx.impl
    if m.kind == "depthwise":
        y, c_conv = K.depthwise_forward(x, w, stride=m.stride, padding=m.padding,
                                        dilation=m.dilation, impl=impl)
    elif m.kind == "pointwise":
        y, c_conv = K.pointwise_forward(x, w, impl=impl)
    else:
        y, c_conv = K.conv2d_forward(x, w, stride=m.stride, padding=m.padding,
                                     dilation=m.dilation, groups=m.groups, impl=impl)
    bn = f"{m.name}.1"
    args = (p[f"{bn}.weight"], p[f"{bn}.bias"], p[f"{bn}.running_mean"], p[f"{bn}.running_var"])
    kw = dict(training=ctx.training, momentum=ctx.bn_momentum, eps=ctx.bn_eps,
              num_batches_tracked=int(p[f"{bn}.num_batches_tracked"]), impl=impl)
    c_act = None
    if ctx.record is None:
        z, c_bn, stats = K.batchnorm_act_forward(y, *args, act=m.act, **kw)
    else:
        z, c_bn, stats = K.batchnorm_forward(y, *args, **kw)
        ctx.record.update({f"{m.name}.0": y, f"{m.name}.1": z})
        if m.act:
            z, c_act = K.activation_forward(m.act, z, impl=impl)
            ctx.record[f"{m.name}.2"] = z
        ctx.record[m.name] = z
    if ctx.training:
        ctx.updates[f"{bn}.running_mean"] = stats.running_mean
        ctx.updates[f"{bn}.running_var"] = stats.running_var
        ctx.updates[f"{bn}.num_batches_tracked"] = np.array(stats.num_batches_tracked, np.int64)
    return z, ConvBNActCache(m, impl, c_conv, c_bn, c_act, ctx.record is None)


def conv_bn_act_backward(dz, cache: ConvBNActCache, need_dx: bool = True):
    """dL/dx and {conv weight, BN weight, BN bias: gradients} from dz = dL/dz."""
    m, impl, c_conv, c_bn, c_act, fused = cache
    if fused:
        dy, dgamma, dbeta = K.batchnorm_act_backward(dz, c_bn, impl=impl)
    else:
        if c_act is not None:
            dz = K.activation_backward(m.act, dz, c_act, impl=impl)
        dy, dgamma, dbeta = K.batchnorm_backward(dz, c_bn, impl=impl)
    if m.kind == "depthwise":
        dx, dw, _ = K.depthwise_backward(dy, c_conv, impl=impl)
    elif m.kind == "pointwise":
        dx, dw, _ = K.pointwise_backward(dy, c_conv, impl=impl)
    else:
        dx, dw, _ = K.conv2d_backward(dy, c_conv, impl=impl, need_dx=need_dx)
    return dx, {f"{m.name}.0.weight": dw, f"{m.name}.1.weight": dgamma,
                f"{m.name}.1.bias": dbeta}


class InvertedResidualCache(NamedTuple):
    m: InvertedResidual
    layers: tuple


def inverted_residual_forward(x, m: InvertedResidual, p, ctx: Ctx):
    """torchvision's ``InvertedResidual``: [expand] depthwise [SE] project (+ x)."""
    h, caches = x, []
    for layer in m.layers:
        if isinstance(layer, SqueezeExcite):
            keys = [f"{layer.name}.{k}" for k in ("fc1.weight", "fc1.bias", "fc2.weight",
                                                  "fc2.bias")]
            out, c = K.se_forward(h, *(p[k] for k in keys), impl=ctx.impl)
            if ctx.record is not None:
                N, C = h.shape[:2]
                S = layer.squeeze
                ctx.record.update({
                    f"{layer.name}.avgpool": c.fc1.x.reshape(N, C, 1, 1),
                    f"{layer.name}.fc1": c.act.x.reshape(N, S, 1, 1),
                    f"{layer.name}.activation": c.fc2.x.reshape(N, S, 1, 1),
                    f"{layer.name}.fc2": c.gate_act.x.reshape(N, C, 1, 1),
                    f"{layer.name}.scale_activation": c.gate.reshape(N, C, 1, 1),
                    layer.name: out})
            h = out
            caches.append(("se", layer, ctx.impl, c))
        else:
            h, c = conv_bn_act_forward(h, layer, p, ctx)
            caches.append(("conv", layer, ctx.impl, c))
    if ctx.record is not None:
        ctx.record[f"{m.name}.block"] = h
    out = h + x if m.spec.use_residual else h
    if ctx.record is not None:
        ctx.record[m.name] = out
    return out, InvertedResidualCache(m, tuple(caches))


def inverted_residual_backward(dout, cache: InvertedResidualCache):
    grads, dh = {}, dout
    for kind, layer, impl, c in reversed(cache.layers):
        if kind == "se":
            dh, *g = K.se_backward(dh, c, impl=impl)
            grads.update({f"{layer.name}.{k}": gk for k, gk in zip(
                ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), g)})
        else:
            dh, g = conv_bn_act_backward(dh, c)
            grads.update(g)
    return (dh + dout if cache.m.spec.use_residual else dh), grads
