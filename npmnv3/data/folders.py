"""Image-folder datasets and torchvision's training/evaluation transforms, in Pillow and NumPy.

``ImageFolder(root)``: one sub-directory per class (class names sorted, label = index), images
found recursively by extension, as ``torchvision.datasets.ImageFolder`` does. Files Pillow cannot
read are skipped and listed in ``skipped`` (``(path, reason)``), never a crash.

Transforms map an RGB ``PIL.Image`` and a ``numpy.random.Generator`` to a float32 (3, S, S)
array normalised with the ImageNet mean and std:

* ``TrainTransform``: torchvision's ``RandomResizedCrop(S)`` (area fraction ~ U(scale), log
  aspect ratio ~ U(log ratio), 10 tries, then a central crop; crop then bilinear resize) and
  ``RandomHorizontalFlip(p)``; defaults scale (0.08, 1), ratio (3/4, 4/3), p 0.5.
* ``EvalTransform``: resize the shorter side to ``resize_size`` (default S * 256/224), center
  crop S: ``npmnv3.preprocess.preprocess``, torchvision's ImageNet evaluation preset.

Every random draw comes from the generator passed to ``batches``, so one seed fixes the order,
the crops, the flips (and, in ``npmnv3.train.fit``, dropout).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, image_files
from .preprocess import imagenet_preprocessing, load_image, normalize, preprocess


def to_normalized_array(image: Image.Image) -> np.ndarray:
    """RGB image (H, W) -> float32 (3, H, W): uint8 / 255, then (x - mean) / std per channel."""
    return normalize(np.asarray(image, dtype=np.uint8))


def random_resized_crop_params(width, height, scale, ratio, rng):
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) of the crop box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height                       # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, top, left, h, w, size) -> Image.Image:
    """torchvision ``F.resized_crop`` of a PIL image: crop the box, then bilinear resize (PIL's
    filter widens when shrinking: torchvision's antialias)."""
    image = image.crop((left, top, left + w, top + h))
    return image.resize((size, size), Image.BILINEAR)


def batch_indices(n, batch_size, rng, shuffle, min_size):
    """Index arrays of consecutive batches of range(n) (permuted by ``rng`` if ``shuffle``);
    a last batch smaller than ``min_size`` is dropped."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < min_size:
            return
        yield idx


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(hflip) + normalisation."""

    def __init__(self, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5):
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale and ratio must be increasing positive pairs, got {scale}, "
                             f"{ratio}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    @property
    def preprocessing(self) -> dict:
        """How to prepare an image for a model trained with this transform (at test time):
        torchvision's evaluation preset at this size."""
        return imagenet_preprocessing(None, self.size)

    def __call__(self, image: Image.Image, rng) -> np.ndarray:
        top, left, h, w = random_resized_crop_params(*image.size, self.scale, self.ratio, rng)
        x = to_normalized_array(resized_crop(image, top, left, h, w, self.size))  # (3, S, S)
        if self.hflip and rng.random() < self.hflip:
            x = np.ascontiguousarray(x[:, :, ::-1])
        return x

    def __repr__(self):
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio="
                f"({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), hflip={self.hflip})")


class EvalTransform:
    """Resize the shorter side to ``resize_size``, center crop ``size``, normalise."""

    def __init__(self, size=224, resize_size=None):
        self.size = int(size)
        self.resize_size = int(round(size * 256 / 224)) if resize_size is None else resize_size

    @property
    def preprocessing(self) -> dict:
        """This transform as a preprocessing record (``npmnv3.preprocess(image, **record)``)."""
        return imagenet_preprocessing(self.resize_size, self.size)

    def __call__(self, image: Image.Image, rng=None) -> np.ndarray:
        return preprocess(image, exif_transpose=False, **self.preprocessing)

    def __repr__(self):
        return f"EvalTransform(size={self.size}, resize_size={self.resize_size})"


def _scan_classes(root: Path, classes, exclude) -> list[str]:
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    found = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not d.name.startswith(".") and d.name not in exclude)
    if not found:
        raise ValueError(f"{root}: no class folders (expected one sub-directory per class, "
                         f"holding that class's images)")
    if classes is None:
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown} are not among the {len(classes)} "
                         f"training classes")
    return list(classes)


def _check_image(path: str) -> str | None:
    """None if Pillow decodes the file, else the reason it cannot. The whole file is decoded
    (``verify()`` alone misses truncated JPEGs), JPEGs at 1/8 scale (``draft``): every byte is
    still read and entropy-decoded, at a fraction of the cost."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:                 # Pillow raises many types for broken files
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolder:
    """Images in ``root/<class>/**/*.{jpg,png,...}``; labels are indices into sorted ``classes``.

    ``classes``: impose a class list (a ``val/`` folder must use the training classes; a class
    may then have no folder). ``exclude``: sub-directory names that are not classes.
    ``verify``: decode every file now (unreadable ones go to ``skipped`` and out of ``samples``,
    so they are neither counted nor trained on); files that still fail to decode later are
    skipped in ``batches`` and added.
    Raises ``ValueError`` for a missing root, a root without class folders, or class folders
    without a readable image (naming them).
    """

    def __init__(self, root, *, transform=None, classes=None, exclude=(), verify=True,
                 extensions=IMAGE_EXTENSIONS):
        self.root = Path(root)
        self.classes = _scan_classes(self.root, classes, set(exclude))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform if transform is not None else EvalTransform()
        self.skipped: list[tuple[str, str]] = []
        samples, empty = [], []
        for c in self.classes:
            folder = self.root / c
            if not folder.is_dir():             # only possible with an imposed class list
                continue
            files = image_files(folder, extensions)
            bad = {p: r for p in files if verify and (r := _check_image(p)) is not None}
            self.skipped.extend(bad.items())
            good = [(p, self.class_to_idx[c]) for p in files if p not in bad]
            if not good:
                empty.append(f"{c} ({len(bad)} unreadable)" if bad else c)
            samples.extend(good)
        if empty:
            raise ValueError(f"{self.root}: class folder(s) without a readable image "
                             f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}")
        self.samples = samples
        self.targets = np.array([t for _, t in samples], dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return (f"ImageFolder({str(self.root)!r}: {len(self)} images, {len(self.classes)} "
                f"classes, {len(self.skipped)} skipped, {self.transform!r})")

    def subset(self, indices, transform=None) -> ImageFolder:
        """The samples at ``indices`` (same classes and root), with another transform if given."""
        out = object.__new__(ImageFolder)
        out.__dict__.update(self.__dict__)
        out.samples = [self.samples[i] for i in indices]
        out.targets = self.targets[np.asarray(indices, dtype=np.int64)]
        out.skipped = self.skipped
        out.transform = self.transform if transform is None else transform
        return out

    def split(self, val_fraction, *, seed=0, val_transform=None):
        """Stratified random split: ``round(n_c * val_fraction)`` images of each class
        (keeping at least one for training) go to the second subset."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        rng = np.random.default_rng([seed, 1])     # its own stream, apart from training's
        train_idx, val_idx = [], []
        for c in range(len(self.classes)):
            idx = rng.permutation(np.flatnonzero(self.targets == c))
            k = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
            val_idx.extend(idx[:k])
            train_idx.extend(idx[k:])
        if not val_idx:
            raise ValueError(f"val_fraction {val_fraction} leaves no validation image "
                             f"({len(self)} images in {len(self.classes)} classes)")
        return self.subset(sorted(train_idx)), self.subset(sorted(val_idx), val_transform)

    def batches(self, batch_size, *, rng=None, shuffle=False, min_size=1):
        """Yield ``(x (B, 3, S, S) float32, y (B,) int64)``; batches smaller than ``min_size``
        (the last one) are dropped; images that fail to decode are left out and recorded.
        ``rng``: the Generator (or seed) of the order and the transform's draws."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        for idx in batch_indices(len(self), batch_size, rng, shuffle, min_size):
            xs, ys = [], []
            for i in idx:
                path, label = self.samples[i]
                try:
                    image = load_image(path)
                except ValueError as e:
                    if all(p != path for p, _ in self.skipped):
                        self.skipped.append((path, str(e)))
                    continue
                xs.append(self.transform(image, rng))
                ys.append(label)
            if xs:
                yield np.stack(xs), np.array(ys, dtype=np.int64)


class ArrayDataset:
    """In-memory images ``x`` (N, 3, H, W) (already normalised) with integer labels ``y``."""

    def __init__(self, x, y, classes=None):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or x.shape[1] != 3 or x.dtype.kind != "f":
            raise ValueError(f"x must be a float array (N, 3, H, W), got {x.dtype} {x.shape}")
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise ValueError(f"y must be integer labels of shape ({len(x)},), got {y.dtype} "
                             f"{y.shape}")
        self.x, self.targets = x, y.astype(np.int64)
        self.classes = list(classes) if classes is not None else None
        self.skipped = []

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size, *, rng=None, shuffle=False, min_size=1):
        """Yield ``(x, y)`` batches like ``ImageFolder.batches`` (no decoding, no transform)."""
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        for idx in batch_indices(len(self), batch_size, rng, shuffle, min_size):
            yield self.x[idx], self.targets[idx]


def load_folders(root, *, size=224, val_fraction=0.1, seed=0, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), hflip=0.5, resize_size=None, verify=True):
    """``(train, val)`` ImageFolders for ``root``: ``root/train`` and ``root/val`` if present;
    else the class folders of ``root`` (a ``val/`` beside them is the validation set), or a
    stratified ``val_fraction`` split of them (``val`` None when ``val_fraction`` is 0)."""
    root = Path(root)
    train_tf = TrainTransform(size, scale, ratio, hflip)
    eval_tf = EvalTransform(size, resize_size)
    has_val = (root / "val").is_dir()
    train_root = root / "train" if (root / "train").is_dir() else root
    exclude = ("val",) if train_root == root else ()
    train = ImageFolder(train_root, transform=train_tf, exclude=exclude, verify=verify)
    if has_val:
        val = ImageFolder(root / "val", transform=eval_tf, classes=train.classes, verify=verify)
        return train, val
    if not val_fraction:
        return train, None
    return train.split(val_fraction, seed=seed, val_transform=eval_tf)
