"""Post-training quantization from scratch: a float MobileNetV3 -> ``QuantizedMobileNetV3``.

``quantize(model, calibration_images)`` does what torch's eager post-training quantization of
torchvision's quantizable model does (fuse, prepare, calibrate, convert), written out:

1. fold every batch norm into its convolution (``folded_conv_bn``: W' = W * gamma / sqrt(var +
   eps), b' = beta - mean * gamma / sqrt(var + eps), in the model's dtype as torch's
   ``fuse_conv_bn_weights`` does);
2. quantize the weights to qint8, symmetric (zero point 0), per output channel by default:
   s_w[k] = max |W'[k]| / 127.5 (torch's ``PerChannelMinMaxObserver``, per_channel_symmetric),
   or one scale for the whole tensor (``per_channel=False``, torch's qnnpack qconfig);
3. run the float model over the calibration images and observe every tensor that the quantized
   model stores as quint8 (input, each conv output (after a fused ReLU), each hard-swish, SE fc1 /
   fc2 / product, residual sums, classifier): running min / max (``observer="minmax"``,
   torch's ``MinMaxObserver``) or their moving average (``"moving_average"``, torch's
   ``MovingAverageMinMaxObserver``: m <- m + c (batch_m - m), c = 0.01);
4. affine quint8 parameters from each range, as torch's ``_calculate_qparams`` computes them in
   float32: lo = min(min, 0), hi = max(max, 0), s = max((hi - lo) / 255, eps),
   z = clamp(0 - round(lo / s), 0, 255). The SE gate keeps hard-sigmoid's fixed 1/256, 0.

The biases stay float; the int8 kernels quantize them with s_x s_w at run time, as torch does.
``layer_errors`` measures, module by module, how far the int8 activations are from the float
model's.
"""

from __future__ import annotations

import numpy as np

from .modules import ConvBNAct, InvertedResidual, SqueezeExcite
from .quantized import QConv, QuantizedMobileNetV3

F32_EPS = np.float32(np.finfo(np.float32).eps)     # torch observers' eps


def folded_conv_bn(model):
    """{Conv-BN module name: (W', b')}: every batch norm folded into its convolution, computed
    in the model's dtype (torch folds in float32 too, ``torch.nn.utils.fusion``)."""
    p, b, eps = model.params, model.buffers, model.bn_eps
    folded = {}
    for m in model.features:
        for layer in (m.layers if isinstance(m, InvertedResidual) else [m]):
            if isinstance(layer, ConvBNAct):
                bn = f"{layer.name}.1"
                alpha = p[f"{bn}.weight"] / np.sqrt(b[f"{bn}.running_var"] + eps)      # (K,)
                beta = p[f"{bn}.bias"] - b[f"{bn}.running_mean"] * alpha             # (K,)
                w = p[f"{layer.name}.0.weight"] * alpha[:, None, None, None]          # (K, C, k, k)
                folded[layer.name] = (np.ascontiguousarray(w, dtype=model.dtype),
                                      beta.astype(model.dtype))
    return folded


def affine_qparams(min_val, max_val, qmin=0, qmax=255, eps=F32_EPS):
    """(scale, zero_point) of an asymmetric (affine) range, torch's float32 arithmetic."""
    lo = np.minimum(np.float32(min_val), np.float32(0))
    hi = np.maximum(np.float32(max_val), np.float32(0))
    scale = np.maximum((hi - lo) / np.float32(qmax - qmin), np.float32(eps))
    zp = np.clip(qmin - np.rint(lo / scale).astype(np.int64), qmin, qmax)
    return float(scale), int(zp)


def symmetric_scales(absmax, qmin=-128, qmax=127):
    """Scales of symmetric qint8 (zero point 0): max |x| / ((qmax - qmin) / 2), float32."""
    a = np.asarray(absmax, dtype=np.float32)
    return np.maximum(a / np.float32((qmax - qmin) / 2), F32_EPS).astype(np.float32)


class MinMaxObserver:
    """Running minimum and maximum of every tensor seen."""

    def __init__(self):
        self.min_val = self.max_val = None

    def update(self, x):
        lo, hi = np.float32(np.min(x)), np.float32(np.max(x))
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = self._merge(lo, hi)

    def _merge(self, lo, hi):
        return min(self.min_val, lo), max(self.max_val, hi)

    def qparams(self):
        if self.min_val is None:
            raise ValueError("observer saw no data: calibrate before computing qparams")
        return affine_qparams(self.min_val, self.max_val)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """min, max <- min + c (batch_min - min), max + c (batch_max - max); the first batch sets
    them (torch's default averaging_constant c = 0.01)."""

    def __init__(self, averaging_constant=0.01):
        super().__init__()
        self.c = np.float32(averaging_constant)

    def _merge(self, lo, hi):
        return (self.min_val + self.c * (lo - self.min_val),
                self.max_val + self.c * (hi - self.max_val))


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}


def observed_points(model):
    """{quantized module name: name of the float model's output it observes}, in network order.

    The float model's ``forward_intermediates`` names torchvision's float modules; a quantized
    conv ``<m>.0`` stores conv + BN (+ ReLU) of the float ``<m>.1`` (or ``<m>.2`` after ReLU)."""
    points = {"quant": "input"}

    def conv_bn_act(m: ConvBNAct):
        points[f"{m.name}.0"] = f"{m.name}.2" if m.act == "relu" else f"{m.name}.1"
        if m.act == "hardswish":
            points[f"{m.name}.2"] = f"{m.name}.2"

    for m in model.features:
        for layer in (m.layers if isinstance(m, InvertedResidual) else [m]):
            if isinstance(layer, SqueezeExcite):
                n = layer.name
                points.update({f"{n}.fc1": f"{n}.activation", f"{n}.fc2": f"{n}.fc2",
                               f"{n}.skip_mul": n})
            else:
                conv_bn_act(layer)
        if isinstance(m, InvertedResidual) and m.spec.use_residual:
            points[f"{m.name}.skip_add"] = m.name
    points.update({"classifier.0": "classifier.0", "classifier.1": "classifier.1",
                   "classifier.3": "classifier.3"})
    return points


def _batches(images, batch_size):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty float array (N, 3, H, W), "
                         f"got shape {images.shape}")
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def calibrate(model, images, *, observer="minmax", batch_size=32, averaging_constant=0.01):
    """{quantized module name: observer} after running ``model`` (eval) over ``images``."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {list(OBSERVERS)}, got {observer!r}")
    points = observed_points(model)
    make = OBSERVERS[observer]
    obs = {n: (make(averaging_constant) if observer == "moving_average" else make())
           for n in points}
    model.eval()
    for xb in _batches(images, batch_size):
        _, outs = model.forward_intermediates(np.asarray(xb, dtype=model.dtype))
        outs["input"] = xb
        for n, src in points.items():
            obs[n].update(outs[src])
    return obs


def _qconv(w, b, per_channel):
    """Symmetric qint8 weights of a float (K, ...) weight and its float bias."""
    from ..kernels.quantize import quantize_per_channel
    w = np.asarray(w, dtype=np.float32)
    Kc = w.shape[0]
    absmax = np.abs(w.reshape(Kc, -1)).max(axis=1)
    s = symmetric_scales(absmax if per_channel else np.full(Kc, absmax.max()))
    q = quantize_per_channel(w, s, np.zeros(Kc), axis=0, dtype="qint8")
    return QConv(q, s, np.zeros(Kc, np.int64), np.asarray(b, dtype=np.float32), per_channel)


def quantize(model, calibration_images, *, observer="minmax", per_channel=True, batch_size=32,
             averaging_constant=0.01, impl="fast") -> QuantizedMobileNetV3:
    """Post-training quantization of a float npmnv3 ``MobileNetV3`` (see the module docstring).

    ``calibration_images``: float (N, 3, H, W), preprocessed like the model's inputs. Returns
    a ``QuantizedMobileNetV3`` of the same architecture; the float model is left in eval mode.
    """
    obs = calibrate(model, calibration_images, observer=observer, batch_size=batch_size,
                    averaging_constant=averaging_constant)
    folded = folded_conv_bn(model)                     # {ConvBNAct name: (W', b')}
    p = model.params
    q = QuantizedMobileNetV3(model.config, impl=impl)
    for u in q.units:
        n = u.name
        if n in obs:
            q.qparams[n] = obs[n].qparams()
        else:                          # skip_add of a block without residual: never used
            q.qparams[n] = (1.0, 0)
        if u.kind == "conv" and n.endswith(".0"):
            q.convs[n] = _qconv(*folded[n[:-2]], per_channel)
        elif u.kind in ("conv", "linear"):          # SE fc1/fc2, classifier: no batch norm
            q.convs[n] = _qconv(p[f"{n}.weight"], p[f"{n}.bias"], per_channel)
    return q


def layer_errors(model, qmodel, x):
    """{quantized module name: relative RMS error ||deq(int8) - float|| / ||float||} of the int8
    model's activations against the float model's on images x, in network order."""
    _, ref = model.forward_intermediates(np.asarray(x, dtype=model.dtype))
    ref["input"] = x
    _, outs = qmodel.forward_intermediates(np.asarray(x, dtype=np.float32))
    errors = {}
    for n, src in observed_points(model).items():
        f = np.asarray(ref[src], dtype=np.float64)
        d = outs[n].dequantize().astype(np.float64) - f
        errors[n] = float(np.sqrt(np.mean(d * d)) / max(np.sqrt(np.mean(f * f)), 1e-12))
    return errors
