"""The network's modules as data: a tree with torchvision's module names and parameter keys.

``build_modules(spec)`` turns a ``NetSpec`` into the list of torchvision's top-level modules
(``features.0`` ... ``features.N``, ``avgpool``, ``classifier``) made of these node types. The
model walks this tree for forward and backward; the state_dict keys, the parameter shapes, the
names of ``forward_intermediates`` and the summary table all come from it, so nothing about the
layout is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch import BlockSpec, NetSpec


@dataclass
class ConvBNAct:
    """torchvision ``Conv2dNormActivation``: ``name.0`` conv (no bias), ``name.1`` BN,
    ``name.2`` activation (absent for the linear projection)."""
    name: str
    cin: int
    cout: int
    k: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    act: str | None = None        # "relu" | "hardswish" | None

    @property
    def kind(self) -> str:
        if self.groups == self.cin == self.cout and self.groups > 1:
            return "depthwise"
        if self.k == 1 and self.stride == 1 and self.groups == 1:
            return "pointwise"
        return "conv"

    def params(self):
        yield f"{self.name}.0.weight", (self.cout, self.cin // self.groups, self.k, self.k)
        yield f"{self.name}.1.weight", (self.cout,)
        yield f"{self.name}.1.bias", (self.cout,)

    def buffers(self):
        yield f"{self.name}.1.running_mean", (self.cout,)
        yield f"{self.name}.1.running_var", (self.cout,)
        yield f"{self.name}.1.num_batches_tracked", ()

    def module_names(self):
        yield self.name
        yield f"{self.name}.0"
        yield f"{self.name}.1"
        if self.act:
            yield f"{self.name}.2"


@dataclass
class SqueezeExcite:
    """torchvision ``SqueezeExcitation``: avgpool, fc1, fc2, activation (ReLU, between fc1 and
    fc2), scale_activation (hard-sigmoid), in torchvision's registration order."""
    name: str
    channels: int
    squeeze: int

    def params(self):
        C, S = self.channels, self.squeeze
        yield f"{self.name}.fc1.weight", (S, C, 1, 1)
        yield f"{self.name}.fc1.bias", (S,)
        yield f"{self.name}.fc2.weight", (C, S, 1, 1)
        yield f"{self.name}.fc2.bias", (C,)

    def buffers(self):
        return iter(())

    def module_names(self):
        yield self.name
        for child in ("avgpool", "fc1", "fc2", "activation", "scale_activation"):  # torch's order
            yield f"{self.name}.{child}"


@dataclass
class InvertedResidual:
    """torchvision ``InvertedResidual``: ``name.block`` = [expand] depthwise [SE] project."""
    name: str
    spec: BlockSpec
    layers: list = field(default_factory=list)

    def __post_init__(self):
        b, i = self.spec, 0
        pre = f"{self.name}.block"
        if b.has_expand:
            self.layers.append(ConvBNAct(f"{pre}.{i}", b.cin, b.exp, 1, act=b.act))
            i += 1
        self.layers.append(ConvBNAct(f"{pre}.{i}", b.exp, b.exp, b.k, stride=b.dw_stride,
                                     padding=b.padding, dilation=b.dilation, groups=b.exp,
                                     act=b.act))
        i += 1
        if b.se:
            self.layers.append(SqueezeExcite(f"{pre}.{i}", b.exp, b.se_channels))
            i += 1
        self.layers.append(ConvBNAct(f"{pre}.{i}", b.exp, b.cout, 1, act=None))

    # The four roles, by name (torchvision numbers them in ``block``; absent ones are None).
    @property
    def expand(self) -> ConvBNAct | None:
        return self.layers[0] if self.spec.has_expand else None

    @property
    def depthwise(self) -> ConvBNAct:
        return self.layers[1 if self.spec.has_expand else 0]

    @property
    def se(self) -> SqueezeExcite | None:
        return self.layers[-2] if self.spec.se else None

    @property
    def project(self) -> ConvBNAct:
        return self.layers[-1]

    def params(self):
        for layer in self.layers:
            yield from layer.params()

    def buffers(self):
        for layer in self.layers:
            yield from layer.buffers()

    def module_names(self):
        yield self.name
        yield f"{self.name}.block"
        for layer in self.layers:
            yield from layer.module_names()


@dataclass
class Classifier:
    """avgpool, flatten, then ``classifier`` = Linear, Hardswish, Dropout, Linear."""
    cin: int
    hidden: int
    num_classes: int
    dropout: float

    def params(self):
        yield "classifier.0.weight", (self.hidden, self.cin)
        yield "classifier.0.bias", (self.hidden,)
        yield "classifier.3.weight", (self.num_classes, self.hidden)
        yield "classifier.3.bias", (self.num_classes,)

    def buffers(self):
        return iter(())

    def module_names(self):
        yield "avgpool"
        yield "classifier"
        for i in range(4):
            yield f"classifier.{i}"


def build_modules(spec: NetSpec, dropout: float = 0.2):
    """features.0 (stem), features.1..N (bottlenecks), features.N+1 (head), classifier."""
    feats = [ConvBNAct("features.0", 3, spec.stem_channels, 3, stride=2, padding=1,
                       act="hardswish")]
    for i, b in enumerate(spec.blocks, start=1):
        feats.append(InvertedResidual(f"features.{i}", b))
    n = len(spec.blocks) + 1
    feats.append(ConvBNAct(f"features.{n}", spec.blocks[-1].cout, spec.head_channels, 1,
                           act="hardswish"))
    head = Classifier(spec.head_channels, spec.last_channel, spec.num_classes, dropout)
    return feats, head


def state_dict_layout(feats, head):
    """Ordered (key, shape, kind) in torchvision's state_dict order; kind: param | buffer."""
    out = []
    for m in feats:
        layers = m.layers if isinstance(m, InvertedResidual) else [m]
        for layer in layers:
            for k, s in layer.params():
                out.append((k, s, "param"))
            for k, s in layer.buffers():
                out.append((k, s, "buffer"))
    for k, s in head.params():
        out.append((k, s, "param"))
    return out
