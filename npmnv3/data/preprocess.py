"""Image loading and the ImageNet evaluation preprocessing of torchvision's classification weights.

``preprocess(image)`` gives what ``MobileNet_V3_Large_Weights.IMAGENET1K_V1.transforms()``
(torchvision's ``ImageClassification(crop_size=224, resize_size=256)`` preset; V2 uses
``resize_size=232``) gives on the RGB PIL image ``load_image(image)``, with Pillow and NumPy only
(``torchvision/transforms/_presets.py``, ``ImageClassification``). The steps, each the call
torchvision makes for a PIL image:

1. resize: the shorter side becomes ``resize_size``, the longer ``int(resize_size * long /
   short)``, with ``PIL.Image.resize(size, Image.BILINEAR)`` (Pillow's bilinear filter, whose
   support widens with the scale factor: that is torchvision's "antialias", always on for PIL
   images); skipped when the size does not change;
2. center crop to ``crop_size``: sides shorter than the crop are first zero-padded,
   ``(crop - side) // 2`` before and ``(crop - side + 1) // 2`` after, then the window starts at
   ``int(round((side - crop) / 2.0))``;
3. ``uint8 / 255`` in float32, then ``(x - mean) / std`` per channel, ImageNet mean and std.

The results agree bit for bit with torchvision's (tests/test_preprocess.py);
``preprocess_segmentation`` is the segmentation weights' preset (step 1 with 520, no crop, step 3).
Grayscale images are resized as one channel and copied to three afterwards, which is exact
because Pillow resizes every channel with the same integer arithmetic; it takes a quarter of the
memory (Pillow stores RGB pixels in 4 bytes).

How each PIL mode becomes RGB (``load_image``, ``to_rgb``):

* ``RGB``: unchanged. ``L``: gray copied to R, G and B. ``1``: black 0, white 255, then as L.
* Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P`` with a
  transparent palette index or an RGBA palette, ``L``/``RGB`` with a ``transparency`` key):
  composited over a white background, ``out = white + round((c - white) * alpha / 255)``
  (Pillow's ``paste`` with a mask), so opaque pixels keep their exact colour and transparent ones
  are white, as the image looks on a web page (what e.g. Hugging Face's Idefics image processor
  does). A plain ``convert("RGB")`` would show whatever colour the fully transparent pixels happen
  to store, often black. Gray images with alpha stay gray.
* ``P`` without transparency, ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``: Pillow's ``convert("RGB")``
  (for CMYK Pillow's naive ``R = (255 - C) * (255 - K) / 255``, rounded, and likewise G, B;
  embedded ICC colour profiles are ignored for every mode, as torchvision and most pipelines do).
* ``I;16`` (and ``I;16L``/``I;16B``/``I;16N``): 16-bit gray, full range 0..65535 mapped to
  0..255 as ``round(v / 257)`` (the inverse of the usual 8 to 16-bit ``v * 257``; Pillow's own
  ``convert("L")`` would clip every value above 255 to white).
* ``I`` (32-bit signed gray): if every value is <= 255 the image holds 8-bit data (what
  ``convert("I")`` of an L image gives) and negative values clip to 0; otherwise it is taken as
  16-bit data (how older Pillow versions opened 16-bit PNGs), clipped to 0..65535 and scaled as
  I;16.
* ``F`` (32-bit float gray): if every finite value lies in [0, 1] the float-image convention,
  ``round(255 v)``; otherwise Pillow's own 0..255 scale (what ``convert("F")`` of an L image
  gives), rounded and clipped; NaN becomes 0. (So an F image of 8-bit values that are all 0 or
  1 counts as [0, 1] data: the rule looks at the values because F carries no range.)
* Transparency information on ``1``/``I;16``/``I``/``F`` images is ignored.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "crop_pixels", "imagenet_preprocessing", "load_image",
           "normalize", "preprocess", "preprocess_segmentation", "resize_shorter", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)       # torchvision transforms/_presets.py ImageClassification
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocessing(resize_size: int = 256, crop_size: int = 224) -> dict:
    """The preprocessing record stored with weights (``npz.py``'s ``preprocessing``):
    torchvision's ``ImageClassification(crop_size, resize_size)``, ImageNet mean and std.
    ``resize_size=None`` takes torchvision's ratio, ``round(crop_size * 256 / 224)``."""
    crop_size = _check_size("crop_size", crop_size)
    resize_size = round(crop_size * 256 / 224) if resize_size is None else resize_size
    return {"resize_size": _check_size("resize_size", resize_size), "crop_size": crop_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

_ORIENTATION = 0x0112                                   # EXIF tag
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ROWS_PER_BLOCK = 1024                                  # bounds the temporaries of the 16-bit map


# ------------------------------------------------------------------------------------------------
# Loading


def load_image(path, exif_transpose: bool = True) -> Image.Image:
    """Open an image file (or take a ``PIL.Image``) and return it as an RGB ``PIL.Image``.

    ``path``: a str or ``os.PathLike`` naming the file, or a ``PIL.Image.Image`` in any mode (not
    modified; a converted copy is returned). Modes become RGB as described in the module
    docstring. With ``exif_transpose`` (default), an EXIF Orientation tag 2..8 is applied
    (``PIL.ImageOps.exif_transpose``: the pixels are turned the way a photo viewer shows them);
    with ``exif_transpose=False`` the stored pixel grid is kept. Either way the returned image
    carries no orientation tag any more, so ``preprocess`` of it does not turn it (again).

    Raises ``ValueError`` naming the file when it does not exist, is a directory, is empty, is not
    an image Pillow can read, is truncated or corrupt, or is larger than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit, ~179 megapixels by
    default: raise ``Image.MAX_IMAGE_PIXELS``, or set it to None, to accept larger images).
    Images between ``MAX_IMAGE_PIXELS`` and twice that (e.g. 10000 x 10000) load normally; Pillow's
    ``DecompressionBombWarning`` for them is not emitted. Truncated files: Pillow refuses them
    (``OSError: image file is truncated``), reported as ``ValueError``; if the program has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``, Pillow's partial decode is accepted instead,
    the missing part filled as Pillow fills it.
    """
    if isinstance(path, Image.Image):
        image = _to_8bit(_prepare(path, exif_transpose, in_place=False))
        if image is path and image.mode == "RGB":
            image = image.copy()                        # never hand back the caller's object
    else:
        image = _to_8bit(_open(path, exif_transpose))
    image = image if image.mode == "RGB" else image.convert("RGB")
    return _orientation_done(image)


def _orientation_done(image: Image.Image) -> Image.Image:
    """Drop the EXIF orientation of an image ``load_image`` returns: applied or deliberately
    not, it must not be applied again later (``preprocess(load_image(p, False))`` keeps the
    stored grid). ``ImageOps.exif_transpose`` drops it the same way when it applies it."""
    exif = image.getexif()
    if exif.get(_ORIENTATION, 1) != 1:
        del exif[_ORIENTATION]
        image.info["exif"] = exif.tobytes()
        for key in ("XML:com.adobe.xmp", "xmp"):        # an XMP copy of the tag, if any
            if key in image.info:
                del image.info[key]
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a ``PIL.Image`` of any mode to RGB as ``load_image`` does (no EXIF handling).

    An image that is already RGB without transparency is returned itself, not copied.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_rgb expects a PIL.Image.Image, got {type(image).__name__}")
    image = _to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _open(path, exif_transpose: bool) -> Image.Image:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError("expected a path (str or os.PathLike) or a PIL.Image.Image, "
                        f"got {type(path).__name__}")
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise ValueError(f"{name}: no such file")
    if p.is_dir():
        raise ValueError(f"{name}: is a directory, not an image file")
    if p.stat().st_size == 0:
        raise ValueError(f"{name}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # Sizes between MAX_IMAGE_PIXELS and 2x are processed; 2x and beyond raise below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(name) as image:
                image.load()                    # decode now, inside the error handling
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: image too large for Pillow's decompression-bomb limit ({e}); "
                         "raise PIL.Image.MAX_IMAGE_PIXELS to load it") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{name}: not an image file Pillow can read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        hint = ("" if ImageFile.LOAD_TRUNCATED_IMAGES else
                " (set PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True to accept partial images)")
        raise ValueError(f"{name}: truncated or corrupt image: {e}{hint}") from e
    return _prepare(image, exif_transpose, in_place=True)


def _prepare(image: Image.Image, exif_transpose: bool, in_place: bool) -> Image.Image:
    """Decode a lazily opened image (errors become ValueError) and apply its EXIF orientation."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        name = getattr(image, "filename", "") or "image"
        raise ValueError(f"{name}: truncated or corrupt image: {e}") from e
    if exif_transpose and image.getexif().get(_ORIENTATION, 1) in range(2, 9):
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
    return image


# ------------------------------------------------------------------------------------------------
# Mode conversion: to "L" (gray, kept one channel for memory) or "RGB"


def _to_8bit(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        return _high_bit_to_l(image)
    if mode == "1":
        return image.convert("L")
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "L" and "transparency" not in image.info:
        return image
    if mode in ("LA", "La", "L"):                       # gray with alpha (or a tRNS gray level)
        return _over_white(image.convert("LA"), "L")
    if image.has_transparency_data:
        return _over_white(image.convert("RGBA"), "RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def _over_white(image: Image.Image, mode: str) -> Image.Image:
    """Composite an LA/RGBA image over white: white + round((c - white) * alpha / 255)."""
    out = Image.new(mode, image.size, 255 if mode == "L" else (255, 255, 255))
    out.paste(image, (0, 0), image)                     # the image's own alpha is the mask
    return out


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    arr = np.asarray(image)
    if image.mode == "F":
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0

        def block(a):
            a = np.nan_to_num(a.astype(np.float64) * scale, nan=0.0, posinf=255.0, neginf=0.0)
            return np.floor(np.clip(a, 0.0, 255.0) + 0.5)
    else:
        a16 = image.mode.startswith("I;16") or (arr.size and int(arr.max()) > 255)

        def block(a):
            a = a.astype(np.int64)
            if a16:
                return (np.clip(a, 0, 65535) + 128) // 257      # round(v / 257), exact
            return np.clip(a, 0, 255)

    out = np.empty(arr.shape, np.uint8)
    for r in range(0, arr.shape[0], _ROWS_PER_BLOCK):
        out[r:r + _ROWS_PER_BLOCK] = block(arr[r:r + _ROWS_PER_BLOCK])
    return Image.fromarray(out, "L")


# ------------------------------------------------------------------------------------------------
# The preset


def _check_size(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def preprocess(image, resize_size: int = 256, crop_size: int = 224, *, mean=IMAGENET_MEAN,
               std=IMAGENET_STD, exif_transpose: bool = True) -> np.ndarray:
    """torchvision's ImageNet evaluation preset, in Pillow and NumPy: float32 (3, crop, crop).

    ``image``: a path (str or ``os.PathLike``) or a ``PIL.Image.Image`` of any mode; it is
    converted to RGB as ``load_image`` does (same errors, same EXIF handling), then resized so its
    shorter side is ``resize_size`` (256 for the V1 weights and MobileNetV3-Small, 232 for
    ``MobileNet_V3_Large_Weights.IMAGENET1K_V2``), center-cropped to ``crop_size`` (zero padding
    where the resized image is smaller), scaled to [0, 1] and normalised with the ImageNet mean
    and std (or the ``mean`` / ``std`` given). Equal to ``weights.transforms()(load_image(image))``
    (see the module docstring). Add a batch axis with ``x[None]`` before a model call. The
    keyword arguments are those of a ``preprocessing`` record (``imagenet_preprocessing``), so
    ``preprocess(image, **weights.preprocessing)`` prepares an image as the weights expect.
    """
    return normalize(crop_pixels(image, resize_size, crop_size, exif_transpose=exif_transpose),
                     mean, std)


def crop_pixels(image, resize_size: int = 256, crop_size: int = 224, *,
                exif_transpose: bool = True) -> np.ndarray:
    """Steps 1 and 2 of ``preprocess``: the uint8 pixels the network sees, (crop, crop, 3) RGB
    or (crop, crop) gray (``preprocess`` = ``normalize(crop_pixels(...))``). Use it to show an
    input, or to draw on exactly the pixels a model saw (``npmnv3.save_overlay``)."""
    resize_size = _check_size("resize_size", resize_size)
    crop_size = _check_size("crop_size", crop_size)
    if isinstance(image, Image.Image):
        image = _prepare(image, exif_transpose, in_place=False)
    else:
        image = _open(image, exif_transpose)
    image = _to_8bit(image)                             # "L" or "RGB"

    # 1. Resize (torchvision.transforms.functional.resize -> _functional_pil.resize).
    image = resize_shorter(image, resize_size)
    new_w, new_h = image.size
    pixels = np.asarray(image)
    del image

    # 2. Center crop, zero padding first where the image is smaller than the crop.
    pad_h = max(crop_size - new_h, 0)
    pad_w = max(crop_size - new_w, 0)
    if pad_h or pad_w:
        pad = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)]
        pixels = np.pad(pixels, pad + [(0, 0)] * (pixels.ndim - 2))
    top = int(round((pixels.shape[0] - crop_size) / 2.0))
    left = int(round((pixels.shape[1] - crop_size) / 2.0))
    return pixels[top:top + crop_size, left:left + crop_size]


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """The shorter side to ``size``, the longer to ``int(size * long / short)``, with Pillow's
    bilinear filter; the image itself when the size does not change (torchvision
    ``transforms.functional.resize`` with one int, ``_compute_resized_output_size``)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def preprocess_segmentation(image, resize_size: int = 520, *,
                            exif_transpose: bool = True) -> np.ndarray:
    """torchvision's ``SemanticSegmentation(resize_size=520)`` preset (the transforms of
    ``LRASPP_MobileNet_V3_Large_Weights`` and ``DeepLabV3_MobileNet_V3_Large_Weights``):
    float32 (3, H', W') with the shorter side ``resize_size`` and the aspect ratio kept, no
    crop; then ``/ 255`` and the ImageNet mean and std. ``image`` as for ``preprocess`` (a path
    or a PIL image of any mode, same RGB conversion, errors and EXIF handling)."""
    resize_size = _check_size("resize_size", resize_size)
    if isinstance(image, Image.Image):
        image = _prepare(image, exif_transpose, in_place=False)
    else:
        image = _open(image, exif_transpose)
    return normalize(np.asarray(resize_shorter(_to_8bit(image), resize_size)))


def normalize(pixels, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 pixels (H, W, 3) or gray (H, W) -> float32 (3, H, W): ``/ 255``, then
    ``(x - mean) / std`` per channel (default ImageNet's), in float32 as torch does."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:                                # gray: the same values in R, G and B
        pixels = np.broadcast_to(pixels[:, :, None], pixels.shape + (3,))
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    x -= np.asarray(mean, np.float32).reshape(3, 1, 1)
    x /= np.asarray(std, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(x)
