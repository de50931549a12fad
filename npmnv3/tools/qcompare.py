"""Reference int8 models built with torchvision, and module-by-module comparison with ours.

``torchvision_quantized(arch)`` builds torchvision's ``QuantizableMobileNetV3`` the way its
quantized weights were made (``torchvision/models/quantization/mobilenetv3.py``:
``fuse_model(is_qat=True)``, ``get_default_qat_qconfig(engine)``, ``prepare_qat``), randomises
every batch norm (torchvision initialises them to the identity, which hides bugs), calibrates
the observers on a few random batches in train mode and converts. ``numpy_state_dict`` turns
its state_dict into what ``npmnv3.load_pth`` returns for the saved file (weights as
``QTensor``) without writing one; ``compare_quantized`` runs both models and counts, per
module, the output integers that differ and by how many steps.

torch is imported only inside these functions; the rest of npmnv3 never imports it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import numpy as np

from ..io.pth import QTensor
from .compare import randomise


@contextlib.contextmanager
def quantized_engine(name: str):
    """Run the block with ``torch.backends.quantized.engine = name``, then restore it."""
    import torch
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():          # torch.ao.quantization's deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield torch
    finally:
        torch.backends.quantized.engine = old


def qat_prepared(arch="large", *, engine="qnnpack", width_mult=1.0, num_classes=1000,
                 seed=0):
    """torchvision's ``QuantizableMobileNetV3`` fused and QAT-prepared for ``engine``, with
    randomised batch norms (train mode). Call inside ``quantized_engine(engine)``."""
    import torch
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
    from torchvision.models.quantization.mobilenetv3 import (
        QuantizableInvertedResidual,
        QuantizableMobileNetV3,
        _replace_relu,
    )
    torch.manual_seed(seed)
    setting, last = _mobilenet_v3_conf(f"mobilenet_v3_{arch}", width_mult=width_mult)
    model = QuantizableMobileNetV3(setting, last, block=QuantizableInvertedResidual,
                                   num_classes=num_classes)
    _replace_relu(model)
    randomise(torch, model, seed)
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig(engine)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    return model.train()


def torchvision_quantized(arch="large", *, engine="qnnpack", width_mult=1.0, num_classes=1000,
                          image_size=64, batches=3, batch_size=4, seed=0):
    """A converted torchvision quantized MobileNetV3 (eval mode), calibrated for ``engine`` on
    ``batches`` random batches (QAT train-mode forwards: observers and fake quantization)."""
    with quantized_engine(engine) as torch:
        model = qat_prepared(arch, engine=engine, width_mult=width_mult,
                             num_classes=num_classes, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(batch_size, 3, image_size, image_size, generator=g))
        model.eval()
        torch.ao.quantization.convert(model, inplace=True)
    return model


def _numpy_value(v):
    import torch
    if isinstance(v, torch.Tensor) and v.is_quantized:
        if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return QTensor(v.int_repr().numpy(), v.q_per_channel_scales().numpy(),
                           v.q_per_channel_zero_points().numpy(), v.q_per_channel_axis(),
                           str(v.dtype).replace("torch.", ""))
        return QTensor(v.int_repr().numpy(), v.q_scale(), v.q_zero_point(), None,
                       str(v.dtype).replace("torch.", ""))
    if isinstance(v, torch.Tensor):
        return v.detach().numpy().copy()
    if isinstance(v, tuple):
        return tuple(_numpy_value(t) for t in v)
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v


def numpy_state_dict(sd) -> dict:
    """A torch quantized state_dict in memory -> ``{key: QTensor | ndarray | tuple | str}``."""
    return {k: _numpy_value(v) for k, v in sd.items()}


def torch_quantized_outputs(model, x, engine="qnnpack"):
    """``(logits, {module name: QTensor})`` of a converted torch model on numpy ``x``; the
    ``FloatFunctional`` outputs (``skip_add``, ``skip_mul``) are named after the module, not
    its ``activation_post_process``."""
    outs, hooks = {}, []

    def hook(name):
        def save(_m, _inputs, out):
            if getattr(out, "is_quantized", False):
                outs[name.replace(".activation_post_process", "")] = QTensor(
                    out.int_repr().numpy().copy(), out.q_scale(), out.q_zero_point(), None,
                    "quint8")
        return save

    with quantized_engine(engine) as torch:
        try:
            for name, mod in model.named_modules():
                if name:
                    hooks.append(mod.register_forward_hook(hook(name)))
            with torch.no_grad():
                logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
        finally:
            for h in hooks:
                h.remove()
    return logits, outs


class QCompareRow(NamedTuple):
    name: str
    shape: tuple
    differing: int          # output integers that differ from torch's
    max_step: int           # largest difference, in quantization steps
    same_qparams: bool      # equal scale and zero point


def compare_quantized(ours, model, x, engine="qnnpack"):
    """``(rows, logits_ours, logits_torch)``: one ``QCompareRow`` per module torch reports, in
    the order our forward produced them (so the first differing row is where they part)."""
    ref_logits, ref = torch_quantized_outputs(model, x, engine)
    logits, mine = ours.forward_intermediates(x)
    order = list(mine) + [n for n in ref if n not in mine]
    rows = []
    for name in order:
        if name not in ref:
            continue
        r, m = ref[name], mine.get(name)
        if m is None or m.shape != r.shape:
            rows.append(QCompareRow(name, r.shape, r.int_repr.size, 255, False))
            continue
        d = np.abs(m.int_repr.astype(np.int64) - r.int_repr.astype(np.int64))
        rows.append(QCompareRow(name, r.shape, int(np.count_nonzero(d)), int(d.max(initial=0)),
                                (m.scale, m.zero_point) == (r.scale, r.zero_point)))
    return rows, logits, ref_logits


class OpRow(NamedTuple):
    name: str
    kind: str               # quantize, conv, depthwise, pointwise, linear, hardswish, ...
    elements: int
    differing: int          # our kernel on torch's inputs vs torch's output
    max_step: int


def _kernel_on(mod, inputs, kind):
    """Our kernel for torch module ``mod`` applied to torch's (quantized) inputs."""
    from .. import kernels as K

    def q(t):
        return t.int_repr().numpy(), t.q_scale(), t.q_zero_point()

    if kind == "quantize":
        return K.quantize_per_tensor(inputs[0].numpy(), float(mod.scale), int(mod.zero_point))
    if kind in ("add", "mul"):
        f = K.qadd if kind == "add" else K.qmul
        return f(*q(inputs[0]), *q(inputs[1]), mod.scale, mod.zero_point)
    if kind == "hardswish":
        return K.qhardswish(*q(inputs[0]), mod.scale, mod.zero_point)
    if kind == "hardsigmoid":
        return K.qhardsigmoid(*q(inputs[0]))
    if kind == "avgpool":
        return K.qadaptive_avgpool2d(*q(inputs[0]))
    w, b = mod._weight_bias()
    import torch
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        sw, zw = w.q_per_channel_scales().numpy().astype(np.float32), \
            w.q_per_channel_zero_points().numpy()
    else:
        sw, zw = w.q_scale(), w.q_zero_point()
    relu = type(mod).__name__.endswith("ReLU2d")
    args = (*q(inputs[0]), w.int_repr().numpy(), sw, zw,
            None if b is None else b.detach().numpy(), mod.scale, mod.zero_point)
    if kind == "linear":
        return K.qlinear(*args, relu=relu)
    return K.qconv2d(*args, stride=mod.stride[0], padding=mod.padding[0],
                     dilation=mod.dilation[0], groups=mod.groups, relu=relu)


def _op_kind(mod):
    t = type(mod).__name__
    if t == "Quantize":
        return "quantize"
    if t in ("QuantizedConv2d", "QuantizedConvReLU2d", "Conv2d", "ConvReLU2d"):
        if mod.groups > 1:
            return "depthwise"
        return "pointwise" if mod.kernel_size == (1, 1) else "conv"
    return {"QuantizedLinear": "linear", "Linear": "linear", "QuantizedHardswish": "hardswish",
            "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid",
            "AdaptiveAvgPool2d": "avgpool"}.get(t)


def op_differences(model, x, engine="qnnpack"):
    """One ``OpRow`` per operation of a converted torch model: our kernel is fed the very
    inputs torch's op received, so each row measures that op alone (no propagated error)."""
    records = []

    def hook(name, kind):
        def save(mod, inputs, out):
            records.append((name, kind, mod, inputs, out))
        return save

    def recording(name, kind, mod):
        f = getattr(mod, kind)                   # FloatFunctional.add / .mul: not a forward

        def wrapped(a, b):
            out = f(a, b)
            records.append((name, kind, mod, (a, b), out))
            return out
        return wrapped

    hooks, patched = [], []
    with quantized_engine(engine) as torch:
        for name, mod in model.named_modules():
            kind = _op_kind(mod)
            if kind is not None:
                hooks.append(mod.register_forward_hook(hook(name, kind)))
            if type(mod).__name__ == "QFunctional":
                for kind in ("add", "mul"):
                    setattr(mod, kind, recording(name, kind, mod))
                    patched.append((mod, kind))
        try:
            with torch.no_grad():
                model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            rows = []
            for name, kind, mod, inputs, out in records:
                ours = _kernel_on(mod, inputs, kind)
                d = np.abs(ours.astype(np.int64) - out.int_repr().numpy().astype(np.int64))
                rows.append(OpRow(name, kind, d.size, int(np.count_nonzero(d)),
                                  int(d.max(initial=0))))
        finally:
            for h in hooks:
                h.remove()
            for mod, kind in patched:
                delattr(mod, kind)               # back to the class's method
    return rows
