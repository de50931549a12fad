"""A per-layer table of a MobileNetV3: output shapes, parameters and multiply-accumulates.

``summary(model, input_size)`` reads everything off the model's module tree (``model.features``,
``model.head``: the node classes of ``npmnv3.layers``) with shape arithmetic; the network is never
run. MACs follow ``torch.utils.flop_counter`` (which reports FLOPs = 2 x MACs) and torchvision's
``_ops`` field: only convolutions and linear layers count, biases, batch norm, activations,
pooling and the residual add do not.

    conv:   MACs = N * Cout * Ho * Wo * (Cin / groups) * kH * kW
    linear: MACs = N * in * out
    SE:     fc1, fc2 are 1x1 convs on the pooled (N, C, 1, 1) tensor, so 2 * N * C * S

Output size of a conv (torch's rule): Ho = floor((H + 2p - d (k - 1) - 1) / s) + 1.
Reference values at 224x224 (torchvision's weights meta, ``num_params`` and ``_ops``): Large
5,483,032 params / 216,589,760 MACs, Small 2,542,856 / 56,510,400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..nn.config import MobileNetV3Config
from ..nn.modules import Classifier, ConvBNAct, InvertedResidual, SqueezeExcite, build_modules

ACT_NAMES = {"relu": "ReLU", "hardswish": "Hardswish", None: ""}


class SummaryRow(NamedTuple):
    """One module: ``depth`` 0 for torchvision's top-level modules (features.i, avgpool,
    classifier), 1 for their children. Totals add up the ``leaf`` rows only."""
    name: str
    kind: str                 # readable description: "Conv 3x3/2, BN, Hardswish"
    output_shape: tuple       # (N, C, H, W) or (N, F)
    params: int
    macs: int
    depth: int
    leaf: bool


def conv_output_size(size: int, k: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1) -> int:
    """torch's Conv2d output length along one axis (floor division)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _conv_row(m: ConvBNAct, shape, depth: int) -> SummaryRow:
    n, c, h, w = shape
    if c != m.cin:
        raise ValueError(f"{m.name}: expects {m.cin} input channels, gets {c}")
    ho = conv_output_size(h, m.k, m.stride, m.padding, m.dilation)
    wo = conv_output_size(w, m.k, m.stride, m.padding, m.dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"{m.name}: input {h}x{w} is too small for a {m.k}x{m.k} conv")
    kind = "DW " if m.kind == "depthwise" else ""
    kind += f"Conv {m.k}x{m.k}" + (f"/{m.stride}" if m.stride > 1 else "")
    kind += f" dil {m.dilation}" if m.dilation > 1 else ""
    kind += ", BN" + (f", {ACT_NAMES[m.act]}" if m.act else "")
    weight = m.cout * (m.cin // m.groups) * m.k * m.k
    params = weight + 2 * m.cout                      # conv weight (no bias) + BN gamma, beta
    macs = n * ho * wo * weight                       # every output element: Cin/g * k * k MACs
    return SummaryRow(m.name, kind, (n, m.cout, ho, wo), params, macs, depth, True)


def _se_row(m: SqueezeExcite, shape, depth: int) -> SummaryRow:
    n, C, S = shape[0], m.channels, m.squeeze
    params = S * C + S + C * S + C                    # fc1 (S, C, 1, 1) + bias, fc2 + bias
    macs = 2 * n * C * S                              # two 1x1 convs at 1x1 spatial size
    return SummaryRow(m.name, f"SE {C}->{S}->{C}, Hardsigmoid", tuple(shape), params, macs,
                      depth, True)


def _block_rows(m: InvertedResidual, shape) -> list[SummaryRow]:
    children, cur = [], shape
    for layer in m.layers:
        row = (_se_row if isinstance(layer, SqueezeExcite) else _conv_row)(layer, cur, 1)
        children.append(row)
        cur = row.output_shape
    kind = "InvertedResidual" + (" + residual" if m.spec.use_residual else "")
    top = SummaryRow(m.name, kind, cur, sum(r.params for r in children),
                     sum(r.macs for r in children), 0, False)
    return [top, *children]


def _head_rows(head: Classifier, shape) -> list[SummaryRow]:
    n, c = shape[:2]
    if c != head.cin:
        raise ValueError(f"classifier expects {head.cin} features, gets {c}")
    fc0 = head.cin * head.hidden
    fc3 = head.hidden * head.num_classes
    children = [
        SummaryRow("classifier.0", f"Linear {head.cin}->{head.hidden}", (n, head.hidden),
                   fc0 + head.hidden, n * fc0, 1, True),
        SummaryRow("classifier.1", "Hardswish", (n, head.hidden), 0, 0, 1, True),
        SummaryRow("classifier.2", f"Dropout p={head.dropout:g}", (n, head.hidden), 0, 0, 1,
                   True),
        SummaryRow("classifier.3", f"Linear {head.hidden}->{head.num_classes}",
                   (n, head.num_classes), fc3 + head.num_classes, n * fc3, 1, True),
    ]
    return [
        SummaryRow("avgpool", "AdaptiveAvgPool2d(1)", (n, c, 1, 1), 0, 0, 0, True),
        SummaryRow("classifier", "Sequential", (n, head.num_classes),
                   sum(r.params for r in children), sum(r.macs for r in children), 0, False),
        *children,
    ]


@dataclass
class Summary:
    """The result of ``summary``: ``rows`` plus totals; ``str()`` renders the table."""
    rows: list[SummaryRow]
    input_shape: tuple
    title: str = "MobileNetV3"
    columns: tuple = field(default=("Layer", "Type", "Output shape", "Params", "MACs"),
                           repr=False)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows if r.leaf)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows if r.leaf)

    def __getitem__(self, name: str) -> SummaryRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def format(self, depth: int = 1) -> str:
        """The table; ``depth=0`` shows only the top-level modules, 1 also their children."""
        shown = [r for r in self.rows if r.depth <= depth]
        cells = [("  " * r.depth + r.name, r.kind, str(list(r.output_shape)),
                  f"{r.params:,}" if r.params else "-", f"{r.macs:,}" if r.macs else "-")
                 for r in shown]
        widths = [max(len(c) for c in col) for col in zip(self.columns, *cells)]
        right = (False, False, False, True, True)

        def line(cs):
            return "  ".join(c.rjust(w) if r else c.ljust(w)
                             for c, w, r in zip(cs, widths, right)).rstrip()

        rule = "-" * len(line(self.columns))
        p, m = self.total_params, self.total_macs
        n, _, h, w = self.input_shape
        return "\n".join([
            f"{self.title}, input {list(self.input_shape)}", rule, line(self.columns), rule,
            *(line(c) for c in cells), rule,
            f"Total params: {p:,} ({p * 4 / 2**20:.2f} MiB as float32)",
            f"Total MACs:   {m:,} ({m / 1e6:.2f} M"
            + (f", {m / n / 1e6:.2f} M per image" if n > 1 else "") + "; conv + linear only, "
            "as torch.utils.flop_counter / 2)",
        ])

    def __str__(self) -> str:
        return self.format()


def summary(model, input_size=(224, 224), batch_size: int = 1) -> Summary:
    """Per-layer output shapes, parameter counts and MACs of ``model`` (a ``MobileNetV3``, or a
    ``MobileNetV3Config``: then no weights are allocated) for an input of ``input_size`` (H, W)
    or an int, from the module tree alone (nothing is run)."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(input_size)
    if len(size) != 2 or min(size) < 1 or batch_size < 1:
        raise ValueError(f"input_size must be (H, W) with H, W >= 1 and batch_size >= 1, got "
                         f"{size} and {batch_size}")
    if isinstance(model, MobileNetV3Config):
        config = model
        features, head = build_modules(config.spec(), config.dropout)
    else:
        config, features, head = model.config, model.features, model.head
    h, w = (int(v) for v in size)
    shape = (batch_size, 3, h, w)
    rows: list[SummaryRow] = []
    cur = shape
    for m in features:
        new = _block_rows(m, cur) if isinstance(m, InvertedResidual) else [_conv_row(m, cur, 0)]
        rows.extend(new)
        cur = new[0].output_shape
    rows.extend(_head_rows(head, cur))
    return Summary(rows, shape, config.describe())
