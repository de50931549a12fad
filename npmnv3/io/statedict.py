"""Checking a state_dict against a model's layout, and recognising what a checkpoint is.

``check_state_dict`` collects every missing key, unexpected key and shape mismatch into one
error, and adds a hint when the checkpoint looks like another variant (Small vs Large, another
width, reduced tail, 1001 classes) or another library's key style (timm, mmpretrain,
netspresso-trainer). ``infer_config`` finds the torchvision builder arguments whose layout matches
a checkpoint exactly.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..nn.config import MobileNetV3Config, known_variants
from .pth import is_quantized_state_dict

QUANTIZED_HINT = ("a quantized (int8) checkpoint, not a float one: load it into "
                  "npmnv3.quantized_mobilenet_v3_large() (npmnv3 classify --quantized)")
QAT_HINT = ("a quantization-aware-training (QAT) checkpoint, like torchvision's published int8 "
            "weights, not a float one: convert it with npmnv3.nn.qat.from_qat_state_dict "
            "(npmnv3 classify --quantized)")


def int8_hint(sd: dict) -> str | None:
    """What to say when ``sd`` is an int8 checkpoint given to the float model, else None."""
    if is_quantized_state_dict(sd):
        return QUANTIZED_HINT
    if any(k.endswith("weight_fake_quant.observer_enabled") for k in sd):
        return QAT_HINT
    return None

FOREIGN_STYLES = {                         # a key prefix that gives each library away
    "timm": ("conv_stem.", "blocks.", "conv_head."),
    "mmpretrain": ("backbone.layer", "head.layers."),
    "netspresso-trainer": ("backbone.conv_first.", "backbone.stages."),
}


@lru_cache(maxsize=64)
def _shapes(config: MobileNetV3Config) -> dict:
    """{key: shape} of a configuration's state_dict, without num_batches_tracked."""
    return {k: tuple(s) for k, s, _ in config.layout() if not k.endswith("num_batches_tracked")}


def foreign_style(keys) -> str | None:
    """The library whose key prefixes most of ``keys`` (more than half) carry, or None."""
    keys = list(keys)
    for name, prefixes in FOREIGN_STYLES.items():
        if keys and 2 * sum(k.startswith(prefixes) for k in keys) > len(keys):
            return name
    return None


def infer_config(sd: dict) -> MobileNetV3Config | None:
    """The torchvision variant (``known_variants``: arch, width, reduced_tail, num_classes)
    whose state_dict layout has exactly the keys and shapes of ``sd``, or None."""
    w = sd.get("classifier.3.weight")
    if w is None or np.ndim(w) != 2:
        return None
    shapes = {k: tuple(np.shape(v)) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for config in known_variants(int(np.shape(w)[0])):
        if _shapes(config) == shapes:
            return config
    return None


def _hint(sd: dict) -> str:
    style = foreign_style(sd)
    if style:
        return (f"hint: the keys look like a {style} checkpoint; convert it to torchvision's "
                f"names first (npmnv3 convert --from {style})")
    found = infer_config(sd)
    if found:
        return f"hint: this checkpoint matches {found.describe()}"
    w = sd.get("classifier.3.weight")
    if w is not None and np.ndim(w) == 2 and np.shape(w)[0] == 1001:
        return ("hint: 1001 classes: a TF-style checkpoint with a background class; build the "
                "model with num_classes=1001")
    return ""


def check_state_dict(sd: dict, layout, *, strict: bool = True,
                     config: MobileNetV3Config | None = None) -> dict:
    """Compare ``sd`` with ``layout`` [(key, shape, kind)]; raise one ValueError listing every
    problem (missing keys, unexpected keys, shape mismatches) when there are any."""
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict of arrays, got {type(sd).__name__}")
    if int8_hint(sd):
        raise ValueError(int8_hint(sd))
    want = {k: tuple(s) for k, s, _ in layout}
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in want]
    problems = []
    for k, s in want.items():
        if k in sd:
            try:
                v = np.asarray(sd[k])
            except Exception:                               # noqa: BLE001 - reported below
                problems.append(f"  {k}: not an array ({type(sd[k]).__name__})")
                continue
            if v.dtype.kind not in "fiub":
                problems.append(f"  {k}: dtype {v.dtype} is not numeric")
            elif tuple(v.shape) != s and not (k.endswith("num_batches_tracked") and v.size == 1):
                problems.append(f"  {k}: checkpoint {tuple(v.shape)} vs model {s}")
            elif v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                problems.append(f"  {k}: contains NaN or infinity")
    if problems or (strict and (missing or unexpected)):
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8])
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8])
                         + (" ..." if len(unexpected) > 8 else ""))
        if problems:
            lines.append(f"shape/dtype mismatches ({len(problems)}):")
            lines.extend(problems[:12] + (["  ..."] if len(problems) > 12 else []))
        model = config.describe() if config is not None else "this model"
        hint = _hint(sd)
        raise ValueError(f"state_dict does not fit {model}:\n" + "\n".join(lines)
                         + (f"\n{hint}" if hint else ""))
    return {"missing": missing, "unexpected": unexpected}


def assign_state_dict(sd: dict, layout, params: dict, buffers: dict, dtype) -> None:
    """Copy the entries of a checked ``sd`` into ``params`` / ``buffers`` by ``layout``
    [(key, shape, kind)], cast to ``dtype``; ``num_batches_tracked`` stays int64 (0 if absent,
    as older checkpoints have none). Call ``check_state_dict`` first."""
    for key, _, kind in layout:
        if key not in sd:
            if key.endswith("num_batches_tracked"):
                buffers[key] = np.array(0, dtype=np.int64)
            continue
        v = np.asarray(sd[key])
        if key.endswith("num_batches_tracked"):
            buffers[key] = np.array(int(v.reshape(-1)[0]), dtype=np.int64)
        elif kind == "buffer":
            buffers[key] = np.array(v, dtype=dtype)
        else:
            params[key] = np.array(v, dtype=dtype)
