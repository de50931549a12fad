"""The Python API where a user trips first: keyword arguments through ``model(x, ...)``, the
input's dtype and layout, EXIF handled once, a broken YAML description."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import npmnv3

PHOTO = Path(__file__).resolve().parent / "data" / "chelsea_exif6.jpg"       # EXIF orientation 6


def test_call_forwards_keywords_to_forward():
    model = npmnv3.mobilenet_v3_small(width_mult=0.25, num_classes=5, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = model(x, rng=np.random.default_rng(1))                   # train mode: dropout from rng
    b = model.forward(x, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    c = model(x, rng=np.random.default_rng(2))
    assert not np.array_equal(a, c)                                # the rng was really used
    np.testing.assert_array_equal(
        model(x, freeze_backbone=True, rng=np.random.default_rng(3)),
        model.forward(x, freeze_backbone=True, rng=np.random.default_rng(3)))
    with pytest.raises(TypeError, match="keep_cache"):              # gone: backward just works
        model(x, keep_cache=True)


def test_input_dtype_and_layout_mistakes_say_what_to_do():
    model = npmnv3.mobilenet_v3_small(width_mult=0.25).eval()
    x = np.zeros((1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"float64 .* but the model is float32: cast it with "
                                         r"x.astype\(np.float32\)"):
        model(x)
    with pytest.raises(ValueError, match=r"channels-last \(N, H, W, 3\); use "
                                         r"x.transpose\(0, 3, 1, 2\)"):
        model(np.zeros((1, 32, 32, 3), np.float32))


def test_exif_is_applied_once_or_not_at_all():
    """load_image(p, exif_transpose=False) keeps the stored grid, and preprocess of that image
    does not turn it after all; load_image(p) turns it once."""
    kept = npmnv3.load_image(PHOTO, exif_transpose=False)
    turned = npmnv3.load_image(PHOTO)
    assert kept.size == turned.size[::-1]
    np.testing.assert_array_equal(npmnv3.preprocess(kept),
                                  npmnv3.preprocess(PHOTO, exif_transpose=False))
    np.testing.assert_array_equal(npmnv3.preprocess(turned), npmnv3.preprocess(PHOTO))
    assert not np.array_equal(npmnv3.preprocess(kept), npmnv3.preprocess(turned))


def test_a_broken_yaml_description_names_the_file(tmp_path):
    bad = tmp_path / "net.yaml"
    bad.write_text("stage_params: [\n  - {in_channels: 16\n")
    with pytest.raises(ValueError, match=f"{bad}: not valid YAML"):
        npmnv3.mobilenet_v3_from_config(bad)
