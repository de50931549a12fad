"""Which MobileNetV3: one description of a network, in torchvision's builder arguments.

``MobileNetV3Config`` holds exactly the arguments of torchvision's ``mobilenet_v3_large`` /
``mobilenet_v3_small`` (``width_mult``, ``reduced_tail``, ``dilated``, ``num_classes``,
``dropout``; torchvision ``models/mobilenetv3.py``, ``_mobilenet_v3_conf``), or, for a network
described in the netspresso-trainer ``stage_params`` format, its bottleneck rows. Everything
else is derived from it: the ``NetSpec`` of ``arch.py`` (``spec()``), the module tree and
state_dict layout of ``modules.py`` (``layout()``), the one-line description used in every
message (``describe()``), and the JSON stored in ``.npz`` files (``to_dict`` / ``from_dict``).
``known_variants`` lists the configurations a checkpoint is matched against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .arch import PRESETS, Bneck, NetSpec, build_spec
from .modules import build_modules, state_dict_layout

ARCHS = ("large", "small")
# The width multipliers a checkpoint's shapes are matched against (the ones timm, TF-slim and
# torchvision's tests use); any positive width builds.
KNOWN_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_DROPOUT = 0.2          # torchvision: mobilenet_v3_large(dropout=0.2)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MobileNetV3Config:
    """torchvision's builder arguments (``arch`` "large" | "small"), or ``arch="custom"`` with the
    bottleneck ``rows`` and ``last_channel`` of a stage_params description."""

    arch: str = "large"
    width_mult: float = 1.0
    reduced_tail: bool = False
    dilated: bool = False
    num_classes: int = 1000
    dropout: float = DEFAULT_DROPOUT
    rows: tuple[Bneck, ...] | None = None     # arch "custom" only: the paper-table rows
    last_channel: int | None = None           # arch "custom" only: classifier hidden width

    def __post_init__(self):
        if self.arch not in (*ARCHS, "custom"):
            raise ValueError(f"arch must be 'large', 'small' or 'custom', got {self.arch!r}")
        w = self.width_mult
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"width_mult must be a positive number, got {w!r}")
        object.__setattr__(self, "width_mult", float(w))
        for k in ("reduced_tail", "dilated"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be true or false, got {getattr(self, k)!r}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {d!r}")
        object.__setattr__(self, "dropout", float(d))
        if self.arch == "custom":
            if not self.rows or not _is_int(self.last_channel) or self.last_channel < 1:
                raise ValueError("a custom MobileNetV3 needs its bottleneck rows and a positive "
                                 "last_channel")
            object.__setattr__(self, "rows", tuple(Bneck(*r) for r in self.rows))
        elif self.rows is not None or self.last_channel is not None:
            raise ValueError(f"rows and last_channel describe arch 'custom', not {self.arch!r}")

    # ------------------------------------------------------------------ derived

    def spec(self) -> NetSpec:
        """The widths, blocks and head sizes this configuration builds (``arch.build_spec``)."""
        if self.arch == "custom":
            return build_spec(self.rows, self.last_channel, dilated=self.dilated,
                              num_classes=self.num_classes)
        rows, last = PRESETS[self.arch]
        return build_spec(rows, last, width_mult=self.width_mult,
                          reduced_tail=self.reduced_tail, dilated=self.dilated,
                          num_classes=self.num_classes)

    def layout(self):
        """[(state_dict key, shape, "param" | "buffer")] in torchvision's order."""
        return state_dict_layout(*build_modules(self.spec(), self.dropout))

    def describe(self) -> str:
        """The builder call that makes this network, e.g. ``mobilenet_v3_small(width_mult=0.5,
        num_classes=3)``; only arguments that differ from torchvision's defaults are shown."""
        if self.arch == "custom":
            args = [f"{len(self.rows)} bottlenecks", f"last_channel={self.last_channel}"]
        else:
            args = [f"width_mult={self.width_mult:g}"] if self.width_mult != 1.0 else []
        args += [f"{k}=True" for k in ("reduced_tail", "dilated") if getattr(self, k)]
        if self.num_classes != 1000:
            args.append(f"num_classes={self.num_classes}")
        if self.dropout != DEFAULT_DROPOUT:
            args.append(f"dropout={self.dropout:g}")
        name = "MobileNetV3 from stage_params" if self.arch == "custom" else \
            f"mobilenet_v3_{self.arch}"
        return f"{name}({', '.join(args)})"

    def replace(self, **changes) -> MobileNetV3Config:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        """The JSON form stored in .npz metadata (``from_dict`` reads it back)."""
        d = dataclasses.asdict(self)
        if self.arch == "custom":
            d["rows"] = [list(r) for r in self.rows]
        else:
            del d["rows"], d["last_channel"]
        return d

    @classmethod
    def from_dict(cls, d, where: str = "model") -> MobileNetV3Config:
        """Validate a dict of builder arguments (missing keys take the defaults)."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a dict of builder arguments, got "
                             f"{type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"{where}: unknown builder argument(s) {sorted(unknown)}; expected "
                             f"{sorted(fields)}")
        try:
            return cls(**{k: v for k, v in d.items() if v is not None})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


def known_variants(num_classes: int = 1000):
    """Every (arch, width in ``KNOWN_WIDTHS``, reduced_tail) configuration with ``num_classes``
    outputs: what a checkpoint of unknown architecture is matched against."""
    for arch in ARCHS:
        for width in KNOWN_WIDTHS:
            for reduced in (False, True):
                yield MobileNetV3Config(arch, width, reduced, num_classes=num_classes)
