"""The segmentation heads as forward/backward pairs over the kernels, torchvision's keys.

Legend: N batch, Cl Ch low-/high-level channels (40, 960 on MobileNetV3-Large), K classes,
hl wl / hh wh the low-level (output stride 8) / high-level (stride 16) feature map sizes.

* ``LRASPPHead`` (MobileNetV3 §6.3, torchvision ``segmentation/lraspp.py`` ``LRASPPHead``):
      x = relu(bn(conv1x1(high)))              (N, 128, hh, wh)   ``cbr``
      s = sigmoid(conv1x1(avgpool(high)))      (N, 128, 1, 1)     ``scale``: a global gate
      y = up(x * s, to (hl, wl))               bilinear, align_corners=False
      out = low_classifier(low) + high_classifier(y)       (N, K, hl, wl), 1x1 convs with bias
* ``DeepLabHead`` (arXiv:1706.05587, torchvision ``segmentation/deeplabv3.py``): ASPP = five
  branches on x (1x1 conv-BN-ReLU; three 3x3 conv-BN-ReLU with dilation 12, 24, 36; global pool
  -> 1x1 conv-BN-ReLU -> upsampled back), concatenated, 1x1 projection-BN-ReLU, dropout 0.5;
  then 3x3 conv-BN-ReLU and a 1x1 conv with bias to K classes.
* ``FCNHead`` (torchvision ``segmentation/fcn.py``, DeepLabV3's auxiliary classifier on the
  low-level features): 3x3 conv-BN-ReLU to C/4 channels, dropout 0.1, 1x1 conv with bias.

The heads' batch norms are ``nn.BatchNorm2d`` defaults (eps 1e-5, momentum 0.1), unlike the
backbone's (1e-3, 0.01). A tensor used by several branches (LR-ASPP's ``high``, ASPP's input)
gets the sum of their gradients, written out in each ``backward``. Every forward records each
module's output under its torchvision name when ``ctx.record`` is a dict (recording never
changes which kernel runs), and returns ``(out, cache)``; every
backward returns the input gradient(s) and a dict of parameter gradients by key. The calling
convention is ``blocks.py``'s: ``forward(x, p, ctx)`` with ``p`` the state_dict-keyed arrays
(parameters and buffers) and ``ctx`` the mode; new running statistics go to ``ctx.updates``,
module outputs to ``ctx.record`` (when a dict), dropout draws from ``ctx.rng``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import kernels as K
from .blocks import Ctx

HEAD_BN_EPS = 1e-5          # torch.nn.BatchNorm2d defaults: the heads use plain BatchNorm2d
HEAD_BN_MOMENTUM = 0.1


def _record(ctx: Ctx, name, value):
    if ctx.record is not None:
        ctx.record[name] = value


# ----------------------------------------------------------------------------- building blocks

@dataclass(frozen=True)
class Conv:
    """``nn.Conv2d`` (groups 1), keys ``name.weight`` [+ ``name.bias``]."""
    name: str
    cin: int
    cout: int
    k: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = False

    def layout(self):
        yield f"{self.name}.weight", (self.cout, self.cin, self.k, self.k), "param"
        if self.bias:
            yield f"{self.name}.bias", (self.cout,), "param"

    def forward(self, x, p, ctx: Ctx):
        w = p[f"{self.name}.weight"]
        b = p[f"{self.name}.bias"] if self.bias else None
        if self.k == 1:
            y, cache = K.pointwise_forward(x, w, b, impl=ctx.impl)
        else:
            y, cache = K.conv2d_forward(x, w, b, padding=self.padding, dilation=self.dilation,
                                        impl=ctx.impl)
        _record(ctx, self.name, y)
        return y, cache

    def backward(self, dy, cache, impl, grads):
        back = K.pointwise_backward if self.k == 1 else K.conv2d_backward
        dx, dw, db = back(dy, cache, impl=impl)
        grads[f"{self.name}.weight"] = dw
        if self.bias:
            grads[f"{self.name}.bias"] = db
        return dx


@dataclass(frozen=True)
class ConvBNReLU:
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU with the three modules' names given (they sit
    at different indices in LR-ASPP's ``cbr``, ASPP's branches and the heads' Sequentials)."""
    conv: Conv
    bn: str
    relu: str

    @classmethod
    def of(cls, names, cin, cout, k=1, padding=0, dilation=1):
        c, b, r = names
        return cls(Conv(c, cin, cout, k, padding, dilation), b, r)

    def layout(self):
        yield from self.conv.layout()
        C = self.conv.cout
        yield f"{self.bn}.weight", (C,), "param"
        yield f"{self.bn}.bias", (C,), "param"
        yield f"{self.bn}.running_mean", (C,), "buffer"
        yield f"{self.bn}.running_var", (C,), "buffer"
        yield f"{self.bn}.num_batches_tracked", (), "buffer"

    def forward(self, x, p, ctx: Ctx):
        y, c_conv = self.conv.forward(x, p, ctx)
        bn = self.bn
        args = (p[f"{bn}.weight"], p[f"{bn}.bias"], p[f"{bn}.running_mean"],
                p[f"{bn}.running_var"])
        kw = dict(training=ctx.training, momentum=HEAD_BN_MOMENTUM, eps=HEAD_BN_EPS,
                  num_batches_tracked=int(p[f"{bn}.num_batches_tracked"]), impl=ctx.impl)
        z, c_bn, stats = K.batchnorm_act_forward(y, *args, act="relu",
                                                 keep_pre=ctx.record is not None, **kw)
        if ctx.record is not None:                    # BN's output: the pre-activation
            ctx.record.update({bn: c_bn.pre, self.relu: z})
        if ctx.training:
            ctx.updates[f"{bn}.running_mean"] = stats.running_mean
            ctx.updates[f"{bn}.running_var"] = stats.running_var
            ctx.updates[f"{bn}.num_batches_tracked"] = np.array(stats.num_batches_tracked,
                                                                np.int64)
        return z, (c_conv, c_bn)

    def backward(self, dz, cache, impl, grads):
        c_conv, c_bn = cache
        dy, dw, db = K.batchnorm_act_backward(dz, c_bn, impl=impl)        # through ReLU and BN
        grads[f"{self.bn}.weight"], grads[f"{self.bn}.bias"] = dw, db
        return self.conv.backward(dy, c_conv, impl, grads)


def _dropout_forward(ctx: Ctx, name, x, prob):
    y, cache = K.dropout_forward(x, prob, training=ctx.training, rng=ctx.rng, impl=ctx.impl)
    _record(ctx, name, y)
    return y, cache


# ----------------------------------------------------------------------------- LR-ASPP

@dataclass
class LRASPPHead:
    """torchvision ``LRASPPHead(low_channels, high_channels, num_classes, inter_channels)``."""
    low_channels: int
    high_channels: int
    num_classes: int
    inter_channels: int = 128
    name: str = "classifier"
    cbr: ConvBNReLU = field(init=False)
    scale_conv: Conv = field(init=False)
    low_classifier: Conv = field(init=False)
    high_classifier: Conv = field(init=False)

    def __post_init__(self):
        n, ci = self.name, self.inter_channels
        self.cbr = ConvBNReLU.of((f"{n}.cbr.0", f"{n}.cbr.1", f"{n}.cbr.2"),
                                 self.high_channels, ci)
        self.scale_conv = Conv(f"{n}.scale.1", self.high_channels, ci)
        self.low_classifier = Conv(f"{n}.low_classifier", self.low_channels, self.num_classes,
                                   bias=True)
        self.high_classifier = Conv(f"{n}.high_classifier", ci, self.num_classes, bias=True)

    def layout(self):
        for m in (self.cbr, self.scale_conv, self.low_classifier, self.high_classifier):
            yield from m.layout()

    def module_names(self):
        n = self.name
        return [n, f"{n}.cbr", f"{n}.cbr.0", f"{n}.cbr.1", f"{n}.cbr.2", f"{n}.scale",
                f"{n}.scale.0", f"{n}.scale.1", f"{n}.scale.2", f"{n}.low_classifier",
                f"{n}.high_classifier"]

    def forward(self, low, high, p, ctx: Ctx):
        """low (N, Cl, hl, wl), high (N, Ch, hh, wh) -> (N, K, hl, wl)."""
        n, impl = self.name, ctx.impl
        x, c_cbr = self.cbr.forward(high, p, ctx)                              # (N, 128, hh, wh)
        _record(ctx, f"{n}.cbr", x)
        pooled, c_pool = K.avgpool_forward(high, impl=impl)                 # (N, Ch, 1, 1)
        _record(ctx, f"{n}.scale.0", pooled)
        g, c_sc = self.scale_conv.forward(pooled, p, ctx)                      # (N, 128, 1, 1)
        s, c_sig = K.sigmoid_forward(g, impl=impl)
        _record(ctx, f"{n}.scale.2", s)
        _record(ctx, f"{n}.scale", s)
        xs, c_mul = K.channel_scale_forward(x, s, impl=impl)               # x * s
        up, c_up = K.bilinear_forward(xs, low.shape[2:], impl=impl)         # (N, 128, hl, wl)
        a, c_low = self.low_classifier.forward(low, p, ctx)                    # (N, K, hl, wl)
        b, c_high = self.high_classifier.forward(up, p, ctx)
        out = a + b
        _record(ctx, n, out)
        return out, (impl, c_cbr, c_pool, c_sc, c_sig, c_mul, c_up, c_low, c_high)

    def backward(self, dout, cache):
        """Returns ``(dlow, dhigh, grads)``; ``high`` feeds cbr and scale: both add."""
        impl, c_cbr, c_pool, c_sc, c_sig, c_mul, c_up, c_low, c_high = cache
        grads = {}
        dlow = self.low_classifier.backward(dout, c_low, impl, grads)       # out = a + b
        dup = self.high_classifier.backward(dout, c_high, impl, grads)
        dxs = K.bilinear_backward(dup, c_up, impl=impl)
        dx, ds = K.channel_scale_backward(dxs, c_mul, impl=impl)
        dg = K.sigmoid_backward(ds, c_sig, impl=impl)
        dpooled = self.scale_conv.backward(dg, c_sc, impl, grads)
        dhigh_scale = K.avgpool_backward(dpooled, c_pool, impl=impl)
        dhigh_cbr = self.cbr.backward(dx, c_cbr, impl, grads)
        return dlow, dhigh_cbr + dhigh_scale, grads


# ----------------------------------------------------------------------------- DeepLabV3

ASPP_CHANNELS = 256             # torchvision ASPP(out_channels=256), DeepLabHead's 256s


@dataclass
class DeepLabHead:
    """torchvision ``DeepLabHead(in_channels, num_classes, atrous_rates=(12, 24, 36))``."""
    in_channels: int
    num_classes: int
    atrous_rates: tuple = (12, 24, 36)
    name: str = "classifier"
    dropout: float = 0.5        # ASPP's project.3
    branches: list = field(init=False)
    pool_branch: ConvBNReLU = field(init=False)
    project: ConvBNReLU = field(init=False)
    tail: ConvBNReLU = field(init=False)
    final: Conv = field(init=False)

    def __post_init__(self):
        a, C, cin = f"{self.name}.0", ASPP_CHANNELS, self.in_channels
        self.branches = [ConvBNReLU.of((f"{a}.convs.0.0", f"{a}.convs.0.1", f"{a}.convs.0.2"),
                                       cin, C)]
        for i, r in enumerate(self.atrous_rates, start=1):
            p = f"{a}.convs.{i}"
            self.branches.append(ConvBNReLU.of((f"{p}.0", f"{p}.1", f"{p}.2"), cin, C, 3,
                                               padding=r, dilation=r))
        q = f"{a}.convs.{len(self.branches)}"
        self.pool_branch = ConvBNReLU.of((f"{q}.1", f"{q}.2", f"{q}.3"), cin, C)
        nb = len(self.branches) + 1
        self.project = ConvBNReLU.of((f"{a}.project.0", f"{a}.project.1", f"{a}.project.2"),
                                     nb * C, C)
        n = self.name
        self.tail = ConvBNReLU.of((f"{n}.1", f"{n}.2", f"{n}.3"), C, C, 3, padding=1)
        self.final = Conv(f"{n}.4", C, self.num_classes, bias=True)

    @property
    def pool_name(self):
        return f"{self.name}.0.convs.{len(self.branches)}"

    def layout(self):
        for m in (*self.branches, self.pool_branch, self.project, self.tail, self.final):
            yield from m.layout()

    def module_names(self):
        n, a, q = self.name, f"{self.name}.0", self.pool_name
        names = [n, a, f"{a}.convs"]
        for i in range(len(self.branches)):
            names += [f"{a}.convs.{i}"] + [f"{a}.convs.{i}.{j}" for j in range(3)]
        names += [q] + [f"{q}.{j}" for j in range(4)]
        names += [f"{a}.project"] + [f"{a}.project.{j}" for j in range(4)]
        return names + [f"{n}.{j}" for j in range(1, 5)]

    def forward(self, x, p, ctx: Ctx):
        """x (N, Ch, h, w) -> (N, K, h, w)."""
        a, impl = f"{self.name}.0", ctx.impl
        ys, caches = [], []
        for i, br in enumerate(self.branches):
            y, c = br.forward(x, p, ctx)                                       # (N, 256, h, w)
            _record(ctx, f"{a}.convs.{i}", y)
            ys.append(y)
            caches.append(c)
        q = self.pool_name
        pooled, c_pool = K.avgpool_forward(x, impl=impl)                    # (N, Ch, 1, 1)
        _record(ctx, f"{q}.0", pooled)
        g, c_pb = self.pool_branch.forward(pooled, p, ctx)                     # (N, 256, 1, 1)
        up, c_up = K.bilinear_forward(g, x.shape[2:], impl=impl)            # (N, 256, h, w)
        _record(ctx, q, up)
        cat, c_cat = K.concat_forward(ys + [up], impl=impl)                 # (N, 1280, h, w)
        z, c_proj = self.project.forward(cat, p, ctx)
        z, c_drop = _dropout_forward(ctx, f"{a}.project.3", z, self.dropout)
        _record(ctx, f"{a}.project", z)
        _record(ctx, a, z)
        t, c_tail = self.tail.forward(z, p, ctx)
        out, c_final = self.final.forward(t, p, ctx)                           # (N, K, h, w)
        _record(ctx, self.name, out)
        return out, (impl, caches, c_pool, c_pb, c_up, c_cat, c_proj, c_drop, c_tail,
                     c_final)

    def backward(self, dout, cache):
        """Returns ``(dx, grads)``; x feeds the five ASPP branches: their gradients add."""
        impl, caches, c_pool, c_pb, c_up, c_cat, c_proj, c_drop, c_tail, c_final = cache
        grads = {}
        dt = self.final.backward(dout, c_final, impl, grads)
        dz = self.tail.backward(dt, c_tail, impl, grads)
        dz = K.dropout_backward(dz, c_drop, impl=impl)
        dcat = self.project.backward(dz, c_proj, impl, grads)
        *dys, dup = K.concat_backward(dcat, c_cat, impl=impl)
        dg = K.bilinear_backward(dup, c_up, impl=impl)
        dpooled = self.pool_branch.backward(dg, c_pb, impl, grads)
        dx = K.avgpool_backward(dpooled, c_pool, impl=impl)
        for br, dy, c in zip(self.branches, dys, caches):
            dx = dx + br.backward(dy, c, impl, grads)
        return dx, grads


@dataclass
class FCNHead:
    """torchvision ``FCNHead(in_channels, channels)``: conv3x3-BN-ReLU, dropout 0.1, conv1x1."""
    in_channels: int
    channels: int
    name: str = "aux_classifier"
    dropout: float = 0.1
    cbr: ConvBNReLU = field(init=False)
    final: Conv = field(init=False)

    def __post_init__(self):
        n, inter = self.name, self.in_channels // 4
        self.cbr = ConvBNReLU.of((f"{n}.0", f"{n}.1", f"{n}.2"), self.in_channels, inter, 3,
                                 padding=1)
        self.final = Conv(f"{n}.4", inter, self.channels, bias=True)

    def layout(self):
        yield from self.cbr.layout()
        yield from self.final.layout()

    def module_names(self):
        return [self.name] + [f"{self.name}.{j}" for j in range(5)]

    def forward(self, x, p, ctx: Ctx):
        y, c_cbr = self.cbr.forward(x, p, ctx)
        y, c_drop = _dropout_forward(ctx, f"{self.name}.3", y, self.dropout)
        out, c_final = self.final.forward(y, p, ctx)
        _record(ctx, self.name, out)
        return out, (ctx.impl, c_cbr, c_drop, c_final)

    def backward(self, dout, cache):
        """Returns ``(dx, grads)``."""
        impl, c_cbr, c_drop, c_final = cache
        grads = {}
        dy = self.final.backward(dout, c_final, impl, grads)
        dy = K.dropout_backward(dy, c_drop, impl=impl)
        return self.cbr.backward(dy, c_cbr, impl, grads), grads


def init_head(head, rng, dtype):
    """torch's default initialisation of the heads' layers (they are plain ``nn.Conv2d`` /
    ``nn.BatchNorm2d``; only the backbone gets MobileNetV3's init): conv weights and biases
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with a = sqrt(5)); BN ones and zeros,
    running statistics 0 and 1. Returns ``(params, buffers)``."""
    params, buffers = {}, {}
    fan_in = {}
    for key, shape, kind in head.layout():
        if kind == "buffer":
            buffers[key] = (np.array(0, np.int64) if key.endswith("num_batches_tracked") else
                            np.full(shape, 1.0 if key.endswith("running_var") else 0.0, dtype))
        elif len(shape) == 4:
            fan_in[key.rsplit(".", 1)[0]] = shape[1] * shape[2] * shape[3]
            bound = 1 / np.sqrt(fan_in[key.rsplit(".", 1)[0]])
            params[key] = rng.uniform(-bound, bound, shape).astype(dtype)
        elif key.rsplit(".", 1)[0] in fan_in:           # a conv's bias (it follows the weight)
            bound = 1 / np.sqrt(fan_in[key.rsplit(".", 1)[0]])
            params[key] = rng.uniform(-bound, bound, shape).astype(dtype)
        else:                                           # BN weight / bias
            params[key] = np.full(shape, 1.0 if key.endswith("weight") else 0.0, dtype)
    return params, buffers
