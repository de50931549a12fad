"""The official torchvision segmentation checkpoints on MobileNetV3-Large: registry and fetch.

torchvision ``models/segmentation/lraspp.py`` ``LRASPP_MobileNet_V3_Large_Weights`` and
``deeplabv3.py`` ``DeepLabV3_MobileNet_V3_Large_Weights`` (both ``COCO_WITH_VOC_LABELS_V1``:
trained on the COCO images of the 20 PASCAL VOC categories). ``fetch_segmentation(name)``
returns the verified ``.pth`` (read with the torch-free ``load_pth``; no conversion), reusing
``registry.py``'s directories, torch hub cache and atomic, hash-checked download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .convert import sha256_of
from .registry import (
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT,
    WeightsError,
    _download,
    torch_hub_dir,
    weights_dir,
)

__all__ = ["VOC_CATEGORIES", "SegWeightsEntry", "SEG_REGISTRY", "get_segmentation",
           "fetch_segmentation"]

# torchvision ``models/_meta.py`` ``_VOC_CATEGORIES``: index 0 is the background.
VOC_CATEGORIES = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor")


@dataclass(frozen=True)
class SegWeightsEntry:
    """One published segmentation checkpoint (MobileNetV3-Large backbone, dilated)."""
    name: str               # registry name: "lraspp" | "deeplabv3"
    model: str              # the builder: npmnv3.<model>_mobilenet_v3_large
    enum: str               # torchvision's name for the same weights
    file_name: str
    sha256_prefix: str
    miou: float             # COCO-val2017 with the 20 VOC categories, torchvision's meta
    pixel_acc: float
    num_params: int
    aux_loss: bool          # the checkpoint holds ``aux_classifier.*`` (DeepLabV3's FCN head)
    resize_size: int = 520  # SemanticSegmentation preset: shorter side, bilinear, no crop

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get("NPMNV3_WEIGHTS_URL") or DEFAULT_BASE_URL
        return f"{base.rstrip('/')}/{self.file_name}"

    @property
    def categories(self) -> tuple[str, ...]:
        return VOC_CATEGORIES


SEG_REGISTRY: dict[str, SegWeightsEntry] = {e.name: e for e in [
    SegWeightsEntry("lraspp", "lraspp", "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
                    "lraspp_mobilenet_v3_large-d234d4ea.pth", "d234d4ea", 57.9, 91.2,
                    3_221_538, aux_loss=False),
    SegWeightsEntry("deeplabv3", "deeplabv3",
                    "DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
                    "deeplabv3_mobilenet_v3_large-fc3c493d.pth", "fc3c493d", 60.3, 91.2,
                    11_029_328, aux_loss=True),
]}


def get_segmentation(name: str) -> SegWeightsEntry:
    """The segmentation registry entry ``lraspp`` or ``deeplabv3``."""
    entry = SEG_REGISTRY.get(name)
    if entry is None:
        raise WeightsError(f"unknown segmentation weights {name!r}; known: "
                           f"{', '.join(SEG_REGISTRY)}")
    return entry


def fetch_segmentation(name: str, *, base_url: str | None = None,
                       timeout: float = DEFAULT_TIMEOUT, progress: bool = False) -> Path:
    """Path of the verified official ``.pth`` of ``name`` (read with ``load_pth``, no
    conversion): ``weights_dir()``, else torch hub's cache, else downloaded into
    ``weights_dir()`` (atomic, hash-checked). The hash is checked on every use; a file that
    fails is removed from ``weights_dir()`` (never from torch hub's cache)."""
    entry = get_segmentation(name)
    d = weights_dir()
    hub = torch_hub_dir() / entry.file_name
    path = d / entry.file_name
    if not path.is_file() and hub.is_file():
        path = hub
    elif not path.is_file():
        d.mkdir(parents=True, exist_ok=True)
        _download(entry.url(base_url), path, entry, timeout=timeout, progress=progress,
                  local=".pth")
    digest = sha256_of(path)
    if not digest.startswith(entry.sha256_prefix):
        if path != hub:
            path.unlink(missing_ok=True)
        raise WeightsError(f"{path}: sha256 mismatch (expected {entry.sha256_prefix}..., got "
                           f"{digest[:16]}...); " + ("the file was removed, run the command "
                           "again to download it" if path != hub else
                           "torch hub's copy is not the official file"))
    return path
