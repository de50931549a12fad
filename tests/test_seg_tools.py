"""``npmnv3 segment`` and ``npmnv3 summary --model lraspp|deeplabv3`` against torchvision.

The weights are a torchvision LR-ASPP with random affine batch-norm parameters whose running
statistics are measured on the photos (a calibration pass, as in test_classify.py), so that the
predicted classes depend on the image; saved with ``torch.save`` and given as ``--weights``.
No network is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import require_torchvision
from test_weights import isolated  # noqa: F401  (autouse: NPMNV3_HOME, closed weights URL)

import npmnv3
from npmnv3.cli import main
from npmnv3.io.seg_registry import VOC_CATEGORIES
from npmnv3.tools.segment import class_shares, load_segmenter, voc_palette

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = [DATA / "astronaut.jpg", DATA / "chelsea_exif6.jpg"]    # square; EXIF-rotated
# A pixel's class may differ from torchvision's only where torchvision's two best scores are
# closer than this: float32 logits differ by ~1e-5 relative (summation order).
TIE = 1e-3


@pytest.fixture(scope="module")
def lraspp(tmp_path_factory):
    tv = require_torchvision()
    import torch

    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None,
                                                                 weights_backbone=None)
    preset = tv.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.DEFAULT.transforms()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.momentum = None                  # running stats = average over the pass
                m.reset_running_stats()
        model.train()
        for p in PHOTOS:
            model(preset(npmnv3.load_image(p))[None])
        for conv in (model.classifier.low_classifier, model.classifier.high_classifier):
            conv.weight.copy_(0.5 * torch.randn(conv.weight.shape, generator=g))
    path = tmp_path_factory.mktemp("weights") / "random_lraspp.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), preset, path


def test_segment_masks_equal_torchvision(lraspp, tmp_path, capsys):
    import torch

    tv, preset, path = lraspp
    out = tmp_path / "out"
    assert main(["segment", *map(str, PHOTOS), "--weights", str(path), "--out", str(out),
                 "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, PHOTOS))
    net, cats, _ = load_segmenter(None, path)
    assert net.kind == "lraspp" and cats == VOC_CATEGORIES
    for r, photo in zip(results, PHOTOS):
        rgb = npmnv3.load_image(photo)
        x = preset(rgb)[None]
        with torch.no_grad():
            scores = tv(x)["out"][0].numpy()                             # (21, H', W')
        ref = scores.argmax(0)
        ours = net(x.numpy())["out"][0].argmax(0)
        top2 = np.sort(scores, axis=0)[-2:]
        differ = ours != ref
        assert np.all(top2[1][differ] - top2[0][differ] < TIE), "a clear-cut pixel differs"
        assert differ.mean() < 1e-3, f"{photo.name}: {differ.mean():.2%} of pixels differ"
        assert r["size"] == list(ref.shape)
        assert r["classes"] == class_shares(ours, VOC_CATEGORIES)
        assert len(r["classes"]) >= 2, "a one-class image proves little"
        assert abs(sum(c["share"] for c in r["classes"]) - 1) < 1e-9
        mask = Image.open(r["mask"])                   # the class map at the photo's size
        assert mask.mode == "P" and mask.size == rgb.size
        pal = np.asarray(mask.getpalette(), np.uint8).reshape(-1, 3)
        assert np.array_equal(pal, voc_palette()[:len(pal)])
        full = np.asarray(Image.fromarray(ours.astype(np.uint8)).resize(rgb.size,
                                                                         Image.NEAREST))
        assert np.array_equal(np.asarray(mask), full)
        overlay = Image.open(r["overlay"])
        assert overlay.mode == "RGB" and overlay.size == rgb.size
        bg = full == 0                                 # background: the photo itself
        assert np.array_equal(np.asarray(overlay)[bg], np.asarray(rgb)[bg])
        fg = ~bg
        if fg.any():                                   # elsewhere half photo, half colour
            want = np.round(0.5 * np.asarray(rgb, np.float64)[fg] + 0.5 * voc_palette()[
                full[fg]])
            assert np.array_equal(np.asarray(overlay)[fg], want.astype(np.uint8))


def test_segment_text_bad_image_and_model_mismatch(lraspp, tmp_path, capsys):
    _, _, path = lraspp
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["segment", str(PHOTOS[0]), str(bad), "--weights", str(path), "--out",
                 str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert f"npmnv3 segment: {bad}: not an image file Pillow can read" in captured.err
    assert captured.out.startswith(f"{PHOTOS[0]} -> {out / PHOTOS[0].stem}_mask.png")
    assert "__background__" in captured.out or "aeroplane" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [f"{PHOTOS[0].stem}_mask.png",
                                                     f"{PHOTOS[0].stem}_overlay.png"]
    assert main(["segment", str(PHOTOS[0]), "--model", "deeplabv3", "--weights",
                 str(path)]) == 1
    assert "--model deeplabv3 given, but" in capsys.readouterr().err


def test_segment_without_weights_gives_one_line(tmp_path, capsys):
    """Offline and nothing on disk: the one-line advice, as ``classify`` gives it."""
    assert main(["segment", str(PHOTOS[0]), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npmnv3 segment: error: cannot download ")
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in err
    assert "check the connection" in err and "copy lraspp_mobilenet_v3_large" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["lraspp", "deeplabv3"])
def test_summary_counts_equal_torch(kind, capsys):
    tv = require_torchvision()
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    kw = {"aux_loss": True} if kind == "deeplabv3" else {}
    model = getattr(tv.models.segmentation, f"{kind}_mobilenet_v3_large")(
        weights=None, weights_backbone=None, **kw).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, 65, 49))
    assert main(["summary", "--model", kind, "--input-size", "65", "49", "--depth", "0"]) == 0
    text = capsys.readouterr().out
    params = sum(p.numel() for p in model.parameters())
    assert f"Total params: {params:,} " in text
    assert f"Total MACs:   {fc.get_total_flops() // 2:,} " in text
    assert "backbone.16" in text and "classifier" in text
