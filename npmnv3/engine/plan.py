"""Step 1 and 2 of the engine: fold batch norm into the convolutions, then lay out a plan.

**Folding** (eval mode only). A convolution without bias followed by batch norm with running
statistics (mu, sigma^2), scale gamma, shift beta and eps is, per output channel k,

    BN(conv(x, W))_k = gamma_k (conv(x, W)_k - mu_k) / sqrt(sigma_k^2 + eps) + beta_k
                     = conv(x, alpha_k W_k) + (beta_k - alpha_k mu_k),
    alpha_k = gamma_k / sqrt(sigma_k^2 + eps)

so every Conv-BN-Act of torchvision's ``Conv2dNormActivation`` becomes one convolution with a
bias, followed by its activation: one pass over memory instead of three. The algebra is done in
float64 and rounded once to the model's dtype.

**Layout.** The engine keeps activations channels-last, one image at a time: a (H*W, C) matrix.
Then every 1x1 conv is one GEMM X (P, Cin) @ W (Cin, Cout) with the weights pre-transposed
here, and the depthwise taps read contiguous channel vectors. The weights of all layers go in
one flat array (``Plan.wb``) and each step is one row of integers (``Plan.table(H, W)``: the
``F_*`` columns below) so that the Numba drivers of ``run.py`` take a handful of fixed-type
arguments whatever the architecture (Large, Small, any width, dilated, reduced tail).

Steps: ``STEM`` (3x3 stride-2 conv + hard-swish, read from the NCHW input), ``BLOCK`` (an
inverted residual: [expand 1x1] -> depthwise -> [SE] -> project 1x1 [+ input]) and ``CONV1``
(the last 1x1 conv of ``features``, whose epilogue also sums the global average pool).
"""

from __future__ import annotations

import numpy as np

from ..kernels.epilogue import ACT_CODES
from ..nn.modules import ConvBNAct, InvertedResidual, SqueezeExcite

STEM, BLOCK, CONV1 = 0, 1, 2

# Columns of a step's row in the plan table.
(F_KIND, F_H, F_W, F_HO, F_WO, F_CIN, F_CEXP, F_COUT, F_K, F_S, F_P, F_D, F_ACT, F_EXPAND,
 F_SE, F_SQ, F_RES, F_R, F_WE, F_BE, F_WD, F_BD, F_W1, F_B1, F_W2, F_B2, F_WP, F_BP,
 F_PRE) = range(29)
NF = 29

BAND_BYTES = 256 * 1024     # the expansion band a depthwise conv reads: about half of an L2
# A block whose whole expansion is at most PRE_BYTES expands the image in one GEMM before its
# depthwise conv (F_PRE), instead of band by band: at 28x28 pixels and below a band is a few
# rows, and few-row GEMMs run slowly. When one image is split over threads ("bands" mode), rows
# split the banded expansion badly (at 7x7 with a 5x5 kernel each of two threads expanded 5-6
# of the 7 rows), and an expansion split by pixels (an EXPAND phase, run.py) computes nothing
# twice but costs a barrier and reading the other thread's half: it paid for expansions of
# PRE_SPLIT_MACS or more (Large's 14x14 and 7x7 SE blocks: 10-27 % per block) and lost for
# smaller ones (Small's: 5-15 %), so in that mode only those keep F_PRE.
PRE_BYTES = 640 * 1024
PRE_SPLIT_MACS = 5_000_000
STEM_COLS = 16 * 1024       # values of the stem's im2col band (64 KB in float32)


def fold_conv_bn(model, m: ConvBNAct):
    """(w * alpha, beta - mu * alpha) in float64 for the Conv-BN module ``m`` (see above)."""
    p, b, bn = model.params, model.buffers, f"{m.name}.1"
    alpha = p[f"{bn}.weight"].astype(np.float64) / np.sqrt(
        b[f"{bn}.running_var"].astype(np.float64) + model.bn_eps)
    bias = p[f"{bn}.bias"] - b[f"{bn}.running_mean"].astype(np.float64) * alpha
    w = p[f"{m.name}.0.weight"].astype(np.float64) * alpha[:, None, None, None]
    return w, bias


def conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class Plan:
    """Folded weights in one flat array plus one table row per step (sizes filled per input)."""

    def __init__(self, model):
        self.dtype = np.dtype(model.dtype)
        self._parts, self._size = [], 0
        self.steps = []                    # (row template: dict of F_* -> value, module name)
        feats = model.features
        stem = feats[0]
        geom = (stem.k, stem.stride, stem.padding, stem.dilation)
        if geom != (3, 2, 1, 1):        # torchvision's first conv; nhwc.conv_rows has no other
            raise ValueError(f"the engine's stem is a 3x3 conv, stride 2, padding 1, dilation "
                             f"1 (torchvision's); {stem.name} has (kernel, stride, padding, "
                             f"dilation) = {geom}")
        w, b = fold_conv_bn(model, stem)                       # (K, 3, 3, 3)
        K = w.shape[0]
        self.steps.append(({F_KIND: STEM, F_CIN: stem.cin, F_COUT: K, F_K: stem.k,
                            F_S: stem.stride, F_P: stem.padding, F_D: stem.dilation,
                            F_ACT: ACT_CODES[stem.act],
                            F_WE: self._put(w.reshape(K, -1).T), F_BE: self._put(b)},
                           stem.name))
        for m in feats[1:]:
            if isinstance(m, InvertedResidual):
                self.steps.append((self._block(model, m), m.name))
            else:                                              # the last 1x1 conv + act
                w, b = fold_conv_bn(model, m)
                self.steps.append(({F_KIND: CONV1, F_CIN: m.cin, F_COUT: m.cout, F_K: 1,
                                    F_S: 1, F_D: 1, F_ACT: ACT_CODES[m.act],
                                    F_WP: self._put(w[:, :, 0, 0].T), F_BP: self._put(b)},
                                   m.name))
        p = model.params
        self.fc = np.array([self._put(p["classifier.0.weight"]),
                            self._put(p["classifier.0.bias"]),
                            self._put(p["classifier.3.weight"]),
                            self._put(p["classifier.3.bias"])], dtype=np.int64)
        self.hidden, self.num_classes = p["classifier.3.weight"].shape[1], \
            p["classifier.3.weight"].shape[0]
        self.head_channels = feats[-1].cout
        self.wb = np.concatenate(self._parts).astype(self.dtype) if self._parts else None
        del self._parts
        self.kc = np.array([0, 3, 6], dtype=self.dtype)        # epilogue constants
        self._tables = {}

    def _put(self, a) -> int:
        """Append ``a`` (C order) to the flat weights; returns its offset."""
        off = self._size
        flat = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
        self._parts.append(flat)
        self._size += flat.size
        return off

    def _block(self, model, m: InvertedResidual) -> dict:
        layers, b = m.layers, m.spec
        row = {F_KIND: BLOCK, F_CIN: b.cin, F_CEXP: b.exp, F_COUT: b.cout, F_EXPAND: 0, F_SE: 0,
               F_RES: int(b.use_residual), F_ACT: ACT_CODES[b.act]}
        i = 0
        if b.has_expand:
            w, bias = fold_conv_bn(model, layers[0])          # (exp, cin, 1, 1)
            row.update({F_EXPAND: 1, F_WE: self._put(w[:, :, 0, 0].T), F_BE: self._put(bias)})
            i = 1
        dw = layers[i]
        w, bias = fold_conv_bn(model, dw)                     # (exp, 1, k, k)
        row.update({F_K: dw.k, F_S: dw.stride, F_P: dw.padding, F_D: dw.dilation,
                    F_WD: self._put(w[:, 0].reshape(dw.cout, -1).T), F_BD: self._put(bias)})
        if isinstance(layers[i + 1], SqueezeExcite):
            se, p = layers[i + 1], model.params
            row.update({F_SE: 1, F_SQ: se.squeeze,
                        F_W1: self._put(p[f"{se.name}.fc1.weight"].reshape(se.squeeze, -1)),
                        F_B1: self._put(p[f"{se.name}.fc1.bias"]),
                        F_W2: self._put(p[f"{se.name}.fc2.weight"].reshape(-1, se.squeeze)),
                        F_B2: self._put(p[f"{se.name}.fc2.bias"])})
        w, bias = fold_conv_bn(model, layers[-1])             # (cout, exp, 1, 1)
        row.update({F_WP: self._put(w[:, :, 0, 0].T), F_BP: self._put(bias)})
        return row

    @property
    def names(self):
        return [name for _, name in self.steps]

    def table(self, H: int, W: int, mode: str = "images"):
        """(table (steps, NF) int64, sizes dict) for an input of H x W pixels run in ``mode``
        ("images" or "bands", ``FoldedNet.mode``; they differ in F_PRE only), cached."""
        key = (H, W, mode)
        if key not in self._tables:
            rows, sizes = self._layout(H, W)
            if mode == "bands":
                macs = rows[:, F_H] * rows[:, F_W] * rows[:, F_CIN] * rows[:, F_CEXP]
                rows[:, F_PRE] &= macs >= PRE_SPLIT_MACS
            self._tables[key] = rows, sizes
        return self._tables[key]

    def _layout(self, H, W):
        rows = np.zeros((len(self.steps), NF), dtype=np.int64)
        item = self.dtype.itemsize
        act = dw = band = acc = chan = sq = 0
        h, w = H, W
        for n, (tmpl, _) in enumerate(self.steps):
            r = rows[n]
            for f, v in tmpl.items():
                r[f] = v
            k, s, p, d = r[F_K], r[F_S], r[F_P], r[F_D]
            ho, wo = conv_out(h, k, s, p, d), conv_out(w, k, s, p, d)
            if ho < 1 or wo < 1:
                raise ValueError(f"input {H}x{W} is too small: {tmpl and self.steps[n][1]} "
                                 f"would have an empty output")
            r[F_H], r[F_W], r[F_HO], r[F_WO] = h, w, ho, wo
            cexp = r[F_CEXP] if r[F_KIND] == BLOCK else r[F_COUT]
            if r[F_KIND] == BLOCK:
                # output rows per band: the expansion rows they read fill about BAND_BYTES
                rows_in = max(1, BAND_BYTES // (w * cexp * item))
                R = max(1, (rows_in - (k - 1) * d - 1) // s + 1)
                r[F_R] = min(ho, R)
                span = (r[F_R] - 1) * s + (k - 1) * d + 1
                r[F_PRE] = r[F_EXPAND] and h * w * cexp * item <= PRE_BYTES
                band = max(band, h * w * cexp if r[F_PRE] else
                           min(h, span) * w * cexp if r[F_EXPAND] else 0)
                dw = max(dw, ho * wo * cexp)
            acc = max(acc, wo * cexp)
            if r[F_KIND] == STEM:               # im2col scratch: rows of about STEM_COLS
                row = wo * r[F_CIN] * k * k
                acc = max(acc, max(1, STEM_COLS // row) * row)
            act = max(act, ho * wo * r[F_COUT])
            chan = max(chan, cexp)
            sq = max(sq, r[F_SQ])
            h, w = ho, wo
        sizes = {"act": act, "dw": dw, "band": band, "acc": acc, "chan": chan,
                 "sq": max(sq, 1), "out_hw": (h, w)}
        return rows, sizes
