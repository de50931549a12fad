"""MobileNetV3 as data: the paper's tables, torchvision's derived rules, user-defined configs.

Large and Small are the rows of Tables 1 and 2 of arXiv:1905.02244 as torchvision 0.29 encodes
them (``torchvision/models/mobilenetv3.py``). Everything else is derived here, once, and used by
the model, the converter and the summary alike:

* ``make_divisible``: channel rounding (torchvision ``_make_divisible``, from TF slim);
* width multiplier: every table channel count is rounded with ``make_divisible(c * w, 8)``;
* no expand conv when expanded == input channels (so torchvision's block indices shift);
* residual when the configured stride is 1 and input == output channels;
* SE squeeze width ``make_divisible(expanded // 4, 8)``;
* ``dilated``: the last stage uses dilation 2 and its stride-2 conv runs with stride 1;
* ``reduced_tail``: the last stage's channels and the classifier width are halved.

A network can also be described in the netspresso-trainer ``stage_params`` format (YAML or
JSON); ``stage_params_rows`` validates it and produces the same ``Bneck`` rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

ACTIVATIONS = {"RE": "relu", "HS": "hardswish"}      # paper's NL column -> kernel name


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never going down by more than 10 %."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Bneck(NamedTuple):
    """One bottleneck row of the paper's tables (channels before width scaling)."""
    cin: int        # input channels
    k: int          # depthwise kernel size
    exp: int        # expanded channels
    cout: int       # output channels
    se: bool        # squeeze-and-excitation
    act: str        # "RE" (ReLU) or "HS" (hard-swish)
    s: int          # stride
    d: int = 1      # dilation


#        in  k  exp  out   se     act   s                       output at 224
LARGE = (Bneck(16, 3, 16, 16, False, "RE", 1),                # 112
         Bneck(16, 3, 64, 24, False, "RE", 2),                # 112 -> 56  (C1)
         Bneck(24, 3, 72, 24, False, "RE", 1),
         Bneck(24, 5, 72, 40, True, "RE", 2),                 # 56 -> 28  (C2)
         Bneck(40, 5, 120, 40, True, "RE", 1),
         Bneck(40, 5, 120, 40, True, "RE", 1),
         Bneck(40, 3, 240, 80, False, "HS", 2),               # 28 -> 14  (C3)
         Bneck(80, 3, 200, 80, False, "HS", 1),
         Bneck(80, 3, 184, 80, False, "HS", 1),
         Bneck(80, 3, 184, 80, False, "HS", 1),
         Bneck(80, 3, 480, 112, True, "HS", 1),
         Bneck(112, 3, 672, 112, True, "HS", 1),
         Bneck(112, 5, 672, 160, True, "HS", 2),              # 14 -> 7   (C4)
         Bneck(160, 5, 960, 160, True, "HS", 1),
         Bneck(160, 5, 960, 160, True, "HS", 1))
LARGE_LAST_CHANNEL = 1280

SMALL = (Bneck(16, 3, 16, 16, True, "RE", 2),                 # 112 -> 56 (C1)
         Bneck(16, 3, 72, 24, False, "RE", 2),                # 56 -> 28  (C2)
         Bneck(24, 3, 88, 24, False, "RE", 1),
         Bneck(24, 5, 96, 40, True, "HS", 2),                 # 28 -> 14  (C3)
         Bneck(40, 5, 240, 40, True, "HS", 1),
         Bneck(40, 5, 240, 40, True, "HS", 1),
         Bneck(40, 5, 120, 48, True, "HS", 1),
         Bneck(48, 5, 144, 48, True, "HS", 1),
         Bneck(48, 5, 288, 96, True, "HS", 2),                # 14 -> 7   (C4)
         Bneck(96, 5, 576, 96, True, "HS", 1),
         Bneck(96, 5, 576, 96, True, "HS", 1))
SMALL_LAST_CHANNEL = 1024

PRESETS = {"large": (LARGE, LARGE_LAST_CHANNEL), "small": (SMALL, SMALL_LAST_CHANNEL)}
TAIL = 3   # reduced_tail / dilated act on the last three rows (the C4 stage)


@dataclass(frozen=True)
class BlockSpec:
    """A bottleneck after width scaling, with every derived fact the model needs."""
    cin: int
    k: int
    exp: int
    cout: int
    se: bool
    act: str            # kernel name: "relu" or "hardswish"
    stride: int         # configured stride (decides the residual rule, _is_cn)
    dilation: int

    @property
    def has_expand(self) -> bool:         # torchvision: no expand conv when exp == in
        return self.exp != self.cin

    @property
    def use_residual(self) -> bool:       # torchvision: stride == 1 and in == out
        return self.stride == 1 and self.cin == self.cout

    @property
    def dw_stride(self) -> int:           # dilation replaces the stride
        return 1 if self.dilation > 1 else self.stride

    @property
    def padding(self) -> int:             # ConvNormActivation: (k - 1) // 2 * dilation
        return (self.k - 1) // 2 * self.dilation

    @property
    def se_channels(self) -> int:         # SqueezeExcitation width: _make_divisible(exp // 4, 8)
        return make_divisible(self.exp // 4, 8)


@dataclass(frozen=True)
class NetSpec:
    """A whole network: stem width, blocks, head and classifier sizes."""
    blocks: tuple[BlockSpec, ...]
    last_channel: int            # classifier hidden width (1280 Large, 1024 Small)
    num_classes: int = 1000

    @property
    def stem_channels(self) -> int:
        return self.blocks[0].cin

    @property
    def head_channels(self) -> int:       # 6 x the last block's (already scaled) width
        return 6 * self.blocks[-1].cout


def build_spec(rows, last_channel: int, *, width_mult: float = 1.0, reduced_tail: bool = False,
               dilated: bool = False, num_classes: int = 1000) -> NetSpec:
    """Apply torchvision's rules to table rows: reduced tail, dilation, width scaling."""
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    r = 2 if reduced_tail else 1
    n = len(rows)

    def scale(c):
        return make_divisible(c * width_mult, 8)

    blocks = []
    for i, row in enumerate(rows):
        tail = i >= n - TAIL
        cin, exp, cout = row.cin, row.exp, row.cout
        if tail:                           # torchvision halves these literals before scaling:
            cout //= r                     # every tail output, and the input/expansion of the
            if i > n - TAIL:               # tail rows after the first
                cin, exp = cin // r, exp // r
        d = 2 if (tail and dilated) else row.d
        blocks.append(BlockSpec(scale(cin), row.k, scale(exp), scale(cout), bool(row.se),
                                ACTIVATIONS[row.act], row.s, d))
    return NetSpec(tuple(blocks), scale(last_channel // r), num_classes)


def preset_spec(arch: str, **kwargs) -> NetSpec:
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(PRESETS)}")
    rows, last = PRESETS[arch]
    return build_spec(rows, last, **kwargs)


# ----------------------------------------------------------------------------- stage_params

STAGE_FIELDS = ("in_channels", "kernel_sizes", "expanded_channels", "out_channels", "use_se",
                "act_type", "stride")
ACT_TYPES = {"relu": "RE", "hard_swish": "HS"}


def _check_stage(i: int, stage: dict) -> int:
    if not isinstance(stage, dict):
        raise ValueError(f"stage_params[{i}] must be a mapping of field lists, got "
                         f"{type(stage).__name__}")
    unknown = set(stage) - set(STAGE_FIELDS) - {"dilation"}
    if unknown:
        raise ValueError(f"stage_params[{i}]: unknown field(s) {sorted(unknown)}; expected "
                         f"{list(STAGE_FIELDS)} and optionally 'dilation'")
    for f in STAGE_FIELDS:
        if f not in stage:
            raise ValueError(f"stage_params[{i}] is missing the field {f!r}")
        if not isinstance(stage[f], (list, tuple)) or not stage[f]:
            raise ValueError(f"stage_params[{i}].{f} must be a non-empty list, got {stage[f]!r}")
    lengths = {f: len(stage[f]) for f in STAGE_FIELDS + (("dilation",) if "dilation" in stage
                                                          else ())}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"stage_params[{i}]: field lists have different lengths {lengths}")
    return next(iter(lengths.values()))


def stage_params_rows(stage_params) -> tuple[Bneck, ...]:
    """The ``Bneck`` rows of netspresso-trainer style ``stage_params`` (a list of stages, each a
    dict of parallel lists), validated; channels are used as given (no width multiplier)."""
    if not isinstance(stage_params, (list, tuple)) or not stage_params:
        raise ValueError("stage_params must be a non-empty list of stages")
    rows = []
    prev_out = None
    for i, stage in enumerate(stage_params):
        n = _check_stage(i, stage)
        for j in range(n):
            where = f"stage_params[{i}] block {j}"
            vals = {f: stage[f][j] for f in STAGE_FIELDS}
            d = stage.get("dilation", [1] * n)[j]
            for f in ("in_channels", "kernel_sizes", "expanded_channels", "out_channels",
                      "stride"):
                if isinstance(vals[f], bool) or not isinstance(vals[f], int) or vals[f] < 1:
                    raise ValueError(f"{where}: {f} must be a positive integer, got {vals[f]!r}")
            if vals["kernel_sizes"] % 2 == 0:
                raise ValueError(f"{where}: kernel_sizes must be odd, got {vals['kernel_sizes']}")
            if vals["stride"] not in (1, 2):
                raise ValueError(f"{where}: stride must be 1 or 2 (torchvision's InvertedResidual"
                                 f" rule), got {vals['stride']}")
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"{where}: dilation must be a positive integer, got {d!r}")
            if not isinstance(vals["use_se"], bool):
                raise ValueError(f"{where}: use_se must be true or false, got {vals['use_se']!r}")
            if vals["act_type"] not in ACT_TYPES:
                raise ValueError(f"{where}: unknown act_type {vals['act_type']!r}; expected one "
                                 f"of {sorted(ACT_TYPES)}")
            if prev_out is not None and vals["in_channels"] != prev_out:
                raise ValueError(f"{where}: in_channels {vals['in_channels']} does not chain: "
                                 f"the previous block outputs {prev_out} channels")
            prev_out = vals["out_channels"]
            rows.append(Bneck(vals["in_channels"], vals["kernel_sizes"],
                              vals["expanded_channels"], vals["out_channels"], vals["use_se"],
                              ACT_TYPES[vals["act_type"]], vals["stride"], d))
    return tuple(rows)


def load_stage_params(path) -> tuple[list, int | None]:
    """Read ``stage_params`` (and ``last_channel`` if present) from a YAML or JSON file.

    Accepts the bare list, ``{stage_params: [...]}``, or netspresso-trainer's model config
    (``model.architecture.backbone.params.stage_params``, last channel from
    ``model.architecture.head.params.intermediate_channels``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else \
            f"line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else "syntax"
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}"
                         f" ({where}: {getattr(e, 'problem', None) or getattr(e, 'msg', e)})") \
            from None
    last = None
    if isinstance(data, dict) and "model" in data:      # netspresso-trainer model config
        arch = data["model"].get("architecture", {})
        data = arch.get("backbone", {}).get("params", {})
        head = arch.get("head", {}).get("params", {})
        last = head.get("intermediate_channels")
    if isinstance(data, dict):
        last = data.get("last_channel", last)
        data = data.get("stage_params")
    if data is None:
        raise ValueError(f"{path}: no stage_params found")
    return data, last
