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


def save_overlay(image, cam: np.ndarray, path, *, alpha: float = 0.5, cmap: str = "jet"):
    """Blend a heat map (H, W) in [0, 1] over an RGB image (PIL image, path, or (H, W, 3)
    uint8 array) and save it as PNG. The image is resized to the heat map's size."""
    from matplotlib import colormaps
    from PIL import Image

    if isinstance(image, np.ndarray):
        img = Image.fromarray(image.astype(np.uint8))
    elif isinstance(image, Image.Image):
        img = image
    else:
        img = Image.open(image)
    img = img.convert("RGB").resize((cam.shape[1], cam.shape[0]), Image.BILINEAR)
    heat = colormaps[cmap](np.clip(cam, 0, 1))[..., :3]             # (H, W, 3) in [0, 1]
    out = (1 - alpha) * np.asarray(img, dtype=np.float64) / 255 + alpha * heat
    Image.fromarray((out * 255).round().astype(np.uint8)).save(path, format="PNG")
    return path
