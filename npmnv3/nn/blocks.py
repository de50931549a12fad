"""MobileNetV3's blocks as forward/backward pairs, composed from the kernels.

Legend: N batch, C in-channels, E expanded channels, K out-channels, H W in, Ho Wo out.

Every block is a pair, like the kernels themselves (CS231n's layer "sandwich"):

    out, cache = <block>_forward(x, m, p, ctx)      # m: the module (``modules.py``), p: weights
    dx, grads  = <block>_backward(dout, cache)      # grads: {state_dict key: gradient}

``p`` maps torchvision's state_dict keys to arrays (parameters and buffers). ``ctx`` says how
to run (train or eval mode, naive or fast kernels, batch-norm eps and momentum); it also
carries what a forward hands back besides its output: ``ctx.updates`` receives the new
running statistics of every batch norm in training mode (the kernels return them; nothing is
written into ``p``), and ``ctx.record``, when it is a dict, receives the output of every module
torchvision names (``forward_intermediates``). Recording never changes which kernel runs.

Backward undoes the forward in reverse order. Where a tensor feeds two places its gradient is
the sum of both branches': the residual add (``dx = dx_block + dout``) here, SE's input (the
squeeze and the channel scale) inside ``kernels/se.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import kernels as K
from .modules import Classifier, ConvBNAct, InvertedResidual, SqueezeExcite


class Ctx(NamedTuple):
    """How a forward runs, and what it hands back besides its output."""
    training: bool
    impl: str = "fast"
    bn_eps: float = 1e-3              # torchvision mobilenetv3.py: BatchNorm2d(eps=0.001,
    bn_momentum: float | None = 0.01  #                                momentum=0.01)
    updates: dict | None = None       # training: key -> new running statistic
    record: dict | None = None        # module name -> output, if recording
    rng: object = None                # dropout's numpy Generator (train mode)


# ----------------------------------------------------------------------------- Conv-BN-Act

class ConvBNActCache(NamedTuple):
    m: ConvBNAct
    impl: str
    kernel: tuple          # conv_bn_act's cache (the conv input x, the conv output y)


def conv_bn_act_forward(x, m: ConvBNAct, p, ctx: Ctx):
    """torchvision's ``Conv2dNormActivation``:  z = act(BN(conv(x, W))), one kernel
    (``kernels/convbn.py``). x (N, C, H, W) -> z (N, K, Ho, Wo); act is ReLU, hard-swish or
    none (the projection)."""
    bn = f"{m.name}.1"
    z, c, stats = K.conv_bn_act_forward(
        x, p[f"{m.name}.0.weight"], p[f"{bn}.weight"], p[f"{bn}.bias"],
        p[f"{bn}.running_mean"], p[f"{bn}.running_var"], kind=m.kind, stride=m.stride,
        padding=m.padding, dilation=m.dilation, groups=m.groups, act=m.act,
        training=ctx.training, momentum=ctx.bn_momentum, eps=ctx.bn_eps,
        num_batches_tracked=int(p[f"{bn}.num_batches_tracked"]),
        keep_pre=ctx.record is not None, impl=ctx.impl)                  # (N, K, Ho, Wo)
    if ctx.training:
        ctx.updates[f"{bn}.running_mean"] = stats.running_mean
        ctx.updates[f"{bn}.running_var"] = stats.running_var
        ctx.updates[f"{bn}.num_batches_tracked"] = np.array(stats.num_batches_tracked,
                                                            dtype=np.int64)
    if ctx.record is not None:                 # conv output, BN output, activation output
        ctx.record.update({f"{m.name}.0": c.bn.bn.x, f"{m.name}.1": c.bn.pre, m.name: z})
        if m.act:
            ctx.record[f"{m.name}.2"] = z
    return z, ConvBNActCache(m, ctx.impl, c)


def conv_bn_act_backward(dz, cache: ConvBNActCache, need_dx: bool = True):
    """dL/dx and {conv weight, BN weight, BN bias: gradients} from dz = dL/dz.

    ``need_dx=False`` skips dL/dx (the network's input needs none in training)."""
    m, impl, c = cache
    dx, dw, dgamma, dbeta = K.conv_bn_act_backward(dz, c, need_dx=need_dx, impl=impl)
    return dx, {f"{m.name}.0.weight": dw, f"{m.name}.1.weight": dgamma,
                f"{m.name}.1.bias": dbeta}


# ----------------------------------------------------------------------------- squeeze-excite

class SqueezeExciteCache(NamedTuple):
    m: SqueezeExcite
    impl: str
    se: tuple


_SE_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def squeeze_excite_forward(x, m: SqueezeExcite, p, ctx: Ctx):
    """torchvision's ``SqueezeExcitation`` (MobileNetV3 §5.3):
    out = x * hardsigmoid(fc2(relu(fc1(avgpool(x))))), x (N, E, H, W) -> out (N, E, H, W)."""
    out, c_se = K.se_forward(x, *(p[f"{m.name}.{k}"] for k in _SE_KEYS), impl=ctx.impl)
    if ctx.record is not None:                 # its submodules' outputs, read off the cache
        N, C = x.shape[:2]
        S = m.squeeze
        ctx.record.update({
            f"{m.name}.avgpool": c_se.fc1.x.reshape(N, C, 1, 1),
            f"{m.name}.fc1": c_se.act.x.reshape(N, S, 1, 1),
            f"{m.name}.activation": c_se.fc2.x.reshape(N, S, 1, 1),
            f"{m.name}.fc2": c_se.gate_act.x.reshape(N, C, 1, 1),
            f"{m.name}.scale_activation": c_se.gate.reshape(N, C, 1, 1),
            m.name: out})
    return out, SqueezeExciteCache(m, ctx.impl, c_se)


def squeeze_excite_backward(dout, cache: SqueezeExciteCache):
    """dL/dx (the scale's and the squeeze's branches summed) and the fc gradients."""
    m, impl, c_se = cache
    dx, *g = K.se_backward(dout, c_se, impl=impl)
    return dx, {f"{m.name}.{k}": gk for k, gk in zip(_SE_KEYS, g)}


# ----------------------------------------------------------------------------- inverted residual

class InvertedResidualCache(NamedTuple):
    m: InvertedResidual
    expand: ConvBNActCache | None
    depthwise: ConvBNActCache
    se: SqueezeExciteCache | None
    project: ConvBNActCache


def inverted_residual_forward(x, m: InvertedResidual, p, ctx: Ctx):
    """torchvision's ``InvertedResidual`` (the paper's bneck, Fig. 4):
    expand 1x1 (if E != C) -> depthwise k x k -> SE (if any) -> project 1x1 (no activation),
    plus the input when stride 1 and C == K.  x (N, C, H, W) -> out (N, K, Ho, Wo)."""
    h, c_exp = x, None
    if m.expand is not None:
        h, c_exp = conv_bn_act_forward(h, m.expand, p, ctx)          # (N, E, H, W)
    h, c_dw = conv_bn_act_forward(h, m.depthwise, p, ctx)            # (N, E, Ho, Wo)
    c_se = None
    if m.se is not None:
        h, c_se = squeeze_excite_forward(h, m.se, p, ctx)            # (N, E, Ho, Wo)
    y, c_proj = conv_bn_act_forward(h, m.project, p, ctx)            # (N, K, Ho, Wo)
    if ctx.record is not None:
        ctx.record[f"{m.name}.block"] = y
    out = y + x if m.spec.use_residual else y                        # x also takes the skip
    if ctx.record is not None:
        ctx.record[m.name] = out
    return out, InvertedResidualCache(m, c_exp, c_dw, c_se, c_proj)


def inverted_residual_backward(dout, cache: InvertedResidualCache):
    """dL/dx and every gradient of the block, the forward undone step by step."""
    grads = {}
    dh, g = conv_bn_act_backward(dout, cache.project)                # d(depthwise/SE output)
    grads.update(g)
    if cache.se is not None:
        dh, g = squeeze_excite_backward(dh, cache.se)
        grads.update(g)
    dh, g = conv_bn_act_backward(dh, cache.depthwise)                # d(expand output)
    grads.update(g)
    if cache.expand is not None:
        dh, g = conv_bn_act_backward(dh, cache.expand)               # d(block input)
        grads.update(g)
    dx = dh + dout if cache.m.spec.use_residual else dh              # x fed block and skip
    return dx, grads


# ----------------------------------------------------------------------------- classifier head

class ClassifierCache(NamedTuple):
    impl: str
    pool: tuple
    fc0: tuple
    act: tuple
    drop: tuple
    fc3: tuple


def classifier_forward(x, m: Classifier, p, ctx: Ctx):
    """avgpool, flatten, ``classifier`` = Linear, Hardswish, Dropout, Linear:
    x (N, C, h, w) -> logits (N, num_classes). Dropout draws from ``ctx.rng`` in training."""
    impl = ctx.impl
    pooled, c_pool = K.avgpool_forward(x, impl=impl)                    # (N, C, 1, 1)
    flat = pooled.reshape(pooled.shape[0], -1)                          # torch.flatten(x, 1)
    h, c_fc0 = K.linear_forward(flat, p["classifier.0.weight"], p["classifier.0.bias"],
                                impl=impl)                              # (N, hidden)
    a, c_act = K.hardswish_forward(h, impl=impl)
    d, c_drop = K.dropout_forward(a, m.dropout, training=ctx.training, rng=ctx.rng, impl=impl)
    logits, c_fc3 = K.linear_forward(d, p["classifier.3.weight"], p["classifier.3.bias"],
                                     impl=impl)                         # (N, num_classes)
    if ctx.record is not None:
        ctx.record.update({"avgpool": pooled, "classifier.0": h, "classifier.1": a,
                           "classifier.2": d, "classifier.3": logits, "classifier": logits})
    return logits, ClassifierCache(impl, c_pool, c_fc0, c_act, c_drop, c_fc3)


def classifier_backward(dlogits, cache: ClassifierCache):
    """dL/d(features output) (N, C, h, w) and the classifier's gradients."""
    impl = cache.impl
    dd, dw3, db3 = K.linear_backward(dlogits, cache.fc3, impl=impl)
    da = K.dropout_backward(dd, cache.drop, impl=impl)
    dh = K.hardswish_backward(da, cache.act, impl=impl)
    dflat, dw0, db0 = K.linear_backward(dh, cache.fc0, impl=impl)
    N, C = dflat.shape
    dx = K.avgpool_backward(dflat.reshape(N, C, 1, 1), cache.pool, impl=impl)
    return dx, {"classifier.0.weight": dw0, "classifier.0.bias": db0,
                "classifier.3.weight": dw3, "classifier.3.bias": db3}
