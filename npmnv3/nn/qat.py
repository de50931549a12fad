"""Quantization-aware-training checkpoints -> the int8 model: torch's ``convert``, from scratch.

torchvision's published quantized weights (``mobilenet_v3_large_qnnpack-5bcacf28.pth``) are
the state_dict of a *QAT-prepared* model (``torchvision/models/quantization/mobilenetv3.py``
loads them into ``prepare_qat``'s model, then calls ``torch.ao.quantization.convert``): float
weights, batch norms, and per module a fake-quantize with its observer's running min/max.
``from_qat_state_dict`` does what ``convert`` does with them (``torch/ao/nn/quantized/modules/
conv.py`` ``_ConvNd.from_float`` / ``get_qconv``, ``linear.py`` ``Linear.from_float``,
``torch/ao/nn/quantized/modules/utils.py`` ``_quantize_weight``):

1. Conv-BN(-ReLU): fold batch norm, torch's ``fuse_conv_bn_weights`` in float32:
   W' = W * (gamma * rsqrt(var + eps)), b' = (0 - mean) * rsqrt(var + eps) * gamma + beta;
2. the weight fake-quantize is called once more on W' (``weight_post_process(mod.weight)``):
   if its observer is still enabled, the running min / max move toward W''s,
   m <- m + 0.01 (min(W') - m) in float32 (torch's ``fused_moving_avg_obs_fake_quant``);
3. weight qparams from the observer's min / max (symmetric qint8: s = max |m| / 127.5, per
   tensor, or per channel when the observer holds one range per filter), weights quantized;
4. every activation's (scale, zero point) from its observer (``calculate_qparams``: the affine
   quint8 formula of ``npmnv3.nn.ptq.affine_qparams``, over 0..127 with ``reduce_range``); a
   module never observed (the ``skip_add`` of a block without residual) gets torch's default
   (1.0, 0).
"""

from __future__ import annotations

import numpy as np

from .config import MobileNetV3Config, known_variants
from .ptq import F32_EPS, affine_qparams, symmetric_scales
from .quantized import QConv, QuantizedMobileNetV3

BN_EPS = 1e-3                 # torchvision MobileNetV3: BatchNorm2d(eps=0.001)
AVERAGING_CONSTANT = 0.01     # torch's default MovingAverageMinMaxObserver


def is_qat_state_dict(sd) -> bool:
    return any(k.endswith("weight_fake_quant.observer_enabled") for k in sd)


def _f32(v):
    return np.asarray(v, dtype=np.float32)


def _fold_bn(sd, n, w, eps):
    """torch's fuse_conv_bn_weights (float32, its operation order)."""
    bn = f"{n}.bn"
    rsqrt = np.float32(1) / np.sqrt(_f32(sd[f"{bn}.running_var"]) + np.float32(eps))
    gamma, beta, mean = _f32(sd[f"{bn}.weight"]), _f32(sd[f"{bn}.bias"]), _f32(
        sd[f"{bn}.running_mean"])
    w = w * (gamma * rsqrt).reshape((-1,) + (1,) * (w.ndim - 1))
    b = (np.zeros_like(mean) - mean) * rsqrt * gamma + beta
    return w.astype(np.float32), b.astype(np.float32)


def _observed(sd, obs):
    lo, hi = _f32(sd[f"{obs}.min_val"]), _f32(sd[f"{obs}.max_val"])
    eps = _f32(sd.get(f"{obs}.eps", F32_EPS)).reshape(-1)[0]
    return lo, hi, eps


def _weight_qconv(sd, n, w, b, averaging_constant):
    """QConv of float weight ``w`` through the fake-quantize ``<n>.weight_fake_quant``."""
    fq = f"{n}.weight_fake_quant"
    lo, hi, eps = _observed(sd, f"{fq}.activation_post_process")
    K = w.shape[0]
    if int(np.asarray(sd[f"{fq}.observer_enabled"]).reshape(-1)[0]) == 1:
        rows = w.reshape(K, -1)
        cur_lo, cur_hi = (rows.min(1), rows.max(1)) if lo.ndim else (w.min(), w.max())
        c = np.float32(averaging_constant)
        lo = np.where(np.isinf(lo), cur_lo, lo + c * (cur_lo - lo)).astype(np.float32)
        hi = np.where(np.isinf(hi), cur_hi, hi + c * (cur_hi - hi)).astype(np.float32)
    absmax = np.maximum(-np.minimum(lo, 0), np.maximum(hi, 0))
    s = np.maximum(symmetric_scales(absmax), eps)
    s = np.broadcast_to(s, (K,)).astype(np.float32)
    from ..kernels.quantize import quantize_per_channel
    q = quantize_per_channel(w, s, np.zeros(K), axis=0, dtype="qint8")
    return QConv(q, s, np.zeros(K, np.int64), _f32(b), bool(lo.ndim))


def _activation_qparams(sd, name, qmax):
    obs = f"{name}.activation_post_process.activation_post_process"
    lo, hi, eps = _observed(sd, obs)
    if np.isinf(lo) and np.isinf(hi):            # never observed: torch's default qparams
        return 1.0, 0
    return affine_qparams(lo, hi, 0, qmax, eps=eps)


def _shape(v):
    return tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v))


def infer_config(sd) -> MobileNetV3Config:
    """The known variant whose conv / linear weight shapes a QAT or converted quantized
    state_dict has (converted: weights are ``QTensor``, linears packed as (weight, bias))."""
    def weight(k):
        if k in sd:
            return sd[k]
        packed = sd.get(k.replace(".weight", "._packed_params._packed_params"))
        return packed[0] if isinstance(packed, (tuple, list)) else None

    w3 = weight("classifier.3.weight")
    if w3 is None:
        raise ValueError("not a MobileNetV3 state_dict: no classifier.3 weight")
    for config in known_variants(_shape(w3)[0]):
        want = [(k, s) for k, s, kind in config.layout() if kind == "param" and (
            k.endswith(".0.weight") or ".fc" in k and k.endswith("weight"))]
        if all(weight(k) is not None and _shape(weight(k)) == tuple(s) for k, s in want):
            return config
    raise ValueError("the state_dict matches no known MobileNetV3 variant; pass config=")


def quantized_from_state_dict(sd, config=None, **kwargs) -> QuantizedMobileNetV3:
    """The int8 model of a QAT-prepared state_dict (converted as torch converts it) or of a
    converted one (``torch.save(quantized_model.state_dict())``), architecture inferred."""
    if is_qat_state_dict(sd):
        return from_qat_state_dict(sd, config, **kwargs)
    config = infer_config(sd) if config is None else config
    return QuantizedMobileNetV3(config, impl=kwargs.get("impl", "fast")).load_state_dict(sd)


def from_qat_state_dict(sd, config=None, *, reduce_range=False, bn_eps=BN_EPS,
                        averaging_constant=AVERAGING_CONSTANT, impl="fast"):
    """The ``QuantizedMobileNetV3`` that ``torch.ao.quantization.convert`` makes of a
    QAT-prepared torchvision model with state_dict ``sd`` (see the module docstring).

    ``reduce_range``: the activations' qconfig had ``reduce_range=True`` (torch's fbgemm and
    x86 default qconfigs; qnnpack's, which torchvision's weights use, has not): qparams for
    0..127. The state_dict does not record it. ``config``: default, the variant whose shapes
    the state_dict has."""
    if not is_qat_state_dict(sd):
        raise ValueError("not a quantization-aware-training state_dict (no weight_fake_quant "
                         "entries)")
    config = infer_config(sd) if config is None else MobileNetV3Config.from_dict(config)
    q = QuantizedMobileNetV3(config, impl=impl)
    try:
        for u in q.units:
            n = u.name
            q.qparams[n] = _activation_qparams(sd, n, 127 if reduce_range else 255)
            if u.kind not in ("conv", "linear"):
                continue
            w = _f32(sd[f"{n}.weight"])
            if f"{n}.bn.weight" in sd:
                w, b = _fold_bn(sd, n, w, bn_eps)
            else:
                b = sd.get(f"{n}.bias")
                b = np.zeros(w.shape[0], np.float32) if b is None else b
            q.convs[n] = _weight_qconv(sd, n, w, b, averaging_constant)
    except KeyError as e:
        raise ValueError(f"QAT state_dict does not fit {config.describe()}: missing "
                         f"{e.args[0]}") from None
    return q
