"""``summary`` of the segmentation models: output shapes, parameters and MACs per module.

The backbone's rows are ``summary.py``'s (the dilated MobileNetV3-Large's modules, named
``backbone.i``); the heads' follow their modules (``nn/seg_heads.py``). MACs count convolutions
only, as ``torch.utils.flop_counter`` does (FLOPs / 2): not batch norm, activations, pooling,
the gate's product, the concatenation or the bilinear upsamplings. A conv's MACs are
N * Cout * Ho * Wo * Cin * k * k; its bias adds parameters, not MACs.
"""

from __future__ import annotations

from ..nn.modules import InvertedResidual
from ..nn.seg_heads import Conv, ConvBNReLU, DeepLabHead, FCNHead, LRASPPHead
from .summary import Summary, SummaryRow, _block_rows, _conv_row, conv_output_size


def _conv(name, c: Conv, shape, kind_extra="", bn=False, depth=1):
    """One row for a conv (+ BN + ReLU when ``bn``) on an input of ``shape``."""
    n, cin, h, w = shape
    if cin != c.cin:
        raise ValueError(f"{c.name}: expects {c.cin} input channels, gets {cin}")
    ho = conv_output_size(h, c.k, 1, c.padding, c.dilation)
    wo = conv_output_size(w, c.k, 1, c.padding, c.dilation)
    weight = c.cout * c.cin * c.k * c.k
    params = weight + (c.cout if c.bias else 0) + (2 * c.cout if bn else 0)
    kind = f"Conv {c.k}x{c.k}" + (f" dil {c.dilation}" if c.dilation > 1 else "")
    kind += (" + bias" if c.bias else "") + (", BN, ReLU" if bn else "") + kind_extra
    return SummaryRow(name, kind, (n, c.cout, ho, wo), params, n * ho * wo * weight, depth, True)


def _cbr(name, m: ConvBNReLU, shape, kind_extra=""):
    return _conv(name, m.conv, shape, kind_extra, bn=True)


def _group(name, kind, children, shape=None, depth=0):
    out = shape or children[-1].output_shape
    return [SummaryRow(name, kind, out, sum(r.params for r in children),
                       sum(r.macs for r in children), depth, False), *children]


def _lraspp_rows(h: LRASPPHead, low, high):
    n, _, hl, wl = low
    rows = [_cbr(f"{h.name}.cbr", h.cbr, high),
            _conv(f"{h.name}.scale", h.scale_conv, high[:2] + (1, 1),
                  ", AdaptiveAvgPool2d(1) first, Sigmoid"),
            _conv(f"{h.name}.low_classifier", h.low_classifier, low)]
    up = (n, h.inter_channels, hl, wl)                 # cbr * scale, upsampled to low's size
    rows.append(_conv(f"{h.name}.high_classifier", h.high_classifier, up,
                      ", on the gated cbr upsampled to the low-level size"))
    return _group(h.name, "LRASPPHead", rows)


def _deeplab_rows(h: DeepLabHead, high):
    a = f"{h.name}.0"
    branches = [_cbr(f"{a}.convs.{i}", b, high) for i, b in enumerate(h.branches)]
    pooled = _cbr(h.pool_name, h.pool_branch, high[:2] + (1, 1),
                  ", AdaptiveAvgPool2d(1) first, upsampled after")
    branches.append(pooled._replace(output_shape=branches[0].output_shape))
    n, C, hh, wh = branches[0].output_shape
    project = _cbr(f"{a}.project", h.project, (n, C * len(branches), hh, wh),
                   f", Dropout p={h.dropout:g}; on the {len(branches)} branches concatenated")
    aspp = _group(a, "ASPP", branches + [project], depth=1)
    tail = _cbr(f"{h.name}.1", h.tail, project.output_shape, " (classifier.1-3)")
    final = _conv(f"{h.name}.4", h.final, tail.output_shape)
    rows = [*aspp[:1], *[r._replace(depth=2) for r in aspp[1:]], tail, final]
    top = SummaryRow(h.name, "DeepLabHead", final.output_shape,
                     sum(r.params for r in rows if r.leaf), sum(r.macs for r in rows if r.leaf),
                     0, False)
    return [top, *rows]


def _fcn_rows(h: FCNHead, low):
    cbr = _cbr(f"{h.name}.0", h.cbr, low, f" (0-2), Dropout p={h.dropout:g}")
    return _group(h.name, "FCNHead", [cbr, _conv(f"{h.name}.4", h.final, cbr.output_shape)])


def _upsample(name, src_shape, size):
    return SummaryRow(name, "bilinear upsampling (align_corners=False)",
                      src_shape[:2] + tuple(size), 0, 0, 0, True)


def segmentation_summary(model, input_size=(520, 520), batch_size: int = 1) -> Summary:
    """The table for a ``SegmentationModel`` (or ``"lraspp"`` / ``"deeplabv3"``: built with
    random weights, the DeepLabV3 one with its aux classifier as the official checkpoint)."""
    from ..nn.segmentation import SegmentationModel

    if isinstance(model, str):
        model = SegmentationModel(model, aux_loss=model == "deeplabv3")
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if len(input_size) != 2 or min(input_size) < 1 or batch_size < 1:
        raise ValueError(f"input_size must be (H, W) with H, W >= 1 and batch_size >= 1, got "
                         f"{tuple(input_size)} and {batch_size}")
    size = tuple(int(v) for v in input_size)
    cur = (batch_size, 3) + size
    rows, outs = [], []
    for m in model.backbone:
        new = _block_rows(m, cur) if isinstance(m, InvertedResidual) else [_conv_row(m, cur, 0)]
        rows.extend(new)
        cur = new[0].output_shape
        outs.append(cur)
    low, high = outs[model.low_pos], outs[model.high_pos]
    if model.kind == "lraspp":
        head = _lraspp_rows(model.head, low, high)
    else:
        head = _deeplab_rows(model.head, high)
    rows += head + [_upsample("out", head[0].output_shape, size)]
    if model.aux_head is not None:
        aux = _fcn_rows(model.aux_head, low)
        rows += aux + [_upsample("aux", aux[0].output_shape, size)]
    builder = {"lraspp": "lraspp_mobilenet_v3_large", "deeplabv3": "deeplabv3_mobilenet_v3_large"}
    args = [f"num_classes={model.num_classes}"] + (["aux_loss=True"] if model.aux_loss else [])
    return Summary(rows, (batch_size, 3) + size, f"{builder[model.kind]}({', '.join(args)})")
