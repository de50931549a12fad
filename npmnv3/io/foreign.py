"""Checkpoints of other MobileNetV3 implementations, renamed to torchvision's keys.

``to_torchvision(sd, source=None)`` maps a timm, mmpretrain or netspresso-trainer state_dict to
torchvision's names (``features.*``, ``classifier.*``) and returns ``(state_dict, info)``;
``from_torchvision`` goes the other way. Nothing is listed by hand: the maps are derived from
the module tree of ``npmnv3.nn.modules`` (which blocks have an expand conv or SE, how many blocks
there are) by each library's naming rules:

timm (``mobilenetv3_large_100`` / ``mobilenetv3_small_100``, ``timm/models/mobilenetv3.py``)
    stem ``conv_stem``/``bn1`` -> ``features.0.{0,1}``; bottlenecks ``blocks.<stage>.<i>``,
    one stage per run of blocks with equal output channels (timm's arch strings: Large
    [1,2,3,4,2,3], Small [1,2,3,2,3]). A block without an expand conv is timm's
    DepthwiseSeparableConv ``conv_dw, bn1, [se], conv_pw, bn2``; the others are
    InvertedResidual ``conv_pw, bn1, conv_dw, bn2, [se], conv_pwl, bn3``; SE
    ``se.conv_reduce``/``se.conv_expand`` -> ``fc1``/``fc2``. The final 1x1 ConvBnAct is a stage
    of its own, ``blocks.<last>.0.{conv,bn1}`` -> ``features.N.{0,1}``. ``conv_head`` (a 1x1
    conv with bias, applied after pooling) -> ``classifier.0`` with its weight reshaped from
    (O, I, 1, 1) to (O, I); ``classifier`` -> ``classifier.3``.
mmpretrain (``MobileNetV3`` backbone + ``StackedLinearClsHead``)
    ``backbone.layer0.{conv,bn}`` stem; ``backbone.layer<i>`` for bottleneck i (1-based) with
    ``expand_conv``, ``depthwise_conv``, ``se.conv1.conv``/``se.conv2.conv``, ``linear_conv``
    (each ConvModule has ``.conv`` and ``.bn``); ``backbone.layer<N>.{conv,bn}`` final conv
    (layer16 Large, layer12 Small); ``head.layers.0.fc`` / ``head.layers.1.fc`` ->
    ``classifier.0`` / ``classifier.3``. A ``{'meta': ..., 'state_dict': ...}`` wrapper is
    unwrapped.
netspresso-trainer (``mobilenetv3`` backbone + ``fc`` head)
    ``backbone.conv_first.block.{conv,norm}`` stem; bottlenecks
    ``backbone.stages.<s>.<b>.block.<i>`` where ``<i>`` is torchvision's index inside the
    block, conv layers as ``.block.conv``/``.block.norm`` and SE as ``fc1``/``fc2``; the final
    conv is appended to the last stage; ``head.classifier.{0,3}`` -> ``classifier.{0,3}``. The
    shipped configs group the blocks into one stage per output stride from 4 on (Large
    [3,3,6,3], Small [1,2,5,3]); a checkpoint of another grouping of the same blocks maps too
    (its stages are read off its keys).

BatchNorm eps: the weights only make sense with the eps their library trained them with, and
torchvision's model uses 1e-3. ``info["bn_eps"]`` is that eps (``npmnv3.convert`` records it
and ``npmnv3.load_model`` builds the model with it): timm 1e-5 (its non-``tf_`` models;
``tf_mobilenetv3_*`` use 1e-3 *and* TF "SAME" padding, which this model does not implement,
and their keys look the same, so they are not supported), mmpretrain 1e-3, netspresso-trainer
1e-3. Caveat: netspresso-trainer sets eps 1e-3 only since 2024-05-16 (commit 76e817e6,
``init_bn``); checkpoints trained with earlier versions used torch's default 1e-5, which
nothing in the file tells apart: give ``bn_eps=1e-5`` to ``npmnv3.convert`` for those.
"""

from __future__ import annotations

import re

import numpy as np

from ..nn.arch import NetSpec
from ..nn.config import known_variants
from ..nn.modules import (
    ConvBNAct,
    InvertedResidual,
    SqueezeExcite,
    build_modules,
    state_dict_layout,
)
from .statedict import foreign_style, infer_config

SOURCES = ("timm", "mmpretrain", "netspresso-trainer")
BN_EPS = {"torchvision": 1e-3, "timm": 1e-5, "mmpretrain": 1e-3, "netspresso-trainer": 1e-3}
_RESHAPED = {"timm": "classifier.0.weight"}      # torchvision (O, I) <-> timm conv (O, I, 1, 1)
_BLOCK_KEY = {"timm": re.compile(r"blocks\.(\d+)\.(\d+)\."),
              "netspresso-trainer": re.compile(r"backbone\.stages\.(\d+)\.(\d+)\.")}


def _check_source(source) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    return source


def stage_positions(source: str, spec: NetSpec) -> list[tuple[int, int]]:
    """(stage, index) of every bottleneck, then of the final 1x1 conv, in ``source``'s
    grouping (timm and netspresso-trainer number blocks by stage)."""
    blocks = spec.blocks
    if source == "timm":              # a stage per run of equal output channels
        starts = [j == 0 or b.cout != blocks[j - 1].cout for j, b in enumerate(blocks)]
    else:                             # a stage per output stride from 4 on
        first_s2 = next((j for j, b in enumerate(blocks) if b.stride == 2), None)
        starts = [j == 0 or (b.stride == 2 and j != first_s2) for j, b in enumerate(blocks)]
    pos, s, i = [], -1, 0
    for start in starts:
        s, i = (s + 1, 0) if start else (s, i)
        pos.append((s, i))
        i += 1
    return pos + [(s + 1, 0) if source == "timm" else (s, i)]


def _block_roles(m: InvertedResidual) -> list[str]:
    b = m.spec
    return (["expand"] if b.has_expand else []) + ["dw"] + (["se"] if b.se else []) + ["project"]


def _layer_names(source: str, m: InvertedResidual, where: str) -> list[tuple[str, str]]:
    """(torchvision module, foreign module) for the convs, BNs and SE fcs of one block."""
    out = []
    ds = not m.spec.has_expand                  # timm's DepthwiseSeparableConv
    timm = {"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn1" if ds else "bn2"),
            "project": ("conv_pw", "bn2") if ds else ("conv_pwl", "bn3"),
            "se": ("se.conv_reduce", "se.conv_expand")}
    mm = {role: (f"{name}.conv", f"{name}.bn") for role, name in            # ConvModule
          (("expand", "expand_conv"), ("dw", "depthwise_conv"), ("project", "linear_conv"))}
    mm["se"] = ("se.conv1.conv", "se.conv2.conv")
    for i, (role, layer) in enumerate(zip(_block_roles(m), m.layers)):
        if source == "netspresso-trainer":
            a, b = ((f"block.{i}.fc1", f"block.{i}.fc2") if role == "se" else
                    (f"block.{i}.block.conv", f"block.{i}.block.norm"))
        else:
            a, b = (timm if source == "timm" else mm)[role]
        if isinstance(layer, SqueezeExcite):
            out += [(f"{layer.name}.fc1", f"{where}.{a}"), (f"{layer.name}.fc2", f"{where}.{b}")]
        else:
            out += [(f"{layer.name}.0", f"{where}.{a}"), (f"{layer.name}.1", f"{where}.{b}")]
    return out


def module_map(source: str, spec: NetSpec, positions=None) -> dict[str, str]:
    """torchvision module name -> ``source``'s, for every module that holds tensors.
    ``positions``: (stage, index) of each block and the final conv (default: the rule of
    ``stage_positions``)."""
    _check_source(source)
    feats, _ = build_modules(spec)
    pos = stage_positions(source, spec) if positions is None else list(positions)
    if len(pos) != len(feats) - 1:
        raise ValueError(f"{len(pos)} block positions for {len(feats) - 1} blocks")
    stem, final = feats[0], feats[-1]
    assert isinstance(stem, ConvBNAct) and isinstance(final, ConvBNAct)
    n = len(feats) - 1
    if source == "timm":
        out = {"features.0.0": "conv_stem", "features.0.1": "bn1"}
        where = [f"blocks.{s}.{i}" for s, i in pos]
        final_names = (f"{where[-1]}.conv", f"{where[-1]}.bn1")
        head = ("conv_head", "classifier")
    elif source == "mmpretrain":
        out = {"features.0.0": "backbone.layer0.conv", "features.0.1": "backbone.layer0.bn"}
        where = [f"backbone.layer{j}" for j in range(1, n + 1)]
        final_names = (f"{where[-1]}.conv", f"{where[-1]}.bn")
        head = ("head.layers.0.fc", "head.layers.1.fc")
    else:
        out = {"features.0.0": "backbone.conv_first.block.conv",
               "features.0.1": "backbone.conv_first.block.norm"}
        where = [f"backbone.stages.{s}.{i}" for s, i in pos]
        final_names = (f"{where[-1]}.block.conv", f"{where[-1]}.block.norm")
        head = ("head.classifier.0", "head.classifier.3")
    for m, w in zip(feats[1:-1], where):
        out.update(_layer_names(source, m, w))
    out[f"{final.name}.0"], out[f"{final.name}.1"] = final_names
    out["classifier.0"], out["classifier.3"] = head
    return out


def key_map(source: str, spec: NetSpec, positions=None) -> dict[str, str]:
    """torchvision state_dict key -> ``source``'s key, in torchvision's order."""
    mods = module_map(source, spec, positions)
    out = {}
    for key, _, _ in state_dict_layout(*build_modules(spec)):
        mod, leaf = key.rsplit(".", 1)
        out[key] = f"{mods[mod]}.{leaf}"
    return out


def _unwrap(sd):
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]                          # mmengine: {'meta', 'state_dict', ...}
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict of arrays, got {type(sd).__name__}")
    return sd


def _candidate_specs():
    """Specs of every torchvision builder variant (the keys depend on which blocks have an
    expand conv or SE and on the block count; widths can change the former)."""
    for config in known_variants():
        yield config.spec()


def _positions_from_keys(source, keys, n):
    pattern = _BLOCK_KEY.get(source)
    if pattern is None:
        return None
    found = sorted({(int(a), int(b)) for k in keys if (m := pattern.match(k))
                    for a, b in [m.groups()]})
    return found if len(found) == n else None


def _needed(keys):
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def _fmt(keys, limit=10):
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _find_map(source, sd_keys):
    """The key map (torchvision -> foreign) whose keys ``sd_keys`` are, or raise naming what
    did not map (for the closest variant)."""
    have = set(sd_keys)
    best, seen = None, set()
    for spec in _candidate_specs():
        for pos in (_positions_from_keys(source, have, len(spec.blocks) + 1), None):
            kmap = key_map(source, spec, pos)
            sig = tuple(kmap.values())
            if sig in seen:
                continue
            seen.add(sig)
            want = set(kmap.values())
            if _needed(want) <= have <= want:
                return kmap
            score = len(have & want) - len(have - want) - len(_needed(want) - have)
            if best is None or score > best[0]:
                best = (score, kmap, want)
    _, kmap, want = best
    unmapped = [k for k in sd_keys if k not in want]
    missing = [k for k in kmap.values() if k in _needed(want) and k not in have]
    lines = [f"not a complete {source} MobileNetV3 checkpoint (closest: {len(have & want)} of "
             f"its {len(have)} keys map)"]
    if unmapped:
        lines.append(f"keys that did not map ({len(unmapped)}): {_fmt(unmapped)}")
    if missing:
        lines.append(f"keys missing ({len(missing)}): {_fmt(missing)}")
    raise ValueError("\n".join(lines))


def to_torchvision(sd: dict, source: str | None = None) -> tuple[dict, dict]:
    """``(state_dict with torchvision's keys, info)`` for a timm, mmpretrain or
    netspresso-trainer MobileNetV3 state_dict (arrays; torch tensors are converted).

    ``source``: "timm" | "mmpretrain" | "netspresso-trainer", or None to recognise it from the
    keys (``statedict.foreign_style``). ``info``: ``source``, ``bn_eps`` (the BatchNorm eps
    that library uses; see the module docstring for the netspresso-trainer caveat),
    ``tensors`` (how many were mapped) and ``config`` (the ``MobileNetV3Config`` the mapped
    shapes match, or None). Keys come out in torchvision's order; a missing
    ``num_batches_tracked`` stays missing. Raises ``ValueError`` if the keys are not in a known
    style, or if any key does not map or any expected key is missing (naming them).
    """
    sd = _unwrap(sd)
    if source is None:
        source = foreign_style(sd)
        if source is None:
            raise ValueError(f"the keys ({_fmt(list(sd), 4)}) are in no known style; expected "
                             f"one of {list(SOURCES)}")
    _check_source(source)
    kmap = _find_map(source, list(sd))
    out = {}
    for tv, fk in kmap.items():
        if fk not in sd:
            continue                                    # an optional num_batches_tracked
        v = sd[fk]
        v = v if isinstance(v, np.ndarray) else np.asarray(v.detach().cpu().numpy()
                                                            if hasattr(v, "detach") else v)
        if _RESHAPED.get(source) == tv:
            if v.ndim != 4 or v.shape[2:] != (1, 1):
                raise ValueError(f"{fk}: expected a 1x1 conv weight (O, I, 1, 1), got "
                                 f"{tuple(v.shape)}")
            v = v.reshape(v.shape[:2])
        out[tv] = v
    info = {"source": source, "bn_eps": BN_EPS[source], "tensors": len(out),
            "config": infer_config(out)}
    return out, info


def from_torchvision(sd: dict, source: str, spec: NetSpec | None = None) -> dict:
    """A torchvision state_dict renamed (and reshaped) to ``source``'s keys: the inverse of
    ``to_torchvision``. ``spec`` defaults to the builder variant the shapes match."""
    _check_source(source)
    if spec is None:
        found = infer_config(sd)
        if found is None:
            raise ValueError("the state_dict matches no torchvision MobileNetV3 layout")
        spec = found.spec()
    kmap = key_map(source, spec)
    out = {}
    for tv, fk in kmap.items():
        if tv in sd:
            v = sd[tv]
            out[fk] = v.reshape(*v.shape, 1, 1) if _RESHAPED.get(source) == tv else v
    return out
