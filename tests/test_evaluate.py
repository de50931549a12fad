"""``npmnv3 evaluate`` against torchvision's own evaluation: the same top-1/top-5 and the same
predictions, image by image, on a small ImageNet-layout tree built from the shipped photos.

torchvision's side is its reference evaluation (``references/classification/train.py``):
``datasets.ImageFolder`` (its ``pil_loader``: ``convert("RGB")``, no EXIF rotation) with the
weights' ``transforms()`` and the model in eval mode, class folders mapped to class indices by
their WordNet id. The weights are a torchvision ``mobilenet_v3_small`` written by ``torch.save``
(``support.calibrated_small``). Each image is put in the folder of the class torchvision ranks
1st, 3rd or 8th for it, so a third are top-1 hits, a third top-5 hits only and a third misses:
accuracies that would change if a single prediction or label were wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from support import calibrated_small, require_torchvision

from npmnv3.cli import main
from npmnv3.io.registry import imagenet_categories, imagenet_wnids

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))
RANKS = (0, 2, 7)                 # the label is torchvision's 1st, 3rd or 8th class
# Logits of ours and torch's differ by up to ~1.2e-4 here (float32 summation order, logits
# ~25); the reference's top-6 must be 8x that apart for top-5 lists and hits to be meaningful.
MIN_LOGIT_GAP = 1e-3


def test_wordnet_ids_are_torchvisions_class_order():
    """The packaged ids: 1000, distinct, sorted (torchvision's class index is the sorted order
    of ImageNet's synset folders), and known anchors with their torchvision names."""
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    cats = imagenet_categories()
    for i, wnid, name in ((0, "n01440764", "tench"), (285, "n02124075", "Egyptian cat"),
                          (504, "n03063599", "coffee mug"), (967, "n07920052", "espresso"),
                          (999, "n15075141", "toilet tissue")):
        assert (wnids[i], cats[i]) == (wnid, name)


def _variants(photo: Path):
    """A few differently sized/cropped/coloured versions of a photo (PIL images, file ext)."""
    with Image.open(photo) as im:
        im = im.convert("RGB")
    w, h = im.size
    return [(ImageOps.mirror(im), ".png"), (im.crop((0, 0, w // 2, h)), ".png"),
            (im.resize((w // 3, h // 3), Image.BILINEAR), ".png"),
            (im.convert("L"), ".png"), (im.rotate(90, expand=True), ".bmp")]


def torchvision_predict(model, paths, k=9):
    """Top-k class indices and logits per image, as torchvision's reference evaluation
    computes them (its loader and the weights' transforms)."""
    import torch
    from torchvision.datasets.folder import pil_loader
    from torchvision.models import MobileNet_V3_Small_Weights

    transform = MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        logits = model(torch.stack([transform(pil_loader(p)) for p in paths])).numpy()
    return np.argsort(-logits, axis=1, kind="stable")[:, :k], logits


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root of an ImageNet-layout tree, weights .pth, torchvision model, relative paths of
    the unreadable files)."""
    require_torchvision()
    tmp = tmp_path_factory.mktemp("evaluate")
    model, pth = calibrated_small(PHOTOS, tmp / "random_small.pth")
    staging = tmp / "staging"
    staging.mkdir()
    paths = []
    for photo in PHOTOS:
        paths.append(staging / photo.name)              # as shipped: chelsea has EXIF 6, not
        paths[-1].write_bytes(photo.read_bytes())       # applied by torchvision's loader
        for j, (im, ext) in enumerate(_variants(photo)):
            paths.append(staging / f"{photo.stem}_{j}{ext}")
            im.save(paths[-1])
    top, logits = torchvision_predict(model, paths)
    ranked = np.take_along_axis(logits, top[:, :6], axis=1)
    assert np.all(-np.diff(ranked, axis=1) > MIN_LOGIT_GAP), "reference top-6 not separated"
    root, wnids = tmp / "val", imagenet_wnids()
    for i, p in enumerate(paths):
        folder = root / wnids[top[i, RANKS[i % 3]]]
        folder.mkdir(parents=True, exist_ok=True)
        p.rename(folder / p.name)
    # Two files that cannot be read: counted and listed, never a crash.
    some = sorted(root.iterdir())[0]
    (some / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    data = (DATA / "coffee.jpg").read_bytes()
    (some / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad = [f"{some.name}/broken.jpg", f"{some.name}/truncated.jpg"]
    return root, pth, model, bad


def torchvision_evaluation(model, root, bad):
    """torchvision's ImageFolder evaluation of the readable images: (paths, labels, top-5)."""
    from torchvision import datasets

    ds = datasets.ImageFolder(root, is_valid_file=lambda p: not any(p.endswith(b) for b in bad))
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    labels = np.array([index[ds.classes[t]] for _, t in ds.samples])
    top, _ = torchvision_predict(model, [p for p, _ in ds.samples], k=5)
    return [p for p, _ in ds.samples], labels, top


def test_evaluate_equals_torchvisions_evaluation(tree, tmp_path, capsys):
    root, pth, model, bad = tree
    paths, labels, top = torchvision_evaluation(model, root, bad)
    n = len(paths)
    top1, top5 = (top[:, 0] == labels).mean(), (top == labels[:, None]).any(axis=1).mean()
    assert (round(top1 * n), round(top5 * n)) == (n // 3, 2 * n // 3)      # as constructed
    report_file = tmp_path / "report.json"
    code = main(["evaluate", root, "--weights", pth, "--json", "--per-image", "--workers", "2",
                 "--batch-size", "5", "--report", report_file, "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert json.loads(report_file.read_text()) == report
    assert report["top1"] == top1 and report["top5"] == top5
    assert report["correct"] == {"top1": n // 3, "top5": 2 * n // 3}
    assert (report["images"], report["evaluated"], report["unreadable"]) == (n + 2, n, 2)
    assert report["class_mapping"] == "ImageNet WordNet ids"
    assert report["preprocessing"]["resize_size"] == 256 and report["topk"] == 5
    preds = {p["image"]: p for p in report["predictions"]}
    for path, label, t in zip(paths, labels, top):                         # image by image
        assert preds[path]["label"] == label and preds[path]["top"] == t.tolist(), path
    listed = sorted(Path(u["path"]).relative_to(root).as_posix()
                    for u in report["unreadable_files"])
    assert listed == bad
    assert [ln.split(": ")[1] for ln in out.err.splitlines()] == [str(root / b) for b in bad]
    assert sum(c["images"] for c in report["per_class"].values()) == n
    for wnid, c in report["per_class"].items():
        m = labels == imagenet_wnids().index(wnid)
        assert c["top1"] == pytest.approx((top[m, 0] == labels[m]).mean()), wnid
    t = report["timing"]
    assert t["workers"] == 2 and t["images_per_second"] > 0


def test_evaluate_in_process_with_a_mapping_file_and_text(tree, tmp_path, capsys):
    """Any folder names with --class-index (here the index JSON torchvision's gallery ships),
    decoding in the main process (--workers 0): the same numbers, as text."""
    root, pth, _, _ = tree
    renamed = tmp_path / "renamed"
    mapping = {}
    for i, d in enumerate(sorted(root.iterdir())):
        (renamed / f"class{i}").mkdir(parents=True)
        for f in d.iterdir():
            (renamed / f"class{i}" / f.name).symlink_to(f)
        mapping[str(imagenet_wnids().index(d.name))] = [f"class{i}", "whatever"]
    index_file = tmp_path / "imagenet_class_index.json"
    index_file.write_text(json.dumps(mapping))
    assert main(["evaluate", root, "--weights", pth, "--json", "--no-progress"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["evaluate", renamed, "--weights", pth, "--workers", "0", "--class-index",
                 index_file, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"top-1 {100 * ref['top1']:.3f} % ({ref['correct']['top1']})" in text
    assert f"top-5 {100 * ref['top5']:.3f} % ({ref['correct']['top5']})" in text
    assert f"evaluated {ref['evaluated']} of {ref['images']} images (2 unreadable" in text
    # Folders the model cannot place: one line, exit 1.
    assert main(["evaluate", renamed, "--weights", pth, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --class-index FILE" in err
