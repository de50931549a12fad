"""``npmnv3.preprocess`` / ``npmnv3.load_image`` against torchvision's ImageClassification preset.

The reference is ``MobileNet_V3_Large_Weights.IMAGENET1K_V1.transforms()`` (resize 256, crop 224)
and ``..._V2.transforms()`` (resize 232), applied to ``npmnv3.load_image``'s RGB conversion of
the same image; npmnv3 itself never imports torch (checked in a subprocess). The photographs in
tests/data are public domain / CC0 (tests/data/LICENSES.md); chelsea_exif6.jpg is stored sideways
with EXIF Orientation 6.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from support import require_torchvision

import npmnv3
from npmnv3.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_rgb

DATA = Path(__file__).parent / "data"
PHOTOS = ["astronaut.jpg", "coffee.jpg", "chelsea_exif6.jpg"]
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
ATOL = 1e-6          # required; every comparison below measured 0.0 (bit-identical)
RESIZES = [256, 232]  # V1 (and Small) weights, Large V2 weights


@pytest.fixture(scope="module")
def presets():
    """{resize_size: torchvision preset}, from the weights enums (no download needed)."""
    tv = require_torchvision()
    weights = tv.models.MobileNet_V3_Large_Weights
    return {256: weights.IMAGENET1K_V1.transforms(), 232: weights.IMAGENET1K_V2.transforms(),
            "factory": weights.IMAGENET1K_V1.transforms}


def reference(presets, image, resize_size=256, crop_size=224):
    """torchvision's preset on npmnv3's RGB conversion of ``image`` (a path or PIL image)."""
    rgb = npmnv3.load_image(image)
    assert rgb.mode == "RGB"
    if (resize_size, crop_size) in ((256, 224), (232, 224)):
        preset = presets[resize_size]
    else:
        preset = presets["factory"](crop_size=crop_size, resize_size=resize_size)
    return preset(rgb).numpy()


def assert_equal_to_torchvision(presets, image, resize_size=256, crop_size=224):
    ours = npmnv3.preprocess(image, resize_size=resize_size, crop_size=crop_size)
    ref = reference(presets, image, resize_size, crop_size)
    assert ours.shape == (3, crop_size, crop_size) and ours.dtype == np.float32
    assert ours.flags.c_contiguous
    diff = float(np.abs(ours - ref).max())
    assert diff <= ATOL, f"max |npmnv3 - torchvision| = {diff:.3e}"
    return ours


# ------------------------------------------------------------------------------------------------
# Every photo x both presets x every PIL mode


def _alpha(size):
    """A horizontal 0..255 ramp, fully transparent top quarter, fully opaque bottom quarter."""
    w, h = size
    a = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    a[: h // 4] = 0
    a[h - h // 4:] = 255
    return Image.fromarray(a, "L")


def _gray16(im):
    """16-bit gray: the 8-bit gray * 257 plus dither in [-128, 128], clipped to 0..65535."""
    g = np.asarray(im.convert("L")).astype(np.int64) * 257
    g += np.random.default_rng(0).integers(-128, 129, g.shape)
    return np.clip(g, 0, 65535)


def _p_transparent(im):
    p = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p.info["transparency"] = int(np.asarray(p)[p.height // 2, p.width // 2])
    return p


MODES = {
    "RGB": lambda im: im,
    "L": lambda im: im.convert("L"),
    "LA": lambda im: Image.merge("LA", (im.convert("L"), _alpha(im.size))),
    "P": lambda im: im.convert("P", palette=Image.Palette.ADAPTIVE, colors=200),
    "P+transparency": _p_transparent,
    "RGBA": lambda im: Image.merge("RGBA", (*im.split(), _alpha(im.size))),
    "CMYK": lambda im: im.convert("CMYK"),
    "I;16": lambda im: Image.fromarray(_gray16(im).astype(np.uint16)),
    "I (8-bit data)": lambda im: im.convert("L").convert("I"),
    "I (16-bit data)": lambda im: Image.fromarray(_gray16(im).astype(np.int32)),
    "F (0..1)": lambda im: Image.fromarray(np.asarray(im.convert("L"), np.float32) / 255),
    "F (0..255)": lambda im: im.convert("L").convert("F"),
    "1": lambda im: im.convert("1"),
}


@pytest.fixture(scope="module")
def photos():
    return {name: npmnv3.load_image(DATA / name) for name in PHOTOS}


@pytest.mark.parametrize("resize_size", RESIZES)
@pytest.mark.parametrize("photo", PHOTOS)
def test_photo_path_equals_torchvision(presets, photo, resize_size):
    ours = assert_equal_to_torchvision(presets, DATA / photo, resize_size)
    # str path and an opened PIL image give the same result
    np.testing.assert_array_equal(ours, npmnv3.preprocess(str(DATA / photo), resize_size))
    with Image.open(DATA / photo) as im:
        np.testing.assert_array_equal(ours, npmnv3.preprocess(im, resize_size))


@pytest.mark.parametrize("resize_size", RESIZES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_modes_equal_torchvision(presets, photos, photo, mode, resize_size):
    image = MODES[mode](photos[photo])
    assert image.mode == mode.split(" ")[0].split("+")[0]
    before = (image.mode, image.size, image.tobytes()[:1000])
    assert_equal_to_torchvision(presets, image, resize_size)
    assert (image.mode, image.size, image.tobytes()[:1000]) == before   # input untouched


# ------------------------------------------------------------------------------------------------
# The RGB conversions are sensible (no torch needed)


def _rgb(image):
    out = npmnv3.load_image(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out).astype(np.int64)


def test_rgb_and_gray_conversions(photos):
    im = photos["coffee.jpg"]
    assert npmnv3.load_image(im) is not im                      # a copy, never the caller's
    np.testing.assert_array_equal(_rgb(im), np.asarray(im))
    gray = np.asarray(im.convert("L"))
    for mode in ("L", "I (8-bit data)", "F (0..255)", "F (0..1)"):
        np.testing.assert_array_equal(_rgb(MODES[mode](im)), np.dstack([gray] * 3), err_msg=mode)
    bits = MODES["1"](im)
    np.testing.assert_array_equal(_rgb(bits)[..., 0], np.where(np.asarray(bits), 255, 0))
    assert set(np.unique(_rgb(bits))) == {0, 255}


def test_16_bit_conversions():
    v = np.array([[0, 128, 129, 257, 385, 386, 32767, 65406, 65407, 65535]])
    expected = np.floor(v / 257 + 0.5)                          # round(v / 257)
    assert expected.tolist() == [[0, 0, 1, 1, 1, 2, 127, 254, 255, 255]]
    for image in (Image.fromarray(v.astype(np.uint16)),
                  Image.frombytes("I;16B", (10, 1), v.astype(">u2").tobytes()),
                  Image.fromarray(v.astype(np.int32))):
        np.testing.assert_array_equal(_rgb(image)[..., 1], expected, err_msg=image.mode)
    # every 8-bit value survives 8 -> 16 bit (x 257) -> npmnv3
    ramp = np.arange(256).reshape(16, 16)
    np.testing.assert_array_equal(
        _rgb(Image.fromarray((ramp * 257).astype(np.uint16)))[..., 2], ramp)
    # "I": out-of-range values clip (to 0..65535 as 16-bit data, to 0..255 as 8-bit data)
    np.testing.assert_array_equal(
        _rgb(Image.fromarray(np.array([[-5, 70000, 514]], np.int32)))[..., 0], [[0, 255, 2]])
    np.testing.assert_array_equal(
        _rgb(Image.fromarray(np.array([[-5, 0, 200]], np.int32)))[..., 0], [[0, 0, 200]])


def test_float_conversions():
    f = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    np.testing.assert_array_equal(_rgb(Image.fromarray(f))[..., 0], [[0, 128, 255, 0]])
    f = np.array([[-3.0, 100.4, 300.0, np.inf, 2.0]], np.float32)   # Pillow's 0..255 scale
    np.testing.assert_array_equal(_rgb(Image.fromarray(f))[..., 0], [[0, 100, 255, 255, 2]])


def test_alpha_over_white(photos):
    im = photos["astronaut.jpg"]
    a = np.asarray(_alpha(im.size)).astype(np.int64)[..., None]
    expected = 255 + np.floor((np.asarray(im).astype(np.int64) - 255) * a / 255 + 0.5)
    out = _rgb(MODES["RGBA"](im))
    np.testing.assert_array_equal(out, expected)
    h = im.height
    assert (out[: h // 4] == 255).all()                                     # transparent: white
    np.testing.assert_array_equal(out[h - h // 4:], np.asarray(im)[h - h // 4:])  # opaque: exact
    gray = np.asarray(im.convert("L")).astype(np.int64)[..., None]
    np.testing.assert_array_equal(_rgb(MODES["LA"](im)),
                                  np.repeat(255 + np.floor((gray - 255) * a / 255 + 0.5), 3, 2))


def test_palette_and_cmyk(photos):
    im = photos["chelsea_exif6.jpg"]
    p = MODES["P"](im)
    np.testing.assert_array_equal(_rgb(p), np.asarray(p.convert("RGB")))
    pt = MODES["P+transparency"](im)
    clear = np.asarray(pt) == pt.info["transparency"]
    assert 0 < clear.sum() < clear.size
    out, opaque = _rgb(pt), np.asarray(pt.convert("RGB"))
    assert (out[clear] == 255).all()
    np.testing.assert_array_equal(out[~clear], opaque[~clear])
    # Pillow's RGB -> CMYK (C = 255 - R, K = 0) and back is exact
    np.testing.assert_array_equal(_rgb(MODES["CMYK"](im)), np.asarray(im))
    rgb = Image.fromarray(np.asarray(im)[:8, :8].copy())
    rgb.info["transparency"] = tuple(int(c) for c in np.asarray(rgb)[0, 0])    # tRNS colour
    assert (_rgb(rgb)[0, 0] == 255).all()


# ------------------------------------------------------------------------------------------------
# EXIF orientation

# What a viewer shows for a stored pixel grid a, per EXIF orientation.
ORIENTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
            5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


def test_exif_orientation_photo():
    path = DATA / "chelsea_exif6.jpg"
    with Image.open(path) as raw:
        assert raw.getexif()[0x0112] == 6 and raw.size == (255, 384)
        stored = np.asarray(raw.convert("RGB"))
    upright = npmnv3.load_image(path)
    assert upright.size == (384, 255)                   # landscape, as the cat was photographed
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(stored, -1))  # 90 deg clockwise
    np.testing.assert_array_equal(np.asarray(npmnv3.load_image(path, exif_transpose=False)),
                                  stored)
    assert np.abs(npmnv3.preprocess(path) - npmnv3.preprocess(path, exif_transpose=False)).max() > 1


@pytest.mark.parametrize("resize_size", RESIZES)
def test_exif_off_equals_torchvision(presets, resize_size):
    path = DATA / "chelsea_exif6.jpg"
    off = npmnv3.preprocess(path, resize_size, exif_transpose=False)
    ref = presets[resize_size](npmnv3.load_image(path, exif_transpose=False)).numpy()
    assert off.shape == (3, 224, 224) and np.abs(off - ref).max() <= ATOL


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations(tmp_path, orientation):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14     # asymmetric 2x3
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(a).save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(npmnv3.load_image(path)), ORIENTED[orientation](a))
    np.testing.assert_array_equal(np.asarray(npmnv3.load_image(path, exif_transpose=False)), a)
    # a PIL image with the tag: applied, and the caller's image is left as it was
    im = Image.fromarray(a)
    im.getexif()[0x0112] = orientation
    expected = Image.fromarray(np.ascontiguousarray(ORIENTED[orientation](a)))
    np.testing.assert_array_equal(npmnv3.preprocess(im, 4, 3),
                                  npmnv3.preprocess(expected, 4, 3))
    np.testing.assert_array_equal(npmnv3.preprocess(im, 4, 3, exif_transpose=False),
                                  npmnv3.preprocess(Image.fromarray(a), 4, 3))
    assert im.size == (3, 2) and im.getexif()[0x0112] == orientation


# ------------------------------------------------------------------------------------------------
# Sizes: tiny, thin, crop larger than the resize


@pytest.mark.parametrize("resize_size", RESIZES)
@pytest.mark.parametrize("size", [(1, 1), (5, 300), (300, 5), (2, 3)])
def test_small_and_thin_images(presets, photos, size, resize_size):
    image = photos["coffee.jpg"].resize(size, Image.BILINEAR)
    assert_equal_to_torchvision(presets, image, resize_size)


@pytest.mark.parametrize("photo", ["astronaut.jpg", "coffee.jpg", "chelsea_exif6.jpg"])
@pytest.mark.parametrize("resize_size, crop_size",
                         [(200, 224), (200, 225), (100, 257), (224, 224), (300, 101)])
def test_crop_larger_than_resize_pads_like_torchvision(presets, photos, photo, resize_size,
                                                       crop_size):
    image = photos[photo]
    out = assert_equal_to_torchvision(presets, image, resize_size, crop_size)
    w, h = image.size
    short = min(w, h)
    new_h = resize_size if h == short else int(resize_size * h / short)
    if crop_size > new_h:                               # zero rows: (0 - mean) / std
        zero = (-np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32))
        np.testing.assert_allclose(out[:, 0, :], np.broadcast_to(zero[:, None], (3, crop_size)),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(out[:, -1, :], out[:, 0, :], rtol=0, atol=0)


def test_1x1_is_constant():
    out = npmnv3.preprocess(Image.new("RGB", (1, 1), (255, 0, 10)))
    assert out.shape == (3, 224, 224)
    expected = (np.array([255, 0, 10], np.float32) / np.float32(255) - np.float32(IMAGENET_MEAN)
                ) / np.float32(IMAGENET_STD)
    np.testing.assert_array_equal(out, np.broadcast_to(expected[:, None, None], out.shape))


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _truncated_jpeg(tmp_path):
    data = (DATA / "coffee.jpg").read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated or corrupt"),
])
def test_bad_files_raise_value_error_naming_the_file(tmp_path, case, match):
    if case == "missing":
        path = tmp_path / "missing.jpg"
    elif case == "directory":
        path = tmp_path / "folder.jpg"
        path.mkdir()
    elif case == "empty":
        path = tmp_path / "empty.jpg"
        path.write_bytes(b"")
    elif case == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not a JPEG\n")
    else:
        path = _truncated_jpeg(tmp_path)
    for call in (npmnv3.load_image, npmnv3.preprocess):
        with pytest.raises(ValueError, match=match) as info:
            call(path)
        assert str(path) in str(info.value)
        with pytest.raises(ValueError, match=match):
            call(str(path))


def test_truncated_jpeg_accepted_when_pillow_is_told_to(tmp_path, monkeypatch):
    path = _truncated_jpeg(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert npmnv3.load_image(path).size == (400, 267)
    assert npmnv3.preprocess(path).shape == (3, 224, 224)


def test_truncated_lazy_pil_image(tmp_path):
    with Image.open(_truncated_jpeg(tmp_path)) as im:        # opened, not yet decoded
        with pytest.raises(ValueError, match="truncated.jpg: truncated or corrupt"):
            npmnv3.preprocess(im)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(path)       # 10000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)    # > 2x the limit: Pillow's error
    with pytest.raises(ValueError, match="decompression-bomb limit") as info:
        npmnv3.load_image(path)
    assert str(path) in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)    # 1x..2x: Pillow warns; processed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert npmnv3.load_image(path).size == (100, 100)
        assert npmnv3.preprocess(path).shape == (3, 224, 224)


def test_bad_arguments(photos):
    im = photos["coffee.jpg"]
    with pytest.raises(TypeError, match="PIL.Image"):
        npmnv3.preprocess(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL.Image"):
        to_rgb("coffee.jpg")
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="resize_size"):
            npmnv3.preprocess(im, resize_size=bad)
        with pytest.raises(ValueError, match="crop_size"):
            npmnv3.preprocess(im, crop_size=bad)


# ------------------------------------------------------------------------------------------------
# A 10000 x 10000 photograph (100 megapixels, above Pillow's 89.5 MP warning threshold)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """The coffee photo blown up to 10000 x 10000 (nearest: sharp block edges to antialias)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    with Image.open(DATA / "coffee.jpg") as im:
        im.resize((10000, 10000), Image.NEAREST).save(path, quality=90)
    return path


def test_huge_image_equals_torchvision(presets, huge_jpeg):
    assert_equal_to_torchvision(presets, huge_jpeg, 256)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_huge_image_peak_memory_and_no_torch(huge_jpeg):
    """Peak RSS over the call stays near the decoded image (Pillow keeps RGB in 4 bytes/pixel:
    400 MB); a float copy of the full image (1.2 GB) or a second full copy would exceed 600 MB.
    Run in a fresh interpreter, which also checks that npmnv3 never imports torch."""
    code = f"""
import sys
import numpy as np
import npmnv3
def status_mib(key):                   # VmHWM: this process's peak RSS (ru_maxrss would carry
    with open("/proc/self/status") as f:  # over pytest's own peak across fork + exec)
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
base = status_mib("VmRSS:")
x = npmnv3.preprocess({str(huge_jpeg)!r})
peak = status_mib("VmHWM:")
assert x.shape == (3, 224, 224) and np.isfinite(x).all()
assert "torch" not in sys.modules and "torchvision" not in sys.modules, "npmnv3 imported torch"
print(peak - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = float(result.stdout.split()[-1])
    assert growth < 600, f"peak RSS grew by {growth:.0f} MiB for a 10000x10000 JPEG"
