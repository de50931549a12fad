"""int8 MobileNetV3 from scratch: torchvision's quantized model, integer for integer.

``QuantizedMobileNetV3`` has the module tree, names and state_dict keys of torchvision's
``QuantizableMobileNetV3`` after ``fuse_model``, ``prepare_qat`` and ``convert``
(``torchvision/models/quantization/mobilenetv3.py``):

* ``quant`` (QuantStub -> ``Quantize``): float input -> quint8 with ``quant.scale``/``zero_point``;
* every Conv-BN(-ReLU) is one quantized conv ``<name>.0`` (``QuantizedConv2d`` or, with ReLU,
  ``QuantizedConvReLU2d``: BN folded into weight and bias before conversion, ReLU done by the
  output clamp); ``<name>.1`` and a fused ReLU's ``<name>.2`` became ``Identity``; hard-swish
  is ``QuantizedHardswish`` ``<name>.2`` with its own output scale / zero point;
* ``QuantizableSqueezeExcitation``: avgpool, ``fc1`` (ConvReLU), ``fc2``, ``scale_activation``
  (``nn.Hardsigmoid`` applied to a quint8 tensor: output scale 1/256, zero point 0) and
  ``skip_mul`` (``FloatFunctional.mul``: gate x input, requantized);
* ``QuantizableInvertedResidual``: the residual is ``skip_add`` (``FloatFunctional.add``); every
  block has ``skip_add.scale``/``zero_point`` in the state_dict, used or not;
* head: avgpool, ``classifier.0`` (``QuantizedLinear``), ``classifier.1`` (QuantizedHardswish),
  ``classifier.2`` (dropout: identity), ``classifier.3``; ``dequant`` -> float logits.

Weights are qint8 per tensor (torch's qnnpack qconfig) or per output channel (fbgemm/x86 and
``npmnv3.quantize``); activations quint8. The integer arithmetic is ``npmnv3.kernels``' int8
kernels, equal to torch's qnnpack engine (``tests/test_quantized_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import kernels as K
from ..io.pth import QTensor
from .config import MobileNetV3Config
from .modules import ConvBNAct, InvertedResidual, SqueezeExcite, build_modules


def qact(q, scale, zero_point) -> QTensor:
    """A quint8 activation: ``QTensor`` (the type ``npmnv3.load_pth`` returns), per tensor."""
    return QTensor(q, float(scale), int(zero_point), None, "quint8")


@dataclass(frozen=True)
class QUnit:
    """One quantized module with parameters: kind "conv" | "linear" | "qparams" | "quant"."""
    name: str
    kind: str
    cin: int = 0
    cout: int = 0
    k: int = 1
    groups: int = 1

    def keys(self):
        """(key, shape) in torchvision's state_dict order; shape None for scalars."""
        n = self.name
        if self.kind == "conv":
            yield f"{n}.weight", (self.cout, self.cin // self.groups, self.k, self.k)
            yield f"{n}.bias", (self.cout,)
        if self.kind == "quant":
            yield f"{n}.scale", (1,)
            yield f"{n}.zero_point", (1,)
            return
        yield f"{n}.scale", None
        yield f"{n}.zero_point", None
        if self.kind == "linear":
            yield f"{n}._packed_params.dtype", None
            yield f"{n}._packed_params._packed_params", ((self.cout, self.cin), (self.cout,))


def quantized_units(feats, head) -> list[QUnit]:
    """Every parameterised quantized module of the tree, in state_dict order."""
    units = []

    def conv_bn_act(m: ConvBNAct):
        units.append(QUnit(f"{m.name}.0", "conv", m.cin, m.cout, m.k, m.groups))
        if m.act == "hardswish":
            units.append(QUnit(f"{m.name}.2", "qparams"))

    for m in feats:
        for layer in (m.layers if isinstance(m, InvertedResidual) else [m]):
            if isinstance(layer, SqueezeExcite):
                C, S = layer.channels, layer.squeeze
                units += [QUnit(f"{layer.name}.fc1", "conv", C, S), QUnit(f"{layer.name}.fc2",
                          "conv", S, C), QUnit(f"{layer.name}.skip_mul", "qparams")]
            else:
                conv_bn_act(layer)
        if isinstance(m, InvertedResidual):
            units.append(QUnit(f"{m.name}.skip_add", "qparams"))
    units += [QUnit("classifier.0", "linear", head.cin, head.hidden),
              QUnit("classifier.1", "qparams"),
              QUnit("classifier.3", "linear", head.hidden, head.num_classes),
              QUnit("quant", "quant")]
    return units


class QConv(NamedTuple):
    """A quantized conv/linear: int8 weight, per-filter scales and zero points, float bias."""
    weight: np.ndarray          # (K, C/groups, kH, kW) or (O, I), int8
    w_scale: np.ndarray         # (K,) float32
    w_zero_point: np.ndarray    # (K,) int64
    bias: np.ndarray            # (K,) float32
    per_channel: bool


def _scalar(key, v, kind):
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"{key}: expected a single {kind}, got shape {a.shape}")
    return float(a.reshape(-1)[0]) if kind == "scale" else int(a.reshape(-1)[0])


def _qweight(key, v, shape):
    """A QTensor-like (int_repr, scale, zero_point, axis) -> QConv fields, checked."""
    if not all(hasattr(v, a) for a in ("int_repr", "scale", "zero_point")):
        raise ValueError(f"{key}: expected a quantized (qint8) tensor, got {type(v).__name__}; "
                         f"this looks like a float checkpoint")
    q = np.asarray(v.int_repr)
    if q.dtype != np.int8 or getattr(v, "dtype", "qint8") != "qint8":
        raise ValueError(f"{key}: weights must be qint8, got {getattr(v, 'dtype', q.dtype)}")
    if q.shape != tuple(shape):
        raise ValueError(f"{key}: shape {q.shape} does not match the model's {tuple(shape)}")
    axis = getattr(v, "axis", None)
    if axis not in (None, 0):
        raise ValueError(f"{key}: per-channel quantization along axis {axis} is not supported "
                         f"(only the output-channel axis 0)")
    Kc = q.shape[0]
    s = np.broadcast_to(np.asarray(v.scale, np.float32).reshape(-1), (Kc,)).copy()
    z = np.broadcast_to(np.asarray(v.zero_point, np.int64).reshape(-1), (Kc,)).copy()
    return q, s, z, axis is not None


class QuantizedMobileNetV3:
    """The int8 network (inference only). Build with ``quantized_mobilenet_v3_large/small``;
    fill with ``load_state_dict`` (a converted torchvision state_dict, e.g. from
    ``npmnv3.load_pth``) or ``npmnv3.quantize`` (post-training quantization)."""

    def __init__(self, config: MobileNetV3Config | None = None, *, impl: str = "fast"):
        self.config = MobileNetV3Config() if config is None else MobileNetV3Config.from_dict(
            config)
        self.spec, self.impl = self.config.spec(), impl
        self.features, self.head = build_modules(self.spec)
        self.units = quantized_units(self.features, self.head)
        self.convs: dict[str, QConv] = {}                   # module name -> weights
        self.qparams: dict[str, tuple[float, int]] = {}     # module name -> output (scale, zp)

    # ------------------------------------------------------------------ state

    def layout(self):
        return [(k, s) for u in self.units for k, s in u.keys()]

    def load_state_dict(self, sd: dict):
        """Load a converted torchvision quantized state_dict; one ValueError lists problems."""
        _refuse_other_formats(sd)
        want = dict(self.layout())
        missing = [k for k in want if k not in sd]
        unexpected = [k for k in sd if k not in want]
        if missing or unexpected:
            raise ValueError(f"quantized state_dict does not match {self._describe()}: "
                             f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} "
                             f"unexpected key(s) {unexpected[:5]}")
        convs, qparams = {}, {}
        for u in self.units:
            n = u.name
            qparams[n] = (_scalar(f"{n}.scale", sd[f"{n}.scale"], "scale"),
                          _scalar(f"{n}.zero_point", sd[f"{n}.zero_point"], "zero point"))
            if u.kind == "conv":
                w, b = sd[f"{n}.weight"], sd[f"{n}.bias"]
                shape = want[f"{n}.weight"]
            elif u.kind == "linear":
                packed = sd[f"{n}._packed_params._packed_params"]
                if not isinstance(packed, (tuple, list)) or len(packed) != 2:
                    raise ValueError(f"{n}._packed_params._packed_params: expected (weight, "
                                     f"bias), got {type(packed).__name__}")
                (w, b), shape = packed, want[f"{n}._packed_params._packed_params"][0]
            else:
                continue
            q, s, z, pc = _qweight(f"{n}.weight", w, shape)
            b = np.zeros(q.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
            if b.shape != (q.shape[0],):
                raise ValueError(f"{n} bias: shape {b.shape}, expected ({q.shape[0]},)")
            convs[n] = QConv(q, s, z, b, pc)
        self.convs, self.qparams = convs, qparams
        return self

    def state_dict(self) -> dict:
        """torchvision's keys; weights as ``QTensor``, scales float32, zero points int64."""
        sd = {}
        for u in self.units:
            s, z = self.qparams[u.name]
            if u.kind == "conv":
                sd[f"{u.name}.weight"] = self._qtensor(u.name)
                sd[f"{u.name}.bias"] = self.convs[u.name].bias.copy()
            shape = (1,) if u.kind == "quant" else ()
            sd[f"{u.name}.scale"] = np.full(shape, s, np.float32)
            sd[f"{u.name}.zero_point"] = np.full(shape, z, np.int64)
            if u.kind == "linear":
                sd[f"{u.name}._packed_params.dtype"] = "qint8"
                sd[f"{u.name}._packed_params._packed_params"] = (
                    self._qtensor(u.name), self.convs[u.name].bias.copy())
        return sd

    def _qtensor(self, name):
        c = self.convs[name]
        if c.per_channel:
            return QTensor(c.weight.copy(), c.w_scale.astype(np.float64), c.w_zero_point.copy(),
                           0, "qint8")
        return QTensor(c.weight.copy(), float(c.w_scale[0]), int(c.w_zero_point[0]), None, "qint8")

    def _describe(self):
        return "quantized " + self.config.describe()

    def module_names(self) -> list[str]:
        """Every module of torchvision's converted model that produces an int8 output, as
        ``forward_intermediates`` reports them (``named_modules()`` without the root, ``dequant``
        and the ``skip_add`` of blocks without a residual, which are never called)."""
        names = ["quant", "features"]
        for m in self.features:
            names.extend(m.module_names())
            if isinstance(m, InvertedResidual):
                if m.spec.use_residual:           # skip_add of other blocks is never called
                    names.append(f"{m.name}.skip_add")
                for layer in m.layers:
                    if isinstance(layer, SqueezeExcite):
                        names.append(f"{layer.name}.skip_mul")
        names.extend(self.head.module_names())
        return names

    # ------------------------------------------------------------------ forward

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Float logits (N, num_classes) for float images x (N, 3, H, W): quantize, int8
        network, dequantize (torchvision's ``QuantizableMobileNetV3.forward``)."""
        return self._run(x, None).dequantize()

    def forward_intermediates(self, x):
        """``(logits, outputs)``: float logits and ``{module name: QTensor}`` of every module."""
        outs = {}
        return self._run(x, outs).dequantize(), outs

    def _run(self, x, outs):
        if not self.convs:
            raise ValueError("the quantized model has no weights: call load_state_dict(...) or "
                             "build it with npmnv3.quantize(...)")
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != 3 or x.dtype.kind != "f":
            raise ValueError(f"input must be a float array of shape (N, 3, H, W), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        s, z = self.qparams["quant"]
        y = self._rec(outs, "quant", qact(K.quantize_per_tensor(x, s, z), s, z))
        for m in self.features:
            y = self._module(m, y, outs)
        self._rec(outs, "features", y)
        pooled = self._rec(outs, "avgpool", self._pool(y))
        h = qact(pooled.int_repr.reshape(pooled.shape[0], -1), pooled.scale, pooled.zero_point)
        h = self._rec(outs, "classifier.0", self._conv("classifier.0", h))
        h = self._rec(outs, "classifier.1", self._hardswish("classifier.1", h))
        self._rec(outs, "classifier.2", h)                                   # dropout: identity
        logits = self._rec(outs, "classifier.3", self._conv("classifier.3", h))
        return self._rec(outs, "classifier", logits)

    @staticmethod
    def _rec(outs, name, q):
        if outs is not None:
            outs[name] = q
        return q

    def _module(self, m, x, outs):
        if isinstance(m, InvertedResidual):
            y = x
            for layer in m.layers:
                y = self._module(layer, y, outs)
            self._rec(outs, f"{m.name}.block", y)
            if m.spec.use_residual:                 # skip_add.add(x, block(x))
                s, z = self.qparams[f"{m.name}.skip_add"]
                y = qact(K.qadd(x.int_repr, x.scale, x.zero_point, y.int_repr, y.scale,
                                   y.zero_point, s, z, impl=self.impl), s, z)
                self._rec(outs, f"{m.name}.skip_add", y)
            return self._rec(outs, m.name, y)
        if isinstance(m, SqueezeExcite):
            return self._se(m, x, outs)
        y = self._rec(outs, f"{m.name}.0", self._conv(f"{m.name}.0", x, m, relu=m.act == "relu"))
        self._rec(outs, f"{m.name}.1", y)                                    # BN -> Identity
        if m.act == "hardswish":
            y = self._hardswish(f"{m.name}.2", y)
        if m.act:
            self._rec(outs, f"{m.name}.2", y)                                # fused ReLU: Identity
        return self._rec(outs, m.name, y)

    def _se(self, m: SqueezeExcite, x, outs):
        n = m.name
        g = self._rec(outs, f"{n}.avgpool", self._pool(x))
        g = self._rec(outs, f"{n}.fc1", self._conv(f"{n}.fc1", g, relu=True))
        self._rec(outs, f"{n}.activation", g)                                # fused: Identity
        g = self._rec(outs, f"{n}.fc2", self._conv(f"{n}.fc2", g))
        gate = K.qhardsigmoid(g.int_repr, g.scale, g.zero_point, impl=self.impl)
        g = self._rec(outs, f"{n}.scale_activation",
                      qact(gate, K.HARDSIGMOID_SCALE, K.HARDSIGMOID_ZERO_POINT))
        s, z = self.qparams[f"{n}.skip_mul"]                                 # mul(gate, input)
        y = qact(K.qmul(g.int_repr, g.scale, g.zero_point, x.int_repr, x.scale, x.zero_point,
                           s, z, impl=self.impl), s, z)
        self._rec(outs, f"{n}.skip_mul", y)
        return self._rec(outs, n, y)

    def _conv(self, name, x, m: ConvBNAct | None = None, relu=False):
        c = self.convs[name]
        s, z = self.qparams[name]
        args = (x.int_repr, x.scale, x.zero_point, c.weight, c.w_scale, c.w_zero_point, c.bias,
                s, z)
        if c.weight.ndim == 2:
            return qact(K.qlinear(*args, relu=relu, impl=self.impl), s, z)
        geo = dict(stride=m.stride, padding=m.padding, dilation=m.dilation,
                   groups=m.groups) if m is not None else {}
        return qact(K.qconv2d(*args, relu=relu, impl=self.impl, **geo), s, z)

    def _hardswish(self, name, x):
        s, z = self.qparams[name]
        return qact(K.qhardswish(x.int_repr, x.scale, x.zero_point, s, z, impl=self.impl), s, z)

    def _pool(self, x):
        q = K.qadaptive_avgpool2d(x.int_repr, x.scale, x.zero_point, impl=self.impl)
        return qact(q, x.scale, x.zero_point)


def _refuse_other_formats(sd):
    keys = list(sd)
    if any("weight_fake_quant" in k or "activation_post_process" in k for k in keys):
        raise ValueError("this is a quantization-aware-training (QAT-prepared) state_dict "
                         "(fake-quant and observer entries), not a converted quantized one; "
                         "convert it with npmnv3.nn.qat.from_qat_state_dict(sd)")
    if any(k.endswith(".running_mean") for k in keys):
        raise ValueError("this is a float MobileNetV3 state_dict (batch-norm statistics, float "
                         "weights), not a quantized one: load it with npmnv3.mobilenet_v3_large/"
                         "small(...).load_state_dict, or quantize that model with "
                         "npmnv3.quantize(model, images)")


# ----------------------------------------------------------------------------- builders

def _build(arch, *, num_classes=1000, width_mult=1.0, reduced_tail=False, dilated=False,
           impl="fast"):
    config = MobileNetV3Config(arch, width_mult, reduced_tail, dilated, num_classes)
    return QuantizedMobileNetV3(config, impl=impl)


def quantized_mobilenet_v3_large(*, num_classes=1000, width_mult=1.0, reduced_tail=False,
                                 dilated=False, impl="fast") -> QuantizedMobileNetV3:
    """torchvision's ``quantization.mobilenet_v3_large(quantize=True)`` structure, no weights."""
    return _build("large", num_classes=num_classes, width_mult=width_mult,
                  reduced_tail=reduced_tail, dilated=dilated, impl=impl)


def quantized_mobilenet_v3_small(*, num_classes=1000, width_mult=1.0, reduced_tail=False,
                                 dilated=False, impl="fast") -> QuantizedMobileNetV3:
    """MobileNetV3-Small in torchvision's ``QuantizableMobileNetV3`` (torchvision ships no Small
    builder or weights, but the class takes Small's configuration unchanged)."""
    return _build("small", num_classes=num_classes, width_mult=width_mult,
                  reduced_tail=reduced_tail, dilated=dilated, impl=impl)
