"""Every ```python block of README.md runs, so the snippets cannot rot.

Each block runs in a fresh namespace, in a temporary directory holding what the snippets name:
``mobilenet_v3_large-5c1a4163.pth`` (a checkpoint torchvision writes, random weights: the
official file cannot be downloaded here), ``quantized.pth`` (torchvision's quantized
MobileNetV3-Large state_dict, converted after a short calibration),
``lraspp_mobilenet_v3_large-d234d4ea.pth`` (torchvision's LR-ASPP, random weights),
``photo.jpg`` (a shipped photo), ``data/`` (a tiny image folder: train/ and val/, two
classes); ``x`` is an input batch. Nothing is downloaded.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import require_torchvision

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.S | re.M)


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text("utf-8")
    return [textwrap.dedent(code) for _, code in BLOCK.findall(text)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    torchvision = require_torchvision()
    import torch

    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(),
               tmp_path / "mobilenet_v3_large-5c1a4163.pth")
    from npmnv3.tools.qcompare import torchvision_quantized
    torch.save(torchvision_quantized("large", image_size=64, batches=1, batch_size=2).state_dict(),
               tmp_path / "quantized.pth")
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None,
                                                                     weights_backbone=None)
    torch.save(seg.state_dict(), tmp_path / "lraspp_mobilenet_v3_large-d234d4ea.pth")
    shutil.copy(REPO / "tests" / "data" / "coffee.jpg", tmp_path / "photo.jpg")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in range(2):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(100 * c + rng.integers(0, 120, (40, 48, 3)), 0, 255)
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", "http://127.0.0.1:9/unused")
    return tmp_path


def test_readme_python_blocks_run(workdir):
    blocks = readme_blocks()
    assert len(blocks) >= 3, "README.md lost its python examples"
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"README.md python block {i}", "exec"), {"x": x.copy()})
    # What the snippets promise to leave behind.
    assert sorted(p.name for p in (workdir / "run").iterdir()) == ["best.npz", "checkpoint.npz",
                                                                    "curves.png", "model.npz"]
    with Image.open(workdir / "cam.png") as im:
        assert im.size == (224, 224)
