"""``npmnv3 segment``: semantic segmentation of photos with LR-ASPP or DeepLabV3 (VOC classes).

Each image is prepared with the weights' preset (``preprocess_segmentation``: shorter side 520,
no crop), run through the model in eval mode, and every pixel gets its most probable class
(argmax of ``out``). Written per image into ``--out``: ``<stem>_mask.png``, the class map as a
palette PNG in the PASCAL VOC colours (the format of VOC's own ``SegmentationClass`` masks: the
pixel values are the class indices), and ``<stem>_overlay.png``, the colours blended over the
photo; both at the photo's size (the class map is scaled with nearest-neighbour sampling).
Printed: the classes found with their share of the pixels (at the model's resolution).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..data.images import find_images
from ..io import seg_registry as S
from ..io.registry import WeightsError

__all__ = ["voc_palette", "colorize", "overlay", "class_shares", "load_segmenter", "segment",
           "run"]

MODELS = ("lraspp", "deeplabv3")
RESIZE = 520                 # both weights' SemanticSegmentation(resize_size=520) preset
OVERLAY_ALPHA = 0.5          # weight of the class colour where a class other than background is


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n, 3) uint8: the bits of the class index, spread over R, G
    and B from the most significant bit down (VOCdevkit ``VOClabelcolormap.m``)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = r, g, b
    return pal


def colorize(labels: np.ndarray):
    """A (H, W) class map as a palette ("P") PIL image in the VOC colours."""
    from PIL import Image

    img = Image.fromarray(np.asarray(labels, np.uint8))           # "L"; a palette makes it "P"
    img.putpalette(voc_palette().reshape(-1).tolist())
    return img


def overlay(photo, labels: np.ndarray, alpha: float = OVERLAY_ALPHA):
    """The photo (RGB PIL image of the labels' size) with each non-background pixel blended
    with its class colour: ``(1 - alpha) photo + alpha colour``; background stays the photo."""
    from PIL import Image

    rgb = np.asarray(photo.convert("RGB"), np.float64)
    colours = voc_palette()[labels].astype(np.float64)                  # (H, W, 3)
    fg = (labels > 0)[..., None]
    out = np.where(fg, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.round(out).astype(np.uint8))       # (H, W, 3) uint8: RGB


def class_shares(labels: np.ndarray, categories) -> list[dict]:
    """``{"index", "label", "share"}`` of every class present, largest share first."""
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=len(categories))
    order = np.argsort(-counts, kind="stable")
    total = labels.size
    return [{"index": int(i), "label": categories[i], "share": float(counts[i] / total)}
            for i in order if counts[i]]


def load_segmenter(model: str | None = None, weights=None, *, base_url=None, progress=False):
    """``(model in eval mode, categories, description)`` for ``model`` ("lraspp" |
    "deeplabv3"; default: what the weights hold, else "lraspp") with ``weights``: a registry
    name (default: the model's own, fetched if needed) or a torchvision ``.pth`` file."""
    from ..io.pth import load_pth
    from ..nn.segmentation import segmentation_from_state_dict

    if model not in (None, *MODELS):
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if weights is None:
        weights = model or "lraspp"
    if str(weights) in S.SEG_REGISTRY:
        path = S.fetch_segmentation(str(weights), base_url=base_url, progress=progress)
        source = str(weights)
    else:
        path, source = Path(weights), str(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: no such file; --weights takes a torchvision .pth "
                                 f"file or one of {', '.join(S.SEG_REGISTRY)}")
    net = segmentation_from_state_dict(load_pth(path))
    if model is not None and net.kind != model:
        raise ValueError(f"--model {model} given, but {source} holds {net.kind} weights")
    n = net.num_classes
    if n > 256:
        raise ValueError(f"{source} has {n} classes; a palette PNG mask holds at most 256")
    cats = S.VOC_CATEGORIES if n == len(S.VOC_CATEGORIES) else tuple(f"class {i}"
                                                                     for i in range(n))
    return net.eval(), cats, source


def _save_png(img, path: Path):
    """Write atomically: a temporary file next to ``path``, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stems(paths) -> list[str]:
    """Output names: the file's stem, made unique by a ``-2``, ``-3``... suffix."""
    seen, out = {}, []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def segment(paths, model=None, weights=None, out_dir="segment-out", *, exif_transpose=True,
            base_url=None, progress=False) -> list[dict]:
    """Segment image files and directories (walked as ``classify`` does). Returns per image
    ``{"image", "mask", "overlay", "size", "classes": [{"index", "label", "share"}, ...]}``,
    or ``{"image", "error"}`` for a file that could not be read; the weights are loaded only
    if there is an image to segment."""
    from PIL import Image

    from ..data.preprocess import load_image, preprocess_segmentation
    from ..nn.model import no_grad

    items = find_images([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    results = [{"image": p, "error": err} for p, err in items]
    if all(err is not None for _, err in items):
        return results
    net, cats, _ = load_segmenter(model, weights, base_url=base_url, progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((path, err), stem) in enumerate(zip(items, _stems(p for p, _ in items))):
        if err is not None:
            continue
        try:
            photo = load_image(path, exif_transpose=exif_transpose)
        except (ValueError, OSError) as e:
            msg = " ".join(str(e).split())
            results[i]["error"] = msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg
            continue
        x = preprocess_segmentation(photo, RESIZE, exif_transpose=False)[None]  # (1, 3, H', W')
        with no_grad():
            labels = net(x)["out"][0].argmax(axis=0).astype(np.uint8)     # (H', W')
        full = np.asarray(Image.fromarray(labels).resize(photo.size, Image.NEAREST))
        mask, over = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        _save_png(colorize(full), mask)
        _save_png(overlay(photo, full), over)
        results[i] = {"image": path, "mask": str(mask), "overlay": str(over),
                      "size": list(labels.shape), "classes": class_shares(labels, cats)}
    return results


def format_results(results) -> str:
    lines = []
    for r in results:
        if "classes" in r:
            lines.append(f"{r['image']} -> {r['mask']}, {r['overlay']}")
            lines += [f"  {c['share']:7.2%}  {c['label']} ({c['index']})" for c in r["classes"]]
    return "\n".join(lines)


def run(args) -> int:
    """The command: exit 0, or 1 if any image could not be read (the others are done)."""
    import sys

    results = segment(args.images, args.model, args.weights, args.out,
                      exif_transpose=not args.no_exif, progress=True)
    good = [r for r in results if "classes" in r]
    for r in results:
        if "classes" not in r:
            print(f"npmnv3 segment: {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(good, indent=2))
    elif good:
        print(format_results(good))
    return 1 if len(good) < len(results) else 0
