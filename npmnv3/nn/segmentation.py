"""Semantic segmentation on MobileNetV3-Large: LR-ASPP (MobileNetV3 §6.3) and DeepLabV3.

torchvision ``segmentation/lraspp.py`` ``_lraspp_mobilenetv3`` and ``deeplabv3.py``
``_deeplabv3_mobilenetv3``, module for module:

* the backbone is ``mobilenet_v3_large(dilated=True).features``: the last stage's depthwise
  convs use dilation 2 instead of stride 2, so the features stay at output stride 16;
* ``stage_indices`` = [0] + the blocks whose configured stride is 2 (torchvision's ``_is_cn``)
  + [the last module] = [0, 2, 4, 7, 13, 16]; ``stage_indices[-4]`` = 4 gives the low-level
  features (40 channels, stride 8), ``stage_indices[-1]`` = 16 the high-level ones (960, 16);
  ``IntermediateLayerGetter`` keeps ``backbone.0`` ... ``backbone.16``;
* the head (``seg_heads.py``) maps them to class scores, and the final
  ``F.interpolate(size=input size, mode="bilinear", align_corners=False)`` brings those back
  to the input's pixels (``_SimpleSegmentationModel.forward``, ``LRASPP.forward``).

``model(x)`` returns ``{"out": (N, K, H, W)}`` (plus ``"aux"``, DeepLabV3's FCN head on the
low-level features, with ``aux_loss=True``); ``backward({"out": g, "aux": g_aux})`` returns
dL/dx and adds every parameter's gradient to ``model.grads``. The low-level features feed both
the head (or the aux head) and the next backbone block: their gradients add, written out in
``backward``. In eval mode a forward keeps only its input and a following ``backward`` replays
it (eval mode is deterministic), so ``backward`` works in both modes, as in torch; inside
``npmnv3.no_grad()`` nothing is kept.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from .. import kernels as K
from ..io.statedict import assign_state_dict, check_state_dict
from .blocks import (
    Ctx,
    conv_bn_act_backward,
    conv_bn_act_forward,
    inverted_residual_backward,
    inverted_residual_forward,
)
from .modules import InvertedResidual
from .seg_heads import DeepLabHead, FCNHead, LRASPPHead, init_head
from .store import ParameterStore

KINDS = ("lraspp", "deeplabv3")


def stage_indices(modules) -> list[int]:
    """torchvision's ``stage_indices``: the stem, every block with configured stride > 1 (a
    "C_n" block), and the last module."""
    return [0] + [i for i, m in enumerate(modules) if isinstance(m, InvertedResidual)
                  and m.spec.stride > 1] + [len(modules) - 1]


def _renamed(m, name):
    return InvertedResidual(name, m.spec) if isinstance(m, InvertedResidual) else \
        dataclasses.replace(m, name=name)


class Trace(NamedTuple):
    """What ``backward`` needs from the forward it follows."""
    shape: tuple              # the input's (N, 3, H, W)
    backbone: tuple           # one cache per backbone module, in order
    head: tuple
    up: tuple                 # the final bilinear upsampling of "out"
    aux: tuple | None         # (aux head cache, its upsampling) with aux_loss


class SegmentationModel(ParameterStore):
    """LR-ASPP or DeepLabV3 on a dilated MobileNetV3-Large; build with
    ``lraspp_mobilenet_v3_large`` / ``deeplabv3_mobilenet_v3_large``."""

    def __init__(self, kind: str, num_classes: int = 21, *, aux_loss: bool = False,
                 dtype=np.float32, seed=None):
        from .builders import mobilenet_v3_large

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if kind == "lraspp" and aux_loss:
            raise ValueError("LR-ASPP has no auxiliary classifier (torchvision: 'This model "
                             "does not use auxiliary loss')")
        dtype = np.dtype(dtype)
        base = mobilenet_v3_large(dilated=True, dtype=dtype, seed=seed)   # torchvision's init
        self.kind, self.num_classes, self.aux_loss = kind, int(num_classes), bool(aux_loss)
        self.dtype, self.impl, self.training = dtype, "fast", True
        self.bn_eps, self.bn_momentum = base.bn_eps, base.bn_momentum
        self.backbone = [_renamed(m, f"backbone.{i}") for i, m in enumerate(base.features)]
        stages = stage_indices(self.backbone)
        self.low_pos, self.high_pos = stages[-4], stages[-1]                # 4 and 16
        low_ch = self.backbone[self.low_pos].spec.cout
        high_ch = self.backbone[self.high_pos].cout
        self.head = (LRASPPHead(low_ch, high_ch, self.num_classes) if kind == "lraspp" else
                     DeepLabHead(high_ch, self.num_classes))
        self.aux_head = FCNHead(low_ch, self.num_classes) if aux_loss else None
        self.layout = [(k.replace("features.", "backbone.", 1), s, kd) for k, s, kd in
                       base.layout if k.startswith("features.")]
        self.params = {k.replace("features.", "backbone.", 1): v for k, v in base.params.items()
                       if k.startswith("features.")}
        self.buffers = {k.replace("features.", "backbone.", 1): v
                        for k, v in base.buffers.items()}
        rng = np.random.default_rng(seed)
        for head in self.heads():
            self.layout += list(head.layout())
            params, buffers = init_head(head, rng, dtype)
            self.params.update(params)
            self.buffers.update(buffers)
        self.grads: dict[str, np.ndarray] = {}
        self._rng = rng
        self._trace: Trace | None = None
        self._replay: np.ndarray | None = None

    def heads(self):
        return [self.head] + ([self.aux_head] if self.aux_head is not None else [])

    # ------------------------------------------------------------------ state

    def load_state_dict(self, sd: dict, strict: bool = True) -> dict:
        """Load arrays by torchvision key (cast to the model's dtype); every problem is reported
        in one ``ValueError``. ``num_batches_tracked`` may be missing (set to 0)."""
        report = check_state_dict(sd, self.layout, strict=strict)
        assign_state_dict(sd, self.layout, self.params, self.buffers, self.dtype)
        self._trace = self._replay = None
        return report

    def train(self, mode: bool = True):
        self.training = bool(mode)
        self._trace = self._replay = None
        return self

    def eval(self):
        return self.train(False)

    def module_names(self) -> list[str]:
        """Every module name torchvision's ``named_modules()`` lists (except the root)."""
        names = ["backbone"]
        for m in self.backbone:
            names += list(m.module_names())
        for head in self.heads():
            names += head.module_names()
        return names

    # ------------------------------------------------------------------ forward

    def __call__(self, x, **kw):
        return self.forward(x, **kw)

    def _check_input(self, x):
        """x must be a non-empty (N, 3, H, W) array of the model's dtype (as ``MobileNetV3``)."""
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != 3 or 0 in x.shape:
            what = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"input must be a non-empty array of shape (N, 3, H, W), got {what}")
        if x.dtype != self.dtype:
            raise ValueError(f"input is {x.dtype} (shape {x.shape}) but the model is "
                             f"{self.dtype}: cast it with x.astype(np.{self.dtype.name})")
        return x

    def forward(self, x, *, rng=None, freeze_backbone=False):
        """``{"out": (N, K, H, W)}`` (+ ``"aux"``) for images x (N, 3, H, W). In train mode
        batch norm uses batch statistics (and updates the running ones) and dropout draws from
        ``rng`` (default: the model's generator).

        ``freeze_backbone``: the backbone runs in eval mode (running statistics, left as they
        are; nothing kept), the heads in the model's mode; ``backward`` then computes the
        heads' gradients only (fine-tuning the head of a pretrained network)."""
        return self._forward(self._check_input(x), rng=rng, frozen=freeze_backbone)[0]

    def forward_intermediates(self, x, *, rng=None):
        """``(result, outputs)``: the output of every module torchvision names, by that name."""
        record = {}
        result, _ = self._forward(self._check_input(x), rng=rng, record=record)
        return result, record

    def _forward(self, x, *, rng=None, record=None, keep=None, frozen=False):
        from .model import grad_enabled

        keep = (self.training and grad_enabled()) if keep is None else keep
        updates = {} if self.training else None
        rng = self._rng if rng is None else (rng if isinstance(rng, np.random.Generator)
                                             else np.random.default_rng(rng))
        ctx = Ctx(self.training, self.impl, self.bn_eps, self.bn_momentum, updates, record, rng)
        bctx = ctx._replace(training=False, updates=None) if frozen else ctx   # the backbone's
        p = {**self.params, **self.buffers}
        caches, y, low = [], x, None
        for i, m in enumerate(self.backbone):
            fwd = inverted_residual_forward if isinstance(m, InvertedResidual) else \
                conv_bn_act_forward
            y, c = fwd(y, m, p, bctx)
            caches.append(c if keep and not frozen else None)
            if i == self.low_pos:
                low = y                                   # (N, 40, H/8, W/8)
        high, size, impl = y, x.shape[2:], self.impl       # (N, 960, H/16, W/16)
        if self.kind == "lraspp":
            z, c_head = self.head.forward(low, high, p, ctx)
        else:
            z, c_head = self.head.forward(high, p, ctx)
        out, c_up = K.bilinear_forward(z, size, impl=impl)                 # (N, K, H, W)
        result, c_aux = {"out": out}, None
        if self.aux_head is not None:
            za, c_ah = self.aux_head.forward(low, p, ctx)
            result["aux"], c_aup = K.bilinear_forward(za, size, impl=impl)
            c_aux = (c_ah, c_aup)
        if self.training:
            self.buffers.update(updates)
        self._replay = None if self.training or frozen or not grad_enabled() else x
        self._trace = Trace(x.shape, None if frozen else tuple(caches), c_head, c_up, c_aux) \
            if keep else None
        return result, ctx

    # ------------------------------------------------------------------ backward

    def backward(self, dout: dict, *, input_grad: bool = True):
        """Back-propagate ``{"out": dL/dout}`` (and ``"aux"``, optional) through the last
        forward; parameter gradients are *added* to ``self.grads``. Returns dL/dx (N, 3, H, W),
        or None with ``input_grad=False`` or after a ``freeze_backbone`` forward."""
        if self._trace is None:
            if self._replay is None:
                raise RuntimeError("backward needs a forward pass first (once per backward)")
            self._forward(self._replay, keep=True)        # eval mode: the same numbers again
        tr = self._trace
        N, _, H, W = tr.shape
        dout = self._check_dout(dout, (N, self.num_classes, H, W))
        impl, grads = self.impl, {}
        dz = K.bilinear_backward(dout["out"], tr.up, impl=impl)
        if self.kind == "lraspp":
            dlow, dhigh, g = self.head.backward(dz, tr.head)
        else:
            dlow, (dhigh, g) = None, self.head.backward(dz, tr.head)
        grads.update(g)
        if tr.aux is not None and "aux" in dout:
            da, g = self.aux_head.backward(K.bilinear_backward(dout["aux"], tr.aux[1],
                                                               impl=impl), tr.aux[0])
            grads.update(g)
            dlow = da if dlow is None else dlow + da       # both heads read the low features
        if tr.backbone is None:                           # freeze_backbone: stop here
            self._accumulate(grads)
            self._trace = None
            return None
        dy = dhigh
        for i in range(len(self.backbone) - 1, -1, -1):
            if i == self.low_pos and dlow is not None:
                dy = dy + dlow                            # low fed the head and block i + 1
            if isinstance(self.backbone[i], InvertedResidual):
                dy, g = inverted_residual_backward(dy, tr.backbone[i])
            else:
                dy, g = conv_bn_act_backward(dy, tr.backbone[i], need_dx=input_grad or i > 0)
            grads.update(g)
        self._accumulate(grads)
        self._trace = None
        return dy if input_grad else None

    def _check_dout(self, dout, shape):
        names = {"out"} | ({"aux"} if self.aux_head is not None else set())
        if not isinstance(dout, dict) or "out" not in dout or set(dout) - names:
            got = list(dout) if isinstance(dout, dict) else type(dout).__name__
            extra = " and optionally 'aux'" if "aux" in names else ""
            raise ValueError(f"backward takes a dict with 'out'{extra}, got {got}")
        for k, g in dout.items():
            if np.shape(g) != shape:
                raise ValueError(f"dout[{k!r}] must have shape {shape}, got {np.shape(g)}")
        return {k: np.asarray(g, dtype=self.dtype) for k, g in dout.items()}


# ----------------------------------------------------------------------------- builders

def lraspp_mobilenet_v3_large(*, num_classes: int = 21, dtype=np.float32,
                              seed=None) -> SegmentationModel:
    """torchvision's ``lraspp_mobilenet_v3_large`` (LR-ASPP, MobileNetV3 §6.3) with random
    weights; ``load_state_dict`` takes torchvision's checkpoints."""
    return SegmentationModel("lraspp", num_classes, dtype=dtype, seed=seed)


def deeplabv3_mobilenet_v3_large(*, num_classes: int = 21, aux_loss: bool = False,
                                 dtype=np.float32, seed=None) -> SegmentationModel:
    """torchvision's ``deeplabv3_mobilenet_v3_large``; ``aux_loss`` adds the FCN auxiliary
    classifier (the official checkpoint has one)."""
    return SegmentationModel("deeplabv3", num_classes, aux_loss=aux_loss, dtype=dtype, seed=seed)


def segmentation_from_state_dict(sd: dict, dtype=np.float32) -> SegmentationModel:
    """The model a torchvision segmentation state_dict belongs to (LR-ASPP or DeepLabV3, its
    class count, an aux classifier or not), built and loaded strictly."""
    if "classifier.cbr.0.weight" in sd:
        kind, w = "lraspp", sd.get("classifier.low_classifier.weight")
    elif "classifier.0.convs.0.0.weight" in sd:
        kind, w = "deeplabv3", sd.get("classifier.4.weight")
    else:
        raise ValueError("not an LR-ASPP or DeepLabV3 MobileNetV3-Large checkpoint: no "
                         "classifier.cbr.* or classifier.0.convs.* keys")
    if w is None or np.ndim(w) != 4:
        raise ValueError(f"{kind} checkpoint without its final classifier weight")
    aux = any(k.startswith("aux_classifier.") for k in sd)
    model = SegmentationModel(kind, int(np.shape(w)[0]), aux_loss=aux, dtype=dtype)
    model.load_state_dict(sd)
    return model
