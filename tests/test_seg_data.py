"""The segmentation weights' facts and preset: registry entries equal torchvision's weights
enums, ``preprocess_segmentation`` equal to their ``SemanticSegmentation`` transform, and
``fetch_segmentation`` (download, hash check on every use, torch hub reuse) on a local server."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import require_torchvision
from test_weights import TIMEOUT, isolated, leftovers, server  # noqa: F401  (fixtures)

import npmnv3
from npmnv3.data.preprocess import preprocess_segmentation
from npmnv3.io import seg_registry as W
from npmnv3.io.registry import DownloadError, WeightsError

DATA = Path(__file__).parent / "data"
PHOTOS = ["astronaut.jpg", "coffee.jpg", "chelsea_exif6.jpg"]
ATOL = 1e-6          # bound on |ours - torchvision|; every image below measures 0.0


def tv_weights():
    tv = require_torchvision()
    seg = tv.models.segmentation
    return {"lraspp": seg.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
            "deeplabv3": seg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1}


def test_registry_is_torchvisions():
    ref = tv_weights()
    assert list(W.SEG_REGISTRY) == ["lraspp", "deeplabv3"]
    for name, w in ref.items():
        e = W.get_segmentation(name)
        assert e.url("https://download.pytorch.org/models") == w.url
        assert f"-{e.sha256_prefix}." in e.file_name
        assert e.num_params == w.meta["num_params"]
        metrics = w.meta["_metrics"]["COCO-val2017-VOC-labels"]
        assert (e.miou, e.pixel_acc) == (metrics["miou"], metrics["pixel_acc"])
        assert e.categories == tuple(w.meta["categories"]) == W.VOC_CATEGORIES
        assert [e.resize_size] == w.transforms().resize_size
        assert e.enum.endswith(str(w).split(".")[-1]) and e.enum.startswith(type(w).__name__)
    assert W.get_segmentation("deeplabv3").aux_loss and not W.get_segmentation("lraspp").aux_loss
    with pytest.raises(WeightsError, match="unknown segmentation weights 'fcn'.*lraspp"):
        W.get_segmentation("fcn")


@pytest.mark.parametrize("photo", PHOTOS)
def test_preset_equals_torchvision(photo):
    preset = tv_weights()["lraspp"].transforms()
    ours = preprocess_segmentation(DATA / photo)
    ref = preset(npmnv3.load_image(DATA / photo)).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert min(ours.shape[1:]) == 520
    assert float(np.abs(ours - ref).max()) <= ATOL


@pytest.mark.parametrize("size", [(300, 200), (520, 700), (700, 520), (33, 1000)])
def test_preset_up_down_and_unchanged(size):
    """Upscaling, an image already at 520 (no resize), and an extreme aspect ratio."""
    preset = tv_weights()["deeplabv3"].transforms()
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = npmnv3.preprocess_segmentation(img)
    ref = preset(img).numpy()
    assert ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= ATOL
    gray = npmnv3.preprocess_segmentation(img.convert("L"), resize_size=64)
    assert gray.shape[0] == 3 and min(gray.shape[1:]) == 64
    with pytest.raises(ValueError, match="resize_size must be a positive int"):
        preprocess_segmentation(img, resize_size=0)


# ----------------------------------------------------------------------------- fetch


@pytest.fixture
def seg_entry(monkeypatch):
    """A registry entry "test-seg" for some bytes (``fetch_segmentation`` only hashes them)."""
    data = np.random.default_rng(0).bytes(50_000)
    sha = hashlib.sha256(data).hexdigest()
    e = replace(W.get_segmentation("lraspp"), name="test-seg",
                file_name=f"lraspp_test-{sha[:8]}.pth", sha256_prefix=sha[:8])
    monkeypatch.setitem(W.SEG_REGISTRY, e.name, e)
    return e, data


def test_fetch_downloads_once_and_checks_every_use(server, seg_entry, tmp_path):  # noqa: F811
    e, data = seg_entry
    server.files[e.file_name] = data
    path = W.fetch_segmentation("test-seg", timeout=TIMEOUT)
    assert path == tmp_path / "home" / e.file_name and path.read_bytes() == data
    assert W.fetch_segmentation("test-seg", timeout=TIMEOUT) == path
    assert server.hits == [f"/models/{e.file_name}"]
    path.write_bytes(data[:-1] + b"x")                   # damaged on disk: found and removed
    with pytest.raises(WeightsError, match="sha256 mismatch.*the file was removed"):
        W.fetch_segmentation("test-seg", timeout=TIMEOUT)
    assert leftovers(tmp_path / "home") == []


def test_fetch_reuses_torch_hub_and_never_deletes_it(server, seg_entry, tmp_path):  # noqa: F811
    e, data = seg_entry
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / e.file_name).write_bytes(data)
    assert W.fetch_segmentation("test-seg", timeout=TIMEOUT) == hub / e.file_name
    assert server.hits == []
    (hub / e.file_name).write_bytes(b"not it")
    with pytest.raises(WeightsError, match="torch hub's copy is not the official file"):
        W.fetch_segmentation("test-seg", timeout=TIMEOUT)
    assert (hub / e.file_name).is_file()


def test_offline_advice_is_classify_s(seg_entry, tmp_path):
    e, _ = seg_entry
    with pytest.raises(DownloadError, match=r"cannot download .*lraspp_test.*: check the "
                                              r"connection .* copy lraspp_test.* --weights also "
                                              r"takes a local .pth file$"):
        W.fetch_segmentation("test-seg", timeout=TIMEOUT)
    assert leftovers(tmp_path / "home") == []


def test_weights_list_shows_the_segmentation_checkpoints(capsys):
    from npmnv3.cli import main
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    seg = out[out.index("segmentation (npmnv3 segment --weights NAME)"):]
    for e in W.SEG_REGISTRY.values():
        row = next(ln for ln in seg.splitlines() if ln.startswith(e.name + " "))
        assert e.file_name in row and f"{e.miou:.1f}" in row and f"{e.num_params:,}" in row
