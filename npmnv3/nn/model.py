"""MobileNetV3 over the kernels: torchvision's modules, names, initialisation and numerics.

``MobileNetV3(spec)`` holds parameters and buffers in flat dicts keyed by torchvision's
state_dict names. ``forward`` walks the module tree of ``npmnv3.layers`` with the kernels of
``npmnv3.kernels`` (the reference path: unfused, every module's output available, caches kept
for backward). In eval mode with the fast kernels, ``forward`` instead runs ``npmnv3.fused``:
batch norm folded into the convolutions, activations fused, the SE scale folded into the
projection (same results to float rounding; tested against the reference path).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import kernels as K
from ..io.statedict import check_state_dict
from .arch import NetSpec, from_stage_params, load_stage_params, preset_spec
from .modules import (
    ConvBNAct,
    InvertedResidual,
    SqueezeExcite,
    build_modules,
    state_dict_layout,
)

BN_EPS = 1e-3          # torchvision mobilenetv3.py: partial(nn.BatchNorm2d, eps=0.001, ...)
BN_MOMENTUM = 0.01     # ... momentum=0.01


class MobileNetV3:
    """MobileNetV3 with torchvision's structure. Build with ``mobilenet_v3_large/small``.

    ``impl`` ("fast" | "naive") picks the kernels' faces; ``fuse_bn_act`` (default True) runs
    each batch norm and its activation as one kernel on the reference path when no module
    outputs are recorded (``forward_intermediates`` always keeps them apart).
    """

    fuse_bn_act = True

    def __init__(self, spec: NetSpec, *, dropout: float = 0.2, dtype=np.float32,
                 bn_eps: float = BN_EPS, bn_momentum: float = BN_MOMENTUM, seed=None,
                 arch: dict | None = None):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.spec, self.dtype, self.dropout = spec, dtype, float(dropout)
        self.bn_eps, self.bn_momentum = bn_eps, bn_momentum
        self.arch = dict(arch or {})
        self.features, self.head = build_modules(spec, dropout)
        self.layout = state_dict_layout(self.features, self.head)
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.training = True              # like torch.nn.Module: train mode until .eval()
        self.impl = "fast"
        self._rng = np.random.default_rng(seed)
        self._folded = None               # the FoldedNet of the current state, built on use
        self._tape = None
        self._init_weights()

    # ------------------------------------------------------------------ construction and state

    def _init_weights(self):
        """torchvision's initialisation (MobileNetV3.__init__): kaiming_normal_(fan_out) for
        convs, ones/zeros for BN, N(0, 0.01) for linear weights, zero biases."""
        rng = self._rng
        for key, shape, kind in self.layout:
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

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, torchvision's keys in torchvision's order."""
        return {k: (self.buffers[k] if kind == "buffer" else self.params[k]).copy()
                for k, _, kind in self.layout}

    def load_state_dict(self, sd: dict, strict: bool = True) -> dict:
        """Load arrays by torchvision key; every problem is reported in one ``ValueError``.

        Values are cast to the model's dtype (float32 checkpoints load into float64 models).
        ``num_batches_tracked`` may be missing (older checkpoints); it is then set to 0.
        Returns ``{"missing": [...], "unexpected": [...]}`` (both empty when ``strict``).
        """
        report = check_state_dict(sd, self.layout, strict=strict, arch=self.arch)
        for key, _, kind in self.layout:
            if key not in sd:
                if key.endswith("num_batches_tracked"):
                    self.buffers[key] = np.array(0, dtype=np.int64)
                continue
            v = np.asarray(sd[key])
            if key.endswith("num_batches_tracked"):
                self.buffers[key] = np.array(int(v.reshape(-1)[0]), dtype=np.int64)
            elif kind == "buffer":
                self.buffers[key] = np.array(v, dtype=self.dtype)
            else:
                self.params[key] = np.array(v, dtype=self.dtype)
        self.changed()
        return report

    def reset_classifier(self, num_classes: int, *, rng=None):
        """Replace ``classifier.3`` by a fresh ``Linear(hidden, num_classes)`` initialised as
        torchvision does (weight ~ N(0, 0.01), bias 0), for fine-tuning on other classes;
        ``spec``, ``head``, the state_dict layout and ``arch`` follow. ``rng``: a Generator or
        a seed (default: the model's generator). Returns the model."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        n = int(num_classes)
        rng = rng if isinstance(rng, np.random.Generator) else (
            self._rng if rng is None else np.random.default_rng(rng))
        self.spec = dataclasses.replace(self.spec, num_classes=n)
        self.head = dataclasses.replace(self.head, num_classes=n)
        self.layout = state_dict_layout(self.features, self.head)
        self.params["classifier.3.weight"] = (rng.standard_normal((n, self.head.hidden))
                                              * 0.01).astype(self.dtype)
        self.params["classifier.3.bias"] = np.zeros(n, dtype=self.dtype)
        if self.arch:
            self.arch = {**self.arch, "num_classes": n}
        self.grads.pop("classifier.3.weight", None)
        self.grads.pop("classifier.3.bias", None)
        self._tape = None
        self.changed()
        return self

    def named_parameters(self):
        for key, _, kind in self.layout:
            if kind == "param":
                yield key, self.params[key]

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p in self.named_parameters()))

    def train(self, mode: bool = True):
        self.training = bool(mode)
        self.changed()
        return self

    def changed(self):
        """Forget everything derived from the parameters (the folded eval function): the one
        invalidation point, called by every method that changes the model's state."""
        self._folded = None

    def folded(self):
        """The ``FoldedNet`` (``npmnv3.nn.folded``) of the model's current state."""
        if self._folded is None:
            from .folded import fold
            self._folded = fold(self)
        return self._folded

    def eval(self):
        return self.train(False)

    def module_names(self) -> list[str]:
        """Every module name torchvision's ``named_modules()`` lists (except the root)."""
        names = ["features"]
        for m in self.features:
            names.extend(m.module_names())
        names.extend(self.head.module_names())
        return names

    # ------------------------------------------------------------------ forward

    def __call__(self, x):
        return self.forward(x)

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise ValueError(f"input must be a numpy array of shape (N, 3, H, W), got "
                             f"{type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must have shape (N, 3, H, W), got {x.shape}")
        if x.dtype.kind != "f":
            raise ValueError(f"input must be floating point, got dtype {x.dtype} (shape {x.shape})")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"input must be non-empty, got shape {x.shape}")
        return np.asarray(x, dtype=self.dtype)

    def forward(self, x, *, rng=None, keep_cache=None, freeze_backbone=False):
        """Logits (N, num_classes) for images x (N, 3, H, W). In train mode batch norm uses
        batch statistics (and updates the running ones) and dropout draws from ``rng``.

        ``keep_cache`` (default: in train mode) walks the reference path and keeps every
        kernel's cache so that ``backward`` can follow; in eval mode the default is the fused
        fast path, which keeps nothing.

        ``freeze_backbone``: ``features`` run in eval mode (running batch-norm statistics, left
        unchanged; nothing cached), the classifier in the model's mode with its caches kept, so
        that ``backward`` computes the classifier's gradients only and returns dL/d(features
        output) -- fine-tuning the head of a pretrained network.
        """
        x = self._check_input(x)
        keep = self.training if keep_cache is None else bool(keep_cache)
        self._tape = None
        if freeze_backbone:
            feats = self._frozen_features(x)
            tape = []
            logits = self._head_forward(feats, None, tape, rng)
            self._tape = tape
            return logits
        if not keep and not self.training and self.impl == "fast":
            return self.folded()(x)
        return self._reference_forward(x, rng=rng)[0]

    def _frozen_features(self, x):
        """``features`` in eval mode whatever the model's mode; nothing cached or updated."""
        training = self.training
        self.training = False
        try:
            if self.impl == "fast":
                if training:
                    self.changed()              # the folded weights may be stale in train mode
                return self.folded().features(x)
            return self._reference_forward(x, features_only=True, record=True)[1]["features"]
        finally:
            self.training = training
            if training:
                self.changed()

    # ------------------------------------------------------------------ backward

    def zero_grad(self):
        """Forget accumulated gradients (``named_grads`` then yields zeros)."""
        self.grads = {}

    def named_grads(self):
        """(name, gradient) for every parameter, torchvision's names; zeros if none yet."""
        for key, p in self.named_parameters():
            yield key, self.grads.get(key, np.zeros_like(p))

    def _accumulate(self, key, g):
        self.grads[key] = self.grads[key] + g if key in self.grads else g

    def backward(self, dlogits, *, capture=(), input_grad=True):
        """Back-propagate dL/dlogits (N, num_classes) through the last cached forward.

        Parameter gradients are *added* to ``self.grads`` (like torch's ``.grad``; see
        ``zero_grad``); returns dL/dx (N, 3, H, W). Where a tensor fans out (the residual skip,
        SE's input) the branch gradients are summed explicitly. The cache is released after.
        ``capture``: module names (``"features.16"``...) whose output gradients are stored in
        ``self.captured_grads`` on the way (Grad-CAM uses it). After a ``forward(...,
        freeze_backbone=True)`` only the classifier's gradients are computed and dL/d(features
        output) is returned. ``input_grad=False`` skips dL/dx (returns None): training needs
        only the parameters' gradients, and the stem's input gradient is its costliest part.
        """
        tape = self._tape
        if tape is None:
            raise RuntimeError("backward needs the caches of a forward pass: call "
                               "model.forward(x) in train mode, or model.forward(x, "
                               "keep_cache=True) in eval mode, first (once per backward)")
        N = tape[-1][2][-1].x.shape[0]          # the head's last linear: (N, hidden)
        dy = np.asarray(dlogits)
        if dy.shape != (N, self.spec.num_classes):
            raise ValueError(f"dlogits must have shape {(N, self.spec.num_classes)}, got "
                             f"{dy.shape}")
        dy = dy.astype(self.dtype, copy=False)
        impl, skips = self.impl, []
        self.captured_grads = {}
        for i in range(len(tape) - 1, -1, -1):
            kind, m, cache = tape[i]
            if kind == "end":                # dy is now dL/d(output of module m)
                if m in capture:
                    self.captured_grads[m] = dy
            elif kind == "head":
                dy = self._head_backward(dy, cache)
            elif kind == "act":
                dy = K.activation_backward(m.act, dy, cache, impl=impl)
            elif kind in ("bn", "bnact"):
                back = K.batchnorm_backward if kind == "bn" else K.batchnorm_act_backward
                dy, dw, db = back(dy, cache, impl=impl)
                self._accumulate(f"{m.name}.1.weight", dw)
                self._accumulate(f"{m.name}.1.bias", db)
            elif kind == "conv":
                if m.kind == "conv":     # the first op sees x: its dx only if asked for
                    dy, dw, _ = K.conv2d_backward(dy, cache, impl=impl,
                                                  need_dx=input_grad or i > 0)
                else:
                    back = {"depthwise": K.depthwise_backward,
                            "pointwise": K.pointwise_backward}[m.kind]
                    dy, dw, _ = back(dy, cache, impl=impl)
                self._accumulate(f"{m.name}.0.weight", dw)
            elif kind == "se":
                dy, *g = K.se_backward(dy, cache, impl=impl)
                for k, gk in zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), g):
                    self._accumulate(f"{m.name}.{k}", gk)
            elif kind == "residual":         # y = block(x) + x: dy reaches the skip as is
                skips.append(dy)
            elif kind == "skip_from":        # x fed block and skip: add the two gradients
                dy = dy + skips.pop()
        self._tape = None
        return dy if input_grad else None

    def _head_backward(self, dy, cache):
        c_pool, c_fc0, c_act, c_drop, c_fc3 = cache
        impl = self.impl
        dd, dw3, db3 = K.linear_backward(dy, c_fc3, impl=impl)
        da = K.dropout_backward(dd, c_drop, impl=impl)
        dh = K.hardswish_backward(da, c_act, impl=impl)
        dflat, dw0, db0 = K.linear_backward(dh, c_fc0, impl=impl)
        for k, g in (("3.weight", dw3), ("3.bias", db3), ("0.weight", dw0), ("0.bias", db0)):
            self._accumulate(f"classifier.{k}", g)
        N, C = dflat.shape
        return K.avgpool_backward(dflat.reshape(N, C, 1, 1), c_pool, impl=impl)

    def forward_intermediates(self, x, *, rng=None):
        """``(logits, outputs)``: the output of every module torchvision names, by that name."""
        x = self._check_input(x)
        logits, outs = self._reference_forward(x, rng=rng, record=True)
        return logits, outs

    def stage_ends(self) -> list[str]:
        """Names of the modules that end each resolution stage (output strides 2, 4, 8, ...):
        the module before every block with configured stride 2, and the last one. Dilation
        keeps the name list (the dilated stage then has the previous stage's stride)."""
        ends = [f"features.{i - 1}" for i, b in enumerate(self.spec.blocks, start=1)
                if b.stride == 2]
        return ends + [self.features[-1].name]

    def forward_features(self, x, stages=(1, 2, 3, 4, 5)):
        """Backbone feature maps at the end of each stage (output strides 2, 4, 8, 16, 32 for
        the presets; 2, 4, 8, 16, 16 when dilated), like timm's ``features_only`` and
        mmpretrain's ``out_indices``. ``stages`` are 1-based indices into ``stage_ends()``."""
        x = self._check_input(x)
        ends = self.stage_ends()
        for s in stages:
            if not (isinstance(s, (int, np.integer)) and 1 <= s <= len(ends)):
                raise ValueError(f"stages must be integers in 1..{len(ends)}, got {s!r}")
        _, outs = self._reference_forward(x, record=True, features_only=True)
        return [outs[ends[s - 1]] for s in stages]

    def _reference_forward(self, x, rng=None, record=False, features_only=False):
        """Walk the module tree with the kernels; keep caches (for backward) and outputs."""
        outs = {} if record else None
        tape = []
        y = x
        for m in self.features:
            y = self._module_forward(m, y, outs, tape)
        if outs is not None:
            outs["features"] = y
        if features_only:
            return None, outs
        logits = self._head_forward(y, outs, tape, rng)
        self._tape = tape
        return logits, outs

    def _module_forward(self, m, x, outs, tape):
        y = self._module_forward_inner(m, x, outs, tape)
        tape.append(("end", m.name, None))      # marks where the module's output gradient is
        return y

    def _module_forward_inner(self, m, x, outs, tape):
        if isinstance(m, InvertedResidual):
            if m.spec.use_residual:
                tape.append(("skip_from", m.name, None))
            y = x
            for layer in m.layers:
                y = self._module_forward(layer, y, outs, tape)
            if outs is not None:
                outs[f"{m.name}.block"] = y
            tape.append(("end", f"{m.name}.block", None))
            if m.spec.use_residual:
                y = y + x                                 # x fans out: block and skip
                tape.append(("residual", m.name, None))
            if outs is not None:
                outs[m.name] = y
            return y
        if isinstance(m, SqueezeExcite):
            return self._se_forward(m, x, outs, tape)
        return self._conv_bn_act_forward(m, x, outs, tape)

    def _conv_bn_act_forward(self, m: ConvBNAct, x, outs, tape):
        p, b, impl = self.params, self.buffers, self.impl
        w = p[f"{m.name}.0.weight"]
        if m.kind == "depthwise":
            y, c_conv = K.depthwise_forward(x, w, stride=m.stride, padding=m.padding,
                                            dilation=m.dilation, impl=impl)
        elif m.kind == "pointwise":
            y, c_conv = K.pointwise_forward(x, w, impl=impl)
        else:
            y, c_conv = K.conv2d_forward(x, w, stride=m.stride, padding=m.padding,
                                         dilation=m.dilation, groups=m.groups, impl=impl)
        tape.append(("conv", m, c_conv))
        bn = f"{m.name}.1"
        args = (p[f"{bn}.weight"], p[f"{bn}.bias"], b[f"{bn}.running_mean"],
                b[f"{bn}.running_var"])
        kw = dict(training=self.training, momentum=self.bn_momentum, eps=self.bn_eps,
                  num_batches_tracked=int(b[f"{bn}.num_batches_tracked"]), impl=impl)
        if outs is None and self.fuse_bn_act:     # one kernel: same numbers, fewer passes
            z, c_bn, stats = K.batchnorm_act_forward(y, *args, act=m.act, **kw)
            tape.append(("bnact", m, c_bn))
        else:                       # BN and activation apart (recording: both outputs kept)
            z, c_bn, stats = K.batchnorm_forward(y, *args, **kw)
            tape.append(("bn", m, c_bn))
            if outs is not None:
                outs[f"{m.name}.0"], outs[f"{m.name}.1"] = y, z
            if m.act:
                z, c_act = K.activation_forward(m.act, z, impl=impl)
                tape.append(("act", m, c_act))
                if outs is not None:
                    outs[f"{m.name}.2"] = z
            if outs is not None:
                outs[m.name] = z
        if self.training:
            b[f"{bn}.running_mean"], b[f"{bn}.running_var"] = stats.running_mean, \
                stats.running_var
            b[f"{bn}.num_batches_tracked"] = np.array(stats.num_batches_tracked, dtype=np.int64)
        return z

    def _se_forward(self, m: SqueezeExcite, x, outs, tape):
        p = self.params
        args = [p[f"{m.name}.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
        y, cache = K.se_forward(x, *args, impl=self.impl)
        tape.append(("se", m, cache))
        if outs is not None:                     # SE's submodules, read off its cache
            N, C = x.shape[:2]
            S = m.squeeze
            outs[f"{m.name}.avgpool"] = cache.fc1.x.reshape(N, C, 1, 1)
            outs[f"{m.name}.fc1"] = cache.act.x.reshape(N, S, 1, 1)
            outs[f"{m.name}.activation"] = cache.fc2.x.reshape(N, S, 1, 1)
            outs[f"{m.name}.fc2"] = cache.gate_act.x.reshape(N, C, 1, 1)
            outs[f"{m.name}.scale_activation"] = cache.gate.reshape(N, C, 1, 1)
            outs[m.name] = y
        return y

    def _head_forward(self, x, outs, tape, rng):
        p, impl = self.params, self.impl
        pooled, c_pool = K.avgpool_forward(x, impl=impl)                # (N, C, 1, 1)
        flat = pooled.reshape(pooled.shape[0], -1)                        # torch.flatten(x, 1)
        h, c_fc0 = K.linear_forward(flat, p["classifier.0.weight"], p["classifier.0.bias"],
                                    impl=impl)
        a, c_act = K.hardswish_forward(h, impl=impl)
        d, c_drop = K.dropout_forward(a, self.dropout, training=self.training, rng=rng, impl=impl)
        logits, c_fc3 = K.linear_forward(d, p["classifier.3.weight"], p["classifier.3.bias"],
                                         impl=impl)
        tape.append(("head", self.head, (c_pool, c_fc0, c_act, c_drop, c_fc3)))
        if outs is not None:
            outs.update({"avgpool": pooled, "classifier.0": h, "classifier.1": a,
                         "classifier.2": d, "classifier.3": logits, "classifier": logits})
        return logits


# ----------------------------------------------------------------------------- builders

_BUILD_KEYS = ("num_classes", "width_mult", "reduced_tail", "dilated", "dropout", "dtype",
               "seed")


def _build(arch, *, num_classes=1000, width_mult=1.0, reduced_tail=False, dilated=False,
           dropout=0.2, dtype=np.float32, seed=None, **unknown):
    if unknown:
        raise TypeError(f"mobilenet_v3_{arch}() got unknown keyword argument(s) "
                        f"{sorted(unknown)}; accepted: {list(_BUILD_KEYS)}")
    spec = preset_spec(arch, width_mult=width_mult, reduced_tail=reduced_tail, dilated=dilated,
                       num_classes=num_classes)
    meta = {"arch": arch, "num_classes": num_classes, "width_mult": width_mult,
            "reduced_tail": reduced_tail, "dilated": dilated}
    return MobileNetV3(spec, dropout=dropout, dtype=dtype, seed=seed, arch=meta)


def mobilenet_v3_large(**kwargs) -> MobileNetV3:
    """torchvision's ``mobilenet_v3_large`` (same keyword arguments and meaning; an unknown
    keyword is an error). Extra: ``dtype`` (float32/float64), ``seed`` for the initialisation."""
    return _build("large", **kwargs)


def mobilenet_v3_small(**kwargs) -> MobileNetV3:
    """torchvision's ``mobilenet_v3_small``; see ``mobilenet_v3_large``."""
    return _build("small", **kwargs)


def mobilenet_v3_from_config(config, *, last_channel: int | None = None, num_classes=1000,
                             dropout=0.2, dtype=np.float32, seed=None) -> MobileNetV3:
    """A MobileNetV3 from a netspresso-trainer style ``stage_params`` description.

    ``config`` is a YAML/JSON file path, or the ``stage_params`` list itself (stages of parallel
    lists: in_channels, kernel_sizes, expanded_channels, out_channels, use_se, act_type,
    stride, optional dilation). ``last_channel`` (the classifier's hidden width) comes from the
    argument, else from the file (``last_channel`` or netspresso's head
    ``intermediate_channels``). ``npmnv3/configs/mobilenet_v3_{large,small}.yaml`` build exactly
    the presets. Invalid configs raise ValueError naming the stage and field.
    """
    source = None
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        source = str(config)
        stage_params, file_last = load_stage_params(config)
        last_channel = last_channel if last_channel is not None else file_last
    else:
        stage_params = config
    if last_channel is None:
        raise ValueError("last_channel (the classifier's hidden width, 1280 for Large, 1024 for "
                         "Small) is not in the config: pass last_channel=...")
    spec = from_stage_params(stage_params, last_channel, num_classes=num_classes)
    meta = {"arch": "custom", "num_classes": num_classes, "config": source}
    return MobileNetV3(spec, dropout=dropout, dtype=dtype, seed=seed, arch=meta)


def config_path(arch: str) -> str:
    """Path of the packaged stage_params YAML of a preset ("large" or "small")."""
    from importlib.resources import files
    if arch not in ("large", "small"):
        raise ValueError(f"unknown preset {arch!r}; expected 'large' or 'small'")
    return str(files("npmnv3.nn") / "configs" / f"mobilenet_v3_{arch}.yaml")
