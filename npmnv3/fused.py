"""The fast eval-mode forward: batch norm folded into the convolutions, activations fused.

In eval mode batch norm is a fixed per-channel affine map, so conv followed by BN is one conv:
    BN(conv(x, W)) = conv(x, W * alpha) + beta,   alpha = gamma / sqrt(var + eps),
                                                  beta  = bias - mean * alpha
(per output channel). Each Conv-BN-Act then becomes one GEMM (or depthwise pass) followed by a
single fused ``act(y + beta)`` pass, the SE gate is folded into the projection weights
(``W @ (x * g) = (W * g) @ x`` per image), and the residual add rides along with the
projection's bias. Results equal the reference path (``MobileNetV3`` with ``impl="naive"`` or in
train mode) up to float rounding; ``tests/test_model.py`` checks both against torchvision.
The folded weights are computed when first needed after ``eval()``/``load_state_dict()``; call
``model.eval()`` again after editing parameters in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels.conv2d import conv2d_forward_fast
from .kernels.depthwise import depthwise_forward_fast
from .layers import ConvBNAct, InvertedResidual, SqueezeExcite

ACT_CODES = {None: 0, "relu": 1, "hardswish": 2}


def _bias_act_loops(y, bias, act, res, use_res, z, three, six):
    """In place: y[n, k, :] = act(y[n, k, :] + bias[k]) (+ res[n, k, :] if use_res)."""
    N, K, L = y.shape
    for nk in prange(N * K):
        n, k = nk // K, nk % K
        b = bias[k]
        for t in range(L):
            v = y[n, k, t] + b
            if act == 1:
                v = max(v, z)
            elif act == 2:
                v = (v * min(max(v + three, z), six)) / six
            if use_res:
                v += res[n, k, t]
            y[n, k, t] = v


_bias_act = njit(cache=True, parallel=True)(_bias_act_loops)


def bias_act_(y, bias, act=None, res=None):
    """y (N, K, ...) <- act(y + bias) [+ res], in place; returns y."""
    N, K = y.shape[:2]
    y3 = y.reshape(N, K, -1)
    r3 = res.reshape(N, K, -1) if res is not None else y3
    t = y.dtype.type
    _bias_act(y3, bias, ACT_CODES[act], r3, res is not None, t(0), t(3), t(6))
    return y


def _fold(model):
    """Folded (weight, bias) per Conv-BN module name, in the model's dtype."""
    p, b, eps = model.params, model.buffers, model.bn_eps
    folded = {}

    def fold(m: ConvBNAct):
        bn = f"{m.name}.1"
        alpha = p[f"{bn}.weight"] / np.sqrt(b[f"{bn}.running_var"] + eps)
        beta = p[f"{bn}.bias"] - b[f"{bn}.running_mean"] * alpha
        w = p[f"{m.name}.0.weight"] * alpha[:, None, None, None]
        folded[m.name] = (np.ascontiguousarray(w, dtype=model.dtype), beta.astype(model.dtype))

    for m in model.features:
        for layer in (m.layers if isinstance(m, InvertedResidual) else [m]):
            if isinstance(layer, ConvBNAct):
                fold(layer)
    return folded


def _conv_bn_act(m: ConvBNAct, x, folded, res=None, gate=None):
    w, beta = folded[m.name]
    N, C, H, W = x.shape
    if m.kind == "pointwise":
        K = w.shape[0]
        w2 = w.reshape(K, C)
        if gate is not None:                                   # SE folded into the weights
            w2 = w2[None, :, :] * gate[:, None, :]             # (N, K, C)
        y = np.matmul(w2, x.reshape(N, C, H * W)).reshape(N, K, H, W)
        return bias_act_(y, beta, m.act, res)
    if m.kind == "depthwise":
        y, _ = depthwise_forward_fast(x, w, beta, stride=m.stride, padding=m.padding,
                                      dilation=m.dilation, act=ACT_CODES[m.act])
        return y
    y, _ = conv2d_forward_fast(x, w, None, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups)
    return bias_act_(y, beta, m.act, res)


def _se_gate(m: SqueezeExcite, x, p):
    """The SE gate g (N, C): hardsigmoid(fc2(relu(fc1(mean(x)))))."""
    N, C = x.shape[:2]
    t = x.dtype.type
    s = x.reshape(N, C, -1).mean(axis=2, dtype=np.float64).astype(x.dtype)    # (N, C)
    h = s @ p[f"{m.name}.fc1.weight"].reshape(-1, C).T + p[f"{m.name}.fc1.bias"]
    h = np.maximum(h, t(0))
    z = h @ p[f"{m.name}.fc2.weight"].reshape(C, -1).T + p[f"{m.name}.fc2.bias"]
    return np.minimum(np.maximum(z + t(3), t(0)), t(6)) / t(6)


def fused_forward(model, x):
    """Eval-mode logits of ``model`` for x (N, 3, H, W) through the folded, fused path."""
    if model._fused is None:
        model._fused = _fold(model)
    folded, p = model._fused, model.params
    y = x
    for m in model.features:
        if not isinstance(m, InvertedResidual):
            y = _conv_bn_act(m, y, folded)
            continue
        inp, gate = y, None
        layers = m.layers
        for layer in layers[:-1]:
            if isinstance(layer, SqueezeExcite):
                gate = _se_gate(layer, y, p)
            else:
                y = _conv_bn_act(layer, y, folded)
        y = _conv_bn_act(layers[-1], y, folded, res=inp if m.spec.use_residual else None,
                         gate=gate)
    N, C = y.shape[:2]
    pooled = y.reshape(N, C, -1).mean(axis=2, dtype=np.float64).astype(y.dtype)
    h = pooled @ p["classifier.0.weight"].T
    bias_act_(h[:, :, None], p["classifier.0.bias"], "hardswish")
    return h @ p["classifier.3.weight"].T + p["classifier.3.bias"]
