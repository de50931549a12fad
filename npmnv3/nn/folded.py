"""The fast eval-mode forward: batch norm folded into the convolutions, activations fused.

In eval mode batch norm is a fixed per-channel affine map, so conv followed by BN is one conv:
    BN(conv(x, W)) = conv(x, W * alpha) + beta,   alpha = gamma / sqrt(var + eps),
                                                  beta  = bias - mean * alpha
(per output channel). Each Conv-BN-Act becomes one GEMM (or one depthwise pass) plus a fused
``act(y + beta)`` pass; the SE squeeze is summed inside the depthwise pass; the residual add rides
along with the projection's bias.

Layout: activations are kept channel-major, (C, N, H, W) ("CNHW"), inside this path, so every
1x1 convolution of the whole batch is a single GEMM, W (K, C) @ X (C, N*H*W), with no transposes
(NCHW would need one small GEMM per image). Only the input (NCHW) and the logits leave it.
Results equal the reference path up to float rounding; ``tests/test_model.py`` checks both
against torchvision. ``fold(model)`` returns a ``FoldedNet``, a snapshot of the model's eval
function; the model keeps one and builds a new one after any change of its state (``eval()``,
``load_state_dict()``...); call ``model.eval()`` again after editing parameters in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.conv2d import direct_conv_forward
from ..kernels.depthwise import _chunks, _dw_fwd
from ..kernels.epilogue import ACT_CODES, apply_act
from .modules import ConvBNAct, InvertedResidual, SqueezeExcite


def _bias_act_loops(y, bias, act, res, use_res, z, three, six):
    """In place: y[n, k, :] = act(y[n, k, :] + bias[k]) (+ res[n, k, :] if use_res)."""
    N, K, L = y.shape
    for nk in prange(N * K):
        n, k = nk // K, nk % K
        b = bias[k]
        for t in range(L):
            v = apply_act(y[n, k, t] + b, act, z, three, six)
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


def _conv_bn_act(m: ConvBNAct, x, folded, res=None, pool=None):
    """One folded Conv-BN-Act on a CNHW tensor x (C, N, H, W) -> (K, N, Ho, Wo)."""
    w, beta = folded[m.name]
    C, N, H, W = x.shape
    t = x.dtype.type
    if m.kind == "pointwise":
        K = w.shape[0]
        y = (w.reshape(K, C) @ x.reshape(C, N * H * W)).reshape(K, N, H, W)   # one GEMM
        return bias_act_(y[None], beta, m.act, None if res is None else res[None])[0]
    if m.kind == "depthwise":
        Ho = (H + 2 * m.padding - m.dilation * (m.k - 1) - 1) // m.stride + 1
        Wo = (W + 2 * m.padding - m.dilation * (m.k - 1) - 1) // m.stride + 1
        y = np.empty((C, N, Ho, Wo), dtype=x.dtype)
        _dw_fwd(x.reshape(C * N, H, W), np.ascontiguousarray(w[:, 0]), beta, m.stride,
                m.padding, m.dilation, N, _chunks(C * N), ACT_CODES[m.act], t(0), t(3), t(6),
                pool.reshape(-1) if pool is not None else np.empty(0, x.dtype),
                y.reshape(C * N, Ho, Wo))
        return y
    raise ValueError(f"{m.name}: no fused kernel for a {m.kind} convolution")


def _se_gate(m: SqueezeExcite, pooled, p):
    """The SE gate g (C, N) from the squeezed input pooled (C, N)."""
    C = pooled.shape[0]
    t = pooled.dtype.type
    h = p[f"{m.name}.fc1.weight"].reshape(-1, C) @ pooled + p[f"{m.name}.fc1.bias"][:, None]
    h = np.maximum(h, t(0))                                                   # (S, N)
    z = p[f"{m.name}.fc2.weight"].reshape(C, -1) @ h + p[f"{m.name}.fc2.bias"][:, None]
    return np.minimum(np.maximum(z + t(3), t(0)), t(6)) / t(6)                # (C, N)


def _scale_planes_loops(x, g):
    """In place: plane q of x (P, L) times g[q]."""
    P, L = x.shape
    for q in prange(P):
        gq = g[q]
        for i in range(L):
            x[q, i] *= gq


_scale_planes = njit(cache=True, parallel=True)(_scale_planes_loops)


class FoldedNet:
    """A snapshot of a model's eval-mode function with batch norm folded into the convolutions.

    Built by ``fold(model)``; it copies what it needs (folded weights, the SE and classifier
    parameters, the module tree), so later changes to the model do not reach it: the model
    builds a new one after ``eval()``, ``load_state_dict()`` or any other change of state.
    """

    def __init__(self, model):
        self.features_tree = model.features
        self.dtype = model.dtype
        self.folded = _fold(model)
        self.params = {k: v.copy() for k, v in model.params.items()
                       if ".fc" in k or k.startswith("classifier.")}

    def __call__(self, x):
        """Eval-mode logits (N, num_classes) for x (N, 3, H, W)."""
        y = self._backbone(x)
        C, N = y.shape[:2]
        p = self.params
        pooled = y.reshape(C, N, -1).mean(axis=2, dtype=np.float64).astype(y.dtype)  # (C, N)
        h = p["classifier.0.weight"] @ pooled                                        # (1280, N)
        bias_act_(h[None], p["classifier.0.bias"], "hardswish")     # dropout: identity in eval
        logits = p["classifier.3.weight"] @ h + p["classifier.3.bias"][:, None]       # (1000, N)
        return np.ascontiguousarray(logits.T)

    def features(self, x):
        """Eval-mode output of ``features`` (N, C, h, w)."""
        return np.ascontiguousarray(self._backbone(x).transpose(1, 0, 2, 3))

    def _backbone(self, x):
        """``features`` of x (N, 3, H, W) in eval mode, channel-major: (C, N, h, w)."""
        folded, p = self.folded, self.params
        stem = self.features_tree[0]
        w, beta = folded[stem.name]
        y = direct_conv_forward(x, w, beta, stride=stem.stride, padding=stem.padding,
                                dilation=stem.dilation, act=ACT_CODES[stem.act], kfirst=True)
        N = x.shape[0]
        for m in self.features_tree[1:]:
            if not isinstance(m, InvertedResidual):
                y = _conv_bn_act(m, y, folded)
                continue
            inp, layers = y, m.layers
            for i, layer in enumerate(layers[:-1]):
                if isinstance(layer, SqueezeExcite):
                    continue
                se_next = isinstance(layers[i + 1], SqueezeExcite)
                pooled = np.empty((layer.cout, N), dtype=y.dtype) if se_next else None
                y = _conv_bn_act(layer, y, folded, pool=pooled)
                if se_next:                                           # squeeze-and-excite
                    g = _se_gate(layers[i + 1], pooled, p)
                    _scale_planes(y.reshape(y.shape[0] * N, -1), g.reshape(-1))
            y = _conv_bn_act(layers[-1], y, folded, res=inp if m.spec.use_residual else None)
        return y


def fold(model) -> FoldedNet:
    """The fast eval-mode function of ``model`` (a snapshot; see ``FoldedNet``)."""
    return FoldedNet(model)
