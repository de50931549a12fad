"""Grad-CAM (Selvaraju et al., arXiv:1610.02391) on npmnv3's own backward pass.

For a class c with logit y_c and the feature maps A (N, K, h, w) output by ``layer``:
    alpha[n, k] = mean_{i,j} dy_c / dA[n, k, i, j]            (global-average-pooled gradient)
    cam[n]      = ReLU(sum_k alpha[n, k] * A[n, k])            (N, h, w)
then, by default, bilinearly resized to the input size (``kernels.interpolate``: torch's
``interpolate``, ``align_corners=False``) and scaled to [0, 1] per image.
"""

from __future__ import annotations

import numpy as np

from ..kernels.interpolate import bilinear_forward


def gradcam(model, x, class_idx, layer: str | None = None, *, resize: bool = True,
            normalize: bool = True) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) of ``class_idx`` (an int or one per image) at ``layer``
    (a module name; default: the last feature map, ``features.16`` Large / ``features.12``
    Small).

    Runs the model in its current mode (use ``model.eval()``) through the reference path; the
    model's accumulated parameter gradients are left untouched.
    """
    layer = model.features[-1].name if layer is None else layer
    if layer not in model.module_names():
        raise ValueError(f"unknown layer {layer!r}; choose a module name such as "
                         f"'features.16' (see model.module_names())")
    N = x.shape[0]
    idx = np.broadcast_to(np.asarray(class_idx), (N,))
    if idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= model.spec.num_classes:
        raise ValueError(f"class_idx must be integers in [0, {model.spec.num_classes}), "
                         f"got {class_idx!r}")
    saved = model.grads
    model.grads = {}
    try:
        logits, outs = model.forward_intermediates(x)
        dlogits = np.zeros_like(logits)
        dlogits[np.arange(N), idx] = 1.0                     # d y_c / d logits
        model.backward(dlogits, capture={layer})
    finally:
        model.grads = saved
    A = outs[layer]                                          # (N, K, h, w)
    dA = model.captured_grads[layer]
    alpha = dA.mean(axis=(2, 3))                             # (N, K)
    cam = np.maximum(np.einsum("nk,nkhw->nhw", alpha, A), 0)  # (N, h, w)
    if resize:
        cam = bilinear_forward(cam[:, None], x.shape[2:])[0][:, 0]      # (N, H, W)
    if normalize:
        lo = cam.min(axis=(1, 2), keepdims=True)
        span = cam.max(axis=(1, 2), keepdims=True) - lo
        cam = np.where(span > 0, (cam - lo) / np.where(span > 0, span, 1), 0.0)
    return cam.astype(model.dtype)


def overlay_pixels(image, size, *, preprocessing=None, exif_transpose=True) -> np.ndarray:
    """The uint8 RGB pixels (H, W, 3) a model saw, for drawing a (H, W) heat map on them.

    ``image``: the network input itself (a float (3, H, W) array normalised with
    ``preprocessing``'s mean/std, e.g. ``x[i]``), uint8 pixels (H, W, 3) of exactly that size,
    or the original photo (a path, ``PIL.Image`` or uint8 array of another size), which is
    resized and center-cropped as ``preprocessing`` says (default: torchvision's preset at
    this size, shorter side to ``round(H * 256 / 224)``), EXIF orientation applied as
    ``npmnv3.preprocess`` applies it."""
    from PIL import Image

    from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD, crop_pixels, imagenet_preprocessing

    H, W = size
    prep = dict(preprocessing or (imagenet_preprocessing(None, H) if H == W else {}))
    if isinstance(image, np.ndarray) and image.dtype.kind == "f" and image.ndim == 3 \
            and image.shape[0] == 3:
        if image.shape[1:] != (H, W):
            raise ValueError(f"the input image is {image.shape[1:]}, the heat map {(H, W)}")
        mean = np.asarray(prep.get("mean", IMAGENET_MEAN)).reshape(3, 1, 1)
        std = np.asarray(prep.get("std", IMAGENET_STD)).reshape(3, 1, 1)
        px = (image.astype(np.float64) * std + mean) * 255             # undo normalize
        return np.clip(px, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (H, W):
            px = image.astype(np.uint8)
            return np.repeat(px[..., None], 3, 2) if px.ndim == 2 else px[..., :3]
        image = Image.fromarray(image.astype(np.uint8))
    if H != W or "crop_size" not in prep:
        raise ValueError(f"a {H}x{W} heat map: give the network's input (x[i]) or its pixels; "
                         f"a photo is center-cropped to a square")
    if prep["crop_size"] != H:
        raise ValueError(f"preprocessing crops {prep['crop_size']}, the heat map is {H}x{W}")
    px = crop_pixels(image, prep["resize_size"], H, exif_transpose=exif_transpose)
    return np.repeat(px[..., None], 3, 2) if px.ndim == 2 else px


def save_overlay(image, cam: np.ndarray, path, *, alpha: float = 0.5, cmap: str = "jet",
                 preprocessing=None, exif_transpose: bool = True):
    """Blend Grad-CAM heat maps over the pixels the network saw and save them as PNG.

    ``cam``: one map (H, W), or ``gradcam``'s (N, H, W); ``image`` (one, or a sequence of N)
    and ``path`` (one, or N paths; or one path with ``{i}`` in it) to match. Each image is
    what ``overlay_pixels`` takes: the input ``x[i]``, its pixels, or the original photo
    (prepared as ``preprocessing`` says, default torchvision's preset at the map's size), so
    the map lands on exactly the pixels it was computed for. Returns the path (or paths)."""
    from matplotlib import colormaps
    from PIL import Image

    cams = np.asarray(cam)
    single = cams.ndim == 2
    if single:
        cams = cams[None]
    if cams.ndim != 3:
        raise ValueError(f"cam must be (H, W) or (N, H, W), got shape {cams.shape}")
    n = len(cams)
    images = list(image) if isinstance(image, (list, tuple)) else (
        list(image) if isinstance(image, np.ndarray) and image.ndim == 4 else [image] * n)
    if isinstance(path, (list, tuple)):
        paths = list(path)
    else:
        paths = [str(path).format(i=i) for i in range(n)] if "{i}" in str(path) else [path]
    if len(images) != n or len(paths) != n:
        raise ValueError(f"{n} heat map(s), {len(images)} image(s) and {len(paths)} path(s): "
                         f"give one image and one path (or a '{{i}}' pattern) per map")
    for img, c, p in zip(images, cams, paths):
        px = overlay_pixels(img, c.shape, preprocessing=preprocessing,
                            exif_transpose=exif_transpose)
        heat = colormaps[cmap](np.clip(c, 0, 1))[..., :3]             # (H, W, 3) in [0, 1]
        out = (1 - alpha) * px.astype(np.float64) / 255 + alpha * heat
        Image.fromarray((out * 255).round().astype(np.uint8)).save(p, format="PNG")
    return paths[0] if single or (n == 1 and not isinstance(path, (list, tuple))) else paths
