"""Grad-CAM on model.backward vs Grad-CAM computed with torch autograd."""

from pathlib import Path

import numpy as np
import pytest
from support import RTOL32, RTOL64, randomise, require_torchvision

import npmnv3


def torch_gradcam(torch, tv, layer, x, classes):
    """Grad-CAM with autograd: hook the layer's output, retain its gradient."""
    feats = {}

    def hook(mod, inp, out):
        out.retain_grad()
        feats["A"] = out
    handle = dict(tv.named_modules())[layer].register_forward_hook(hook)
    tv.zero_grad()
    logits = tv(torch.from_numpy(x))
    logits[torch.arange(len(x)), torch.from_numpy(classes)].sum().backward()
    handle.remove()
    A = feats["A"]
    alpha = A.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * A).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear",
                                          align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    return ((cam - lo) / (cam.amax(dim=(1, 2), keepdim=True) - lo)).detach().double().numpy()


@pytest.mark.parametrize("arch, layer", [("small", "features.12"), ("large", "features.16"),
                                         ("small", "features.9.block")])
def test_gradcam_equals_torch_autograd(arch, layer):
    """float64: equal to 1e-10. float32: the map is a sum over hundreds of channels with
    cancellation, normalised by its range; torch's own float32 result differs from its float64
    one by ~1e-5..1e-4 here, so ours must lie within 10x that (or 1e-5) of torch's float64."""
    require_torchvision()
    import torch
    import torchvision
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"mobilenet_v3_{arch}")().eval()
    randomise(torch, tv, seed=0)
    with torch.no_grad():
        tv.classifier[3].weight.normal_(0, 0.5)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 80))
    with torch.no_grad():
        order = torch.argsort(tv(torch.from_numpy(x).float()), 1, descending=True).numpy()
    # With random weights a class's map can be all zero (ReLU of a negative sum): take, per
    # image, the highest-scoring class whose map is not.
    classes = order[:, 0].copy()
    for n in range(2):
        for c in order[n]:
            classes[n] = c
            if np.isfinite(torch_gradcam(torch, tv.double(), layer, x, classes)[n]).all():
                break
    ref64 = torch_gradcam(torch, tv.double(), layer, x, classes)
    ref32 = torch_gradcam(torch, tv.float(), layer, x.astype(np.float32), classes)
    assert np.isfinite(ref64).all()
    torch_own = npmnv3.rel_error(ref32, ref64)
    for dtype, tol in ((np.float64, RTOL64), (np.float32, max(RTOL32, 10 * torch_own))):
        model = getattr(npmnv3, f"mobilenet_v3_{arch}")(dtype=dtype)
        model.load_state_dict(sd)
        model.eval()
        ours = npmnv3.gradcam(model, x.astype(dtype), classes, layer=layer)
        err = npmnv3.rel_error(ours, ref64)
        assert ours.dtype == dtype and err <= tol, \
            f"{dtype.__name__}: {err:.2e} > {tol:.1e} (torch's own float32 error {torch_own:.1e})"
    raw = npmnv3.gradcam(model, x.astype(np.float32), classes, layer=layer, resize=False,
                         normalize=False)
    assert raw.ndim == 3 and raw.max() > 0


def test_gradcam_leaves_grads_and_overlay_png(tmp_path):
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=4, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    model.grads = {"classifier.3.bias": np.ones(4, np.float32)}
    cam = npmnv3.gradcam(model, x, 2)                       # default: the last feature map
    assert cam.shape == (1, 64, 64) and 0 <= cam.min() and cam.max() <= 1
    np.testing.assert_array_equal(model.grads["classifier.3.bias"], np.ones(4))
    img = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    out = npmnv3.save_overlay(img, cam[0], tmp_path / "cam.png")
    from PIL import Image
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    with pytest.raises(ValueError, match="unknown layer"):
        npmnv3.gradcam(model, x, 0, layer="features.99")
    with pytest.raises(ValueError, match="class_idx"):
        npmnv3.gradcam(model, x, 4)


def test_overlay_as_the_readme_shows_it_lands_on_the_pixels_the_network_saw(tmp_path):
    """``gradcam`` then ``save_overlay(photo, cam, path)`` with the (1, H, W) map: the photo is
    prepared exactly as the input was (EXIF applied, resize, center crop), for a path, a PIL
    image, the input tensor itself, or a batch."""
    from PIL import Image

    from npmnv3.data.preprocess import crop_pixels
    from npmnv3.tools.gradcam import overlay_pixels

    photo = Path(__file__).resolve().parent / "data" / "chelsea_exif6.jpg"     # EXIF 6
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=4, seed=0).eval()
    x = npmnv3.preprocess(photo, 73, 64)[None]
    cam = npmnv3.gradcam(model, x, 1)                                # (1, 64, 64)
    out = npmnv3.save_overlay(photo, cam, tmp_path / "cam.png")
    assert out == tmp_path / "cam.png"
    seen = crop_pixels(photo, 73, 64)                                # what the network saw
    assert np.array_equal(overlay_pixels(photo, (64, 64)), seen)
    assert np.array_equal(overlay_pixels(x[0], (64, 64)), seen)     # the tensor, undone
    with Image.open(photo) as im:
        assert np.array_equal(overlay_pixels(im, (64, 64)), seen)
    assert not np.array_equal(seen, crop_pixels(photo, 73, 64, exif_transpose=False))
    heat = np.asarray(Image.open(out), dtype=np.float64) / 255
    from matplotlib import colormaps
    expect = 0.5 * seen / 255 + 0.5 * colormaps["jet"](cam[0])[..., :3]
    assert np.abs(heat - expect).max() <= 0.5 / 255 + 1e-12
    # A batch: one overlay per map, from the batch tensor or a list of photos.
    xs = np.concatenate([x, x[:, :, :, ::-1].copy()])
    cams = npmnv3.gradcam(model, xs, [1, 2])
    paths = npmnv3.save_overlay(xs, cams, tmp_path / "cam{i}.png")
    assert paths == [str(tmp_path / "cam0.png"), str(tmp_path / "cam1.png")]
    assert npmnv3.save_overlay([photo, photo], cams, [tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(ValueError, match="2 heat map"):
        npmnv3.save_overlay(photo, cams, tmp_path / "one.png")
    with pytest.raises(ValueError, match="preprocessing crops 224"):
        npmnv3.save_overlay(photo, cam, tmp_path / "c.png",
                            preprocessing={"resize_size": 256, "crop_size": 224})
