"""MobileNetV3 over the blocks: torchvision's modules, names, initialisation and numerics.

``MobileNetV3(config)`` holds parameters and buffers in flat dicts keyed by torchvision's
state_dict names. ``forward`` is a loop over the blocks of ``blocks.py`` (stem, bottlenecks,
last conv, classifier), keeping each block's cache; ``backward`` is the same loop run backwards
over those caches. In eval mode with the fast kernels ``forward`` runs the folded engine instead
(``folded.py``: batch norm folded into the convolutions, fused, re-laid-out; tested equal to the
blocks), keeping only its input: a ``backward`` after it first replays that input through the
blocks in eval mode, so ``y = model(x); dx = model.backward(dy)`` works in either mode, as in
torch. Inside ``with npmnv3.no_grad():`` nothing is kept for a backward.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import numpy as np

from ..io.statedict import assign_state_dict, check_state_dict
from ..kernels.heap import keep_freed_memory
from ..kernels.threads import single_threaded_blas
from .blocks import (
    ClassifierCache,
    ConvBNActCache,
    Ctx,
    classifier_backward,
    classifier_forward,
    conv_bn_act_backward,
    conv_bn_act_forward,
    inverted_residual_backward,
    inverted_residual_forward,
)
from .config import MobileNetV3Config
from .modules import build_modules
from .store import ParameterStore

BN_EPS = 1e-3          # torchvision mobilenetv3.py: partial(nn.BatchNorm2d, eps=0.001, ...)
BN_MOMENTUM = 0.01     # ... momentum=0.01

_grad_mode = threading.local()


@contextlib.contextmanager
def no_grad():
    """Like ``torch.no_grad()``: forwards inside keep nothing for a backward (less memory)."""
    before = grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = before


def grad_enabled() -> bool:
    return getattr(_grad_mode, "enabled", True)


class Trace(NamedTuple):
    """What ``backward`` needs from the forward it follows."""
    batch: int
    replay: np.ndarray | None = None           # eval fast path: the input, to replay
    stem: ConvBNActCache | None = None         # None with freeze_backbone: backward stops at
    blocks: tuple = ()                         #   the classifier
    last: ConvBNActCache | None = None
    head: ClassifierCache | None = None


class MobileNetV3(ParameterStore):
    """MobileNetV3 with torchvision's structure. Build with ``mobilenet_v3_large/small``.

    ``impl`` ("fast" | "naive") picks the kernels' faces (and "naive" never runs the folded
    engine). ``bn_eps``: the batch-norm eps of the weights (torchvision 1e-3, timm 1e-5).
    """

    def __init__(self, config: MobileNetV3Config, *, dtype=np.float32, bn_eps: float = BN_EPS,
                 bn_momentum: float | None = BN_MOMENTUM, seed=None):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.config, self.dtype = MobileNetV3Config.from_dict(config), dtype
        self.bn_eps, self.bn_momentum = bn_eps, bn_momentum
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.captured_grads: dict[str, np.ndarray] = {}
        self.training = True              # like torch.nn.Module: train mode until .eval()
        self.impl = "fast"
        self._rng = np.random.default_rng(seed)
        self._folded = None               # the FoldedNet of the current state, built on use
        self._trace: Trace | None = None
        self._build()
        self._init_weights()

    def _build(self):
        self.spec = self.config.spec()
        self.features, self.head = build_modules(self.spec, self.config.dropout)
        self.stem, self.bnecks, self.last_conv = (self.features[0], self.features[1:-1],
                                                  self.features[-1])
        self.layout = self.config.layout()

    # ------------------------------------------------------------------ construction and state

    def _init_weights(self, keys=None):
        """torchvision's initialisation (MobileNetV3.__init__): kaiming_normal_(fan_out) for
        convs, ones/zeros for BN, N(0, 0.01) for linear weights, zero biases."""
        rng = self._rng
        for key, shape, kind in self.layout:
            if keys is not None and key not in keys:
                continue
            if kind == "buffer":
                if key.endswith("num_batches_tracked"):
                    self.buffers[key] = np.array(0, dtype=np.int64)
                else:
                    fill = 0.0 if key.endswith("running_mean") else 1.0
                    self.buffers[key] = np.full(shape, fill, dtype=self.dtype)
            elif len(shape) == 4:                      # conv: std = sqrt(2 / (K * kH * kW))
                fan_out = shape[0] * shape[2] * shape[3]
                self.params[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(
                    self.dtype)
            elif key.startswith("classifier") and key.endswith("weight"):
                self.params[key] = (rng.standard_normal(shape) * 0.01).astype(self.dtype)
            elif key.endswith("weight"):               # BN gamma
                self.params[key] = np.ones(shape, dtype=self.dtype)
            else:                                      # every bias
                self.params[key] = np.zeros(shape, dtype=self.dtype)

    def load_state_dict(self, sd: dict, strict: bool = True) -> dict:
        """Load arrays by torchvision key; every problem is reported in one ``ValueError``.

        Values are cast to the model's dtype (float32 checkpoints load into float64 models).
        ``num_batches_tracked`` may be missing (older checkpoints); it is then set to 0.
        Returns ``{"missing": [...], "unexpected": [...]}`` (both empty when ``strict``).
        """
        report = check_state_dict(sd, self.layout, strict=strict, config=self.config)
        assign_state_dict(sd, self.layout, self.params, self.buffers, self.dtype)
        self.changed()
        return report

    def reset_classifier(self, num_classes: int, *, rng=None):
        """Replace ``classifier.3`` by a fresh ``Linear(hidden, num_classes)`` initialised as
        torchvision does (weight ~ N(0, 0.01), bias 0), for fine-tuning on other classes; the
        config and the state_dict layout follow. ``rng``: a Generator or a seed (default: the
        model's generator). Returns the model."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if rng is not None:
            self._rng = rng if isinstance(rng, np.random.Generator) else \
                np.random.default_rng(rng)
        self.config = self.config.replace(num_classes=int(num_classes))
        self._build()
        self._init_weights({"classifier.3.weight", "classifier.3.bias"})
        for k in ("classifier.3.weight", "classifier.3.bias"):
            self.grads.pop(k, None)
        self.changed()
        return self

    def train(self, mode: bool = True):
        self.training = bool(mode)
        self.changed()
        return self

    def eval(self):
        return self.train(False)

    def changed(self):
        """Forget everything derived from the parameters (the folded engine, a pending
        backward): the one invalidation point, called by every method that changes state."""
        self._folded = None
        self._trace = None

    def folded(self):
        """The ``FoldedNet`` (``folded.py``) of the model's current state."""
        if self._folded is None:
            from .folded import fold
            self._folded = fold(self)
        return self._folded

    def module_names(self) -> list[str]:
        """Every module name torchvision's ``named_modules()`` lists (except the root)."""
        names = ["features"]
        for m in self.features:
            names.extend(m.module_names())
        names.extend(self.head.module_names())
        return names

    def stage_ends(self) -> list[str]:
        """Names of the modules that end each resolution stage (output strides 2, 4, 8, ...):
        the module before every block with configured stride 2, and the last one. Dilation
        keeps the name list (the dilated stage then has the previous stage's stride)."""
        ends = [f"features.{i - 1}" for i, b in enumerate(self.spec.blocks, start=1)
                if b.stride == 2]
        return ends + [self.last_conv.name]

    # ------------------------------------------------------------------ forward

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    def forward(self, x, *, rng=None, freeze_backbone=False, engine=True):
        """Logits (N, num_classes) for images x (N, 3, H, W) in the model's dtype.

        Train mode: batch statistics (the running ones are updated), dropout from ``rng``.
        Eval mode runs the folded engine unless ``engine=False`` (then the blocks: the
        reference path, as in train mode) or ``impl="naive"``.
        ``freeze_backbone``: ``features`` run in eval mode whatever the model's mode (running
        statistics used and left alone) and a following ``backward`` stops at the classifier,
        returning dL/d(features output): fine-tuning a pretrained network's head.
        """
        x = self._check_input(x)
        self._trace = None
        keep = grad_enabled()
        ctx = self._ctx(rng)
        if freeze_backbone:
            feats = self._frozen_features(x)
            logits, c_head = classifier_forward(feats, self.head, self._weights(), ctx)
            self._trace = Trace(len(x), head=c_head) if keep else None
            return logits
        if engine and not self.training and self.impl == "fast":   # eval: the folded engine
            logits = self.folded()(x)
            self._trace = Trace(len(x), replay=x) if keep else None
            return logits
        logits, trace = self._forward_blocks(x, ctx)
        self._trace = trace if keep else None
        return logits

    def _forward_blocks(self, x, ctx: Ctx, head: bool = True):
        """The reference path: every block's forward in turn, caches kept for ``backward``.
        BLAS runs single-threaded inside: the kernels' GEMMs are per thread, in Numba's loops
        (``kernels/threads.py``); freed memory stays in the process for the next step
        (``kernels/heap.py``)."""
        keep_freed_memory()
        with single_threaded_blas():
            return self._forward_blocks_(x, ctx, head)

    def _forward_blocks_(self, x, ctx: Ctx, head: bool):
        p = self._weights()
        h, c_stem = conv_bn_act_forward(x, self.stem, p, ctx)           # (N, 16, H/2, W/2)
        c_blocks = []
        for m in self.bnecks:                                             # the bnecks
            h, c = inverted_residual_forward(h, m, p, ctx)
            c_blocks.append(c)
        h, c_last = conv_bn_act_forward(h, self.last_conv, p, ctx)       # (N, 6C, H/32, W/32)
        if ctx.record is not None:
            ctx.record["features"] = h
        logits, c_head = classifier_forward(h, self.head, p, ctx) if head else (None, None)
        if ctx.training:
            self.buffers.update(ctx.updates)                # the new running statistics
        return logits, Trace(len(x), None, c_stem, tuple(c_blocks), c_last, c_head)

    def forward_intermediates(self, x, *, rng=None):
        """``(logits, outputs)``: the output of every module torchvision names, by that name
        (through the blocks, the same kernels as ``forward``'s reference path)."""
        x = self._check_input(x)
        record = {}
        logits, trace = self._forward_blocks(x, self._ctx(rng, record))
        self._trace = trace if grad_enabled() else None
        return logits, record

    def forward_features(self, x, stages=(1, 2, 3, 4, 5)):
        """Backbone feature maps at the end of each stage (output strides 2, 4, 8, 16, 32 for
        the presets; 2, 4, 8, 16, 16 when dilated), like timm's ``features_only`` and
        mmpretrain's ``out_indices``. ``stages`` are 1-based indices into ``stage_ends()``."""
        x = self._check_input(x)
        ends = self.stage_ends()
        for s in stages:
            if not (isinstance(s, (int, np.integer)) and 1 <= s <= len(ends)):
                raise ValueError(f"stages must be integers in 1..{len(ends)}, got {s!r}")
        record = {}
        self._forward_blocks(x, self._ctx(None, record), head=False)
        return [record[ends[s - 1]] for s in stages]

    def _frozen_features(self, x):
        """``features`` in eval mode whatever the model's mode; nothing cached or updated."""
        if self.impl == "fast":
            if self.training:
                self._folded = None             # train-mode weights change every step
            return self.folded().features(x)
        record = {}
        self._forward_blocks(x, self._ctx(None, record)._replace(training=False), head=False)
        return record["features"]

    def _ctx(self, rng=None, record=None) -> Ctx:
        return Ctx(self.training, self.impl, self.bn_eps, self.bn_momentum,
                   {} if self.training else None, record, rng)

    def _weights(self) -> dict:
        return {**self.params, **self.buffers}

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise ValueError(f"input must be a numpy array of shape (N, 3, H, W), got "
                             f"{type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            hint = (": it looks channels-last (N, H, W, 3); use x.transpose(0, 3, 1, 2)"
                    if x.ndim == 4 and x.shape[3] == 3 else "")
            raise ValueError(f"input must have shape (N, 3, H, W), got {x.shape}{hint}")
        if x.dtype.kind != "f":
            raise ValueError(f"input must be floating point, got dtype {x.dtype} (shape {x.shape})")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"input must be non-empty, got shape {x.shape}")
        if x.dtype != self.dtype:
            raise ValueError(f"input is {x.dtype} (shape {x.shape}) but the model is "
                             f"{self.dtype}: cast it with x.astype(np.{self.dtype.name}), or "
                             f"build the model with dtype=np.{x.dtype.name}")
        return x

    # ------------------------------------------------------------------ backward

    def backward(self, dlogits, *, capture=(), input_grad=True):
        """Back-propagate dL/dlogits (N, num_classes) through the last forward's blocks.

        Parameter gradients are *added* to ``self.grads`` (like torch's ``.grad``; see
        ``zero_grad``); returns dL/dx (N, 3, H, W), or None with ``input_grad=False`` (training
        needs only the parameters' gradients; the stem's input gradient is its costliest part).
        ``capture``: names of ``features``, ``features.<i>`` or ``features.<i>.block`` whose
        output gradients are stored in ``self.captured_grads`` (Grad-CAM). After
        ``forward(..., freeze_backbone=True)`` only the classifier's gradients are computed and
        dL/d(features output) is returned. One backward per forward: the caches are released.
        """
        trace = self._take_trace(dlogits)
        with single_threaded_blas():
            return self._backward(trace, dlogits, capture, input_grad)

    def _backward(self, trace: Trace, dlogits, capture, input_grad):
        dy = np.asarray(dlogits).astype(self.dtype, copy=False)
        wanted = self._check_capture(capture)
        self.captured_grads = {}

        def keep(name, d):
            if name in wanted:
                self.captured_grads[name] = d

        dh, g = classifier_backward(dy, trace.head)            # dL/d(features output)
        self._accumulate(g)
        if trace.stem is None:                                 # frozen backbone: stop here
            return dh
        keep("features", dh)
        keep(self.last_conv.name, dh)
        dh, g = conv_bn_act_backward(dh, trace.last)
        self._accumulate(g)
        for m, cache in zip(reversed(self.bnecks), reversed(trace.blocks)):
            keep(m.name, dh)
            keep(f"{m.name}.block", dh)                        # the residual passes dout on
            dh, g = inverted_residual_backward(dh, cache)
            self._accumulate(g)
        keep(self.stem.name, dh)
        dx, g = conv_bn_act_backward(dh, trace.stem, need_dx=input_grad)
        self._accumulate(g)
        return dx

    def _take_trace(self, dlogits) -> Trace:
        trace, self._trace = self._trace, None
        if trace is None:
            raise RuntimeError("backward needs the forward it follows: call model(x), then "
                               "model.backward(dlogits) once (forwards inside no_grad() keep "
                               "nothing, and a backward releases what its forward kept)")
        want = (trace.batch, self.config.num_classes)
        if np.shape(dlogits) != want:
            raise ValueError(f"dlogits must have the logits' shape {want}, got "
                             f"{np.shape(dlogits)}")
        if trace.replay is not None:                   # eval fast path: rebuild the caches
            ctx = self._ctx()._replace(training=False)
            trace = self._forward_blocks(trace.replay, ctx)[1]
        return trace

    def _check_capture(self, capture) -> set:
        wanted = {capture} if isinstance(capture, str) else set(capture)
        allowed = {"features", *(m.name for m in self.features),
                   *(f"{m.name}.block" for m in self.bnecks)}
        bad = sorted(wanted - allowed)
        if bad:
            raise ValueError(f"capture: {bad} are not module outputs backward passes through; "
                             f"choose among 'features', 'features.<i>' and "
                             f"'features.<i>.block'")
        return wanted
