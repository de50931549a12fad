"""ImageNet classification with pretrained (or your own) weights, without a framework.

``classify(paths)`` walks the given files and directories, preprocesses each image the way the
weights were evaluated or trained (what their .npz records; for torchvision's weights its
preset: shorter side -> 256, or 232 for ``large-v2``, center crop 224, ImageNet mean/std),
runs the model in batches and returns, per image, the top-k classes with their softmax
probabilities (computed in float64). An image that cannot be
read gets an ``error`` entry instead; the other images are still classified.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.images import find_images
from ..data.preprocess import imagenet_preprocessing
from ..io import registry as W
from ..io.load import read_weights
from ..io.npz import has_meta, read_meta

__all__ = ["Classifier", "load_classifier", "resolve_weights", "classify", "iter_results",
           "find_images", "softmax", "format_results", "format_result"]


@dataclass
class Classifier:
    """A model in eval mode plus what is needed to use it on images: the class names and the
    preprocessing its weights were evaluated (or trained) with."""
    model: object                   # npmnv3.MobileNetV3 (or QuantizedMobileNetV3)
    categories: tuple[str, ...]
    preprocessing: dict = field(default_factory=imagenet_preprocessing)
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


def categories_for(weights) -> tuple[str, ...]:
    """The class names of ``weights`` (a ``Weights``): recorded ones, else ImageNet's for 1000
    classes, else ``class <i>``."""
    n = weights.config.num_classes
    if weights.classes is not None and len(weights.classes) == n:
        return tuple(weights.classes)
    return W.imagenet_categories() if n == 1000 else tuple(f"class {i}" for i in range(n))


def resolve_weights(weights, *, model: str | None = None, base_url: str | None = None,
                    progress: bool = False):
    """``(Weights, official entry or None, source)`` for what a ``--weights`` option names:
    a registry name (default, when ``weights`` is None: ``model``'s, else ``large-v2``;
    fetched if needed) or a file (``read_weights``: .npz, .pth of torchvision and other
    libraries). A file named like an official checkpoint (or converted from one) must carry
    its hash, checked before it is read; being the user's own file, it is not deleted if not.
    ``model`` ("large"/"small"): the weights must be of that model. Every command's
    ``--weights`` goes through here, so they accept the same files with the same messages."""
    if model not in (None, "large", "small"):
        raise ValueError(f"model must be 'large' or 'small', got {model!r}")
    if weights is None:
        weights = W.DEFAULTS[model or "large"]
    if str(weights) in W.names():
        entry = W.get(str(weights))
        if entry.quantized:
            raise ValueError(f"{entry.name} are int8 weights for the quantized model: use them "
                             f"with npmnv3 classify --quantized (or npmnv3.load_classifier("
                             f"weights={entry.name!r}))")
        found = read_weights(W.fetch(entry.name, base_url=base_url, progress=progress))
        source = entry.name
    else:
        path = Path(weights)
        if not path.exists():
            raise W.WeightsError(f"{path}: no such file; --weights takes a .pth/.npz file or "
                                 f"one of {', '.join(W.names())}")
        name = read_meta(path).get("source_name", path.name) if has_meta(path) else path.name
        entry = W.entry_for_file(str(name))
        if entry is not None and path.is_file():
            W.verify_file(path, entry)
        found, source = read_weights(path), str(weights)
    if model is not None and found.config.arch != model:
        raise ValueError(f"--model {model} given, but {source} holds "
                         f"{found.config.describe()} weights")
    return found, entry, source


def _quantized_classifier(model, weights, base_url, progress) -> Classifier:
    """The int8 model (``npmnv3.QuantizedMobileNetV3``) of torchvision's quantized weights
    (default ``large-qnnpack-v1``) or of a quantized / QAT-prepared ``.pth`` file."""
    from ..io.pth import load_pth
    from ..nn.qat import quantized_from_state_dict

    if weights is None:
        if (model or "large") not in W.QUANTIZED_DEFAULTS:
            raise ValueError(f"torchvision publishes no int8 weights for MobileNetV3-{model}; "
                             f"pass --weights FILE (a quantized or QAT-prepared .pth)")
        weights = W.QUANTIZED_DEFAULTS[model or "large"]
    if str(weights) in W.names():
        entry = W.get(str(weights))
        if not entry.quantized:
            raise ValueError(f"{entry.name} are float weights, not int8 ones: drop --quantized, "
                             f"or quantize a float model with npmnv3.quantize(model, images)")
        path, source = W.fetch(entry.name, base_url=base_url, progress=progress), entry.name
    else:
        path, source = Path(weights), str(weights)
        if not path.is_file():
            raise W.WeightsError(f"{path}: no such file; --quantized --weights takes a .pth "
                                 f"file or one of {', '.join(W.QUANTIZED_DEFAULTS.values())}")
        entry = W.entry_for_file(path.name)
        if entry is not None:
            W.verify_file(path, entry)
    if path.suffix.lower() == ".npz" or has_meta(path):     # an .npz holds float arrays
        raise ValueError(f"{path}: an .npz of float weights, not int8 ones: --quantized takes "
                         f"a quantized or QAT-prepared .pth (torch.save(model.state_dict())); "
                         f"drop --quantized to use it, or quantize a float model with "
                         f"npmnv3.quantize(model, images)")
    qmodel = quantized_from_state_dict(load_pth(path))
    if model is not None and qmodel.config.arch != model:
        raise ValueError(f"--model {model} given, but {source} holds quantized "
                         f"{qmodel.config.describe()} weights")
    n = qmodel.config.num_classes
    categories = W.imagenet_categories() if n == 1000 else tuple(f"class {i}" for i in range(n))
    prep = entry.preprocessing if entry is not None else imagenet_preprocessing()
    return Classifier(qmodel, categories, prep, source)


def load_classifier(model: str | None = None, weights: str | os.PathLike | None = None, *,
                    quantized: bool = False, base_url: str | None = None,
                    progress: bool = False) -> Classifier:
    """A ``Classifier`` for ``model`` ("large"/"small", default: what the weights hold, else
    "large") with ``weights``: a registry name (default: ``large-v2`` / ``small-v1``, fetched
    if needed) or a ``.pth``/``.npz`` file. Preprocessing and class names come with the
    weights (recorded in their .npz, or the registry's recipe, else torchvision's preset).
    ``quantized``: the int8 model, with torchvision's quantized weights by default (a
    registry name of int8 weights implies it)."""
    if model not in (None, "large", "small"):
        raise ValueError(f"model must be 'large' or 'small', got {model!r}")
    if quantized or (str(weights) in W.names() and W.get(str(weights)).quantized):
        return _quantized_classifier(model, weights, base_url, progress)
    found, entry, source = resolve_weights(weights, model=model, base_url=base_url,
                                           progress=progress)
    prep = found.preprocessing or (entry.preprocessing if entry is not None else
                                   imagenet_preprocessing())
    return Classifier(found.model(), categories_for(found), prep, source)


def _load(path: str, clf: Classifier, exif_transpose: bool):
    """(3, crop, crop) float32 input, or the reason the file cannot be used."""
    from ..data.preprocess import preprocess

    try:
        return preprocess(path, exif_transpose=exif_transpose, **clf.preprocessing)
    except (ValueError, OSError) as e:
        return error_text(e, path)


def error_text(e: Exception, path: str) -> str:
    """An image error as one line, without the path it starts with."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def check_topk(topk, num_classes: int) -> int:
    """``topk`` (None: ``min(5, num_classes)``) checked against the number of classes."""
    if topk is None:
        return min(5, num_classes)
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) \
            or not 1 <= topk <= num_classes:
        raise ValueError(f"topk must be between 1 and {num_classes} (the model's classes), "
                         f"got {topk}")
    return int(topk)


def iter_results(clf: Classifier, items, *, topk: int | None = None, batch_size: int = 8,
                 exif_transpose: bool = True):
    """Yield one result per ``(path, error)`` item (``find_images``), in order, each batch's
    as soon as it is classified (results as ``classify`` describes them)."""
    topk = check_topk(topk, len(clf.categories))
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pending: list[dict] = []                 # results in order; an image's "top" filled later
    batch, xs = [], []
    for path, err in items:
        if err is None:
            x = _load(path, clf, exif_transpose)
            err = x if isinstance(x, str) else None
        pending.append({"image": path, "error": err} if err else {"image": path})
        if err is None:
            batch.append(pending[-1])
            xs.append(x)
        if len(xs) == batch_size:
            for r, top in zip(batch, clf.predict(np.stack(xs), topk)):
                r["top"] = top
            batch, xs = [], []
        while pending and ("top" in pending[0] or "error" in pending[0]):
            yield pending.pop(0)
    if xs:
        for r, top in zip(batch, clf.predict(np.stack(xs), topk)):
            r["top"] = top
    yield from pending


def run(clf: Classifier, items, *, topk: int | None = None, batch_size: int = 8,
        exif_transpose: bool = True) -> list[dict]:
    """Classify ``(path, error)`` items (``find_images``) with ``clf``, in batches."""
    return list(iter_results(clf, items, topk=topk, batch_size=batch_size,
                             exif_transpose=exif_transpose))


def classify(paths, model: str | None = None, weights=None, topk: int | None = None, *,
             batch_size: int = 8, exif_transpose: bool = True, base_url: str | None = None,
             progress: bool = False, quantized: bool = False) -> list[dict]:
    """Classify image files and directories (walked, sorted, by image extension).

    Returns one dict per image, in order: ``{"image": path, "top": [{"index", "label",
    "prob"}, ...]}`` (``topk`` entries, default ``min(5, classes)``, most probable first), or
    ``{"image": path, "error": message}`` for a file that could not be read. ``model``/
    ``weights``/``quantized`` as in ``load_classifier``; the weights are loaded only if there
    is an image to classify.
    """
    items = find_images([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    if all(err is not None for _, err in items):
        return [{"image": p, "error": err} for p, err in items]
    clf = load_classifier(model, weights, quantized=quantized, base_url=base_url,
                          progress=progress)
    return run(clf, items, topk=topk, batch_size=batch_size, exif_transpose=exif_transpose)


def format_result(r: dict) -> str:
    """One image's result as text: its path, then one ``prob  label (index)`` line per class
    ("" for an image that could not be read)."""
    if "top" not in r:
        return ""
    return "\n".join([r["image"]] + [f"  {t['prob']:.4f}  {t['label']} ({t['index']})"
                                     for t in r["top"]])


def format_results(results: list[dict]) -> str:
    """Human-readable text: per image its path, then one ``prob  label (index)`` line per class."""
    return "\n".join(t for t in map(format_result, results) if t)
