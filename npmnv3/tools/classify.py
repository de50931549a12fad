"""ImageNet classification with pretrained (or your own) weights, without a framework.

``classify(paths)`` walks the given files and directories, preprocesses each image the way the
weights were evaluated (torchvision's preset: shorter side -> 256, or 232 for ``large-v2``,
center crop 224, ImageNet mean/std), runs the model in batches and returns, per image, the
top-k classes with their softmax probabilities (computed in float64). An image that cannot be
read gets an ``error`` entry instead; the other images are still classified.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import weights as W
from ..io.convert import META_KEY, build_model, load_model

__all__ = ["IMAGE_EXTENSIONS", "Classifier", "load_classifier", "classify", "find_images",
           "softmax", "format_results"]

IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm".split())
DEFAULT_RESIZE = 256      # torchvision's ImageClassification default (every weight but Large V2)
DEFAULT_CROP = 224


@dataclass
class Classifier:
    """A model in eval mode plus what is needed to use it on images."""
    model: object                   # npmnv3.MobileNetV3
    categories: tuple[str, ...]
    resize_size: int = DEFAULT_RESIZE
    crop_size: int = DEFAULT_CROP
    source: str = ""                # what the weights are: registry name or file

    def predict(self, x: np.ndarray, topk: int = 5) -> list[list[dict]]:
        """Top-k ``{"index", "label", "prob"}`` per row of a (N, 3, H, W) batch."""
        probs = softmax(self.model(x))
        out = []
        for p in probs:
            top = np.argsort(-p, kind="stable")[:topk]
            out.append([{"index": int(i), "label": self.categories[i], "prob": float(p[i])}
                        for i in top])
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (logits (N, K) -> probabilities (N, K), rows sum to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _npz_meta(path: Path) -> dict:
    """The metadata of an npmnv3 .npz, read alone ({} if it cannot be read: loading the file
    then reports why)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(z[META_KEY].tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}


def _from_file(path: Path):
    """(model in eval mode, official entry or None) for a .pth or .npz the user gave. A file
    named like an official checkpoint (or converted from one) must carry its hash; being the
    user's own file, it is not deleted if it does not."""
    if not path.is_file():
        raise W.WeightsError(f"{path}: no such file; --weights takes a .pth/.npz file or one of "
                             f"{', '.join(W.names())}")
    is_npz = path.suffix.lower() == ".npz"
    name = str(_npz_meta(path).get("source_name", "")) if is_npz else path.name
    entry = W.entry_for_file(name)
    if entry is not None:
        W.verify_file(path, entry)
    return load_model(path), entry


def load_classifier(model: str | None = None, weights: str | os.PathLike | None = None, *,
                    base_url: str | None = None, progress: bool = False) -> Classifier:
    """A ``Classifier`` for ``model`` ("large"/"small", default: what the weights hold, else
    "large") with ``weights``: a registry name (default: ``large-v2`` / ``small-v1``, fetched
    if needed) or a ``.pth``/``.npz`` file. Preprocessing follows the weights' recipe."""
    if model not in (None, "large", "small"):
        raise ValueError(f"model must be 'large' or 'small', got {model!r}")
    if weights is None:
        weights = W.DEFAULTS[model or "large"]
    if str(weights) in W.names():
        entry = W.get(str(weights))
        sd, meta = W.load_state_dict(entry.name, base_url=base_url, progress=progress)
        net, source = build_model(meta["arch"]), entry.name
        net.load_state_dict(sd, strict=True)
    else:
        net, entry = _from_file(Path(weights))
        source = str(weights)
    arch = net.arch
    if model is not None and arch["arch"] != model:
        raise ValueError(f"--model {model} given, but {source} holds mobilenet_v3_"
                         f"{arch['arch']} weights")
    n = arch["num_classes"]
    cats = W.imagenet_categories() if n == 1000 else tuple(f"class {i}" for i in range(n))
    resize = entry.resize_size if entry is not None else DEFAULT_RESIZE
    crop = entry.crop_size if entry is not None else DEFAULT_CROP
    return Classifier(net.eval(), cats, resize, crop, source)


def find_images(paths) -> list[tuple[str, str | None]]:
    """``(path, error)`` per image: files as given (any extension: reading decides), and the
    image files (by extension, hidden ones skipped) under each directory, walked in sorted
    order. ``error`` is None, or says why the path yields nothing."""
    found = []
    for p in map(str, paths):
        if os.path.isdir(p):
            inside = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                inside += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")
                           and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
            found += [(f, None) for f in inside] or [(p, "directory holds no image files")]
        elif os.path.exists(p):
            found.append((p, None))
        else:
            found.append((p, "no such file or directory"))
    return found


def _load(path: str, clf: Classifier, exif_transpose: bool):
    """(3, crop, crop) float32 input, or the reason the file cannot be used."""
    from ..data.preprocess import preprocess

    try:
        return preprocess(path, clf.resize_size, clf.crop_size, exif_transpose=exif_transpose)
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def run(clf: Classifier, items, *, topk: int = 5, batch_size: int = 8,
        exif_transpose: bool = True) -> list[dict]:
    """Classify ``(path, error)`` items (``find_images``) with ``clf``, in batches."""
    if not 1 <= topk <= len(clf.categories):
        raise ValueError(f"topk must be between 1 and {len(clf.categories)}, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    results: list[dict] = [{"image": p, "error": err} for p, err in items]
    todo = [i for i, (_, err) in enumerate(items) if err is None]
    for start in range(0, len(todo), batch_size):
        batch, xs = [], []
        for i in todo[start:start + batch_size]:
            x = _load(results[i]["image"], clf, exif_transpose)
            if isinstance(x, str):
                results[i]["error"] = x
            else:
                batch.append(i)
                xs.append(x)
        if xs:
            for i, top in zip(batch, clf.predict(np.stack(xs), topk)):
                results[i] = {"image": results[i]["image"], "top": top}
    return results


def classify(paths, model: str | None = None, weights=None, topk: int = 5, *,
             batch_size: int = 8, exif_transpose: bool = True, base_url: str | None = None,
             progress: bool = False) -> list[dict]:
    """Classify image files and directories (walked, sorted, by image extension).

    Returns one dict per image, in order: ``{"image": path, "top": [{"index", "label",
    "prob"}, ...]}`` (``topk`` entries, most probable first), or ``{"image": path, "error":
    message}`` for a file that could not be read. ``model``/``weights`` as in
    ``load_classifier``; the weights are loaded only if there is an image to classify.
    """
    items = find_images([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    if all(err is not None for _, err in items):
        return [{"image": p, "error": err} for p, err in items]
    clf = load_classifier(model, weights, base_url=base_url, progress=progress)
    return run(clf, items, topk=topk, batch_size=batch_size, exif_transpose=exif_transpose)


def format_results(results: list[dict]) -> str:
    """Human-readable text: per image its path, then one ``prob  label (index)`` line per class."""
    lines = []
    for r in results:
        if "top" in r:
            lines.append(r["image"])
            lines += [f"  {t['prob']:.4f}  {t['label']} ({t['index']})" for t in r["top"]]
    return "\n".join(lines)
