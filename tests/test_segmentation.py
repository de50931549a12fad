"""LR-ASPP and DeepLabV3 on MobileNetV3-Large against torchvision, end to end.

The weights are checkpoints torchvision writes (``torch.save`` of a model with randomised
batch-norm statistics and biases), read back with the torch-free ``npmnv3.load_pth``. Compared:
``out`` (and ``aux``), every module's output, dL/dx and every parameter gradient for a random
upstream gradient, the running statistics after a train-mode step; eval and train mode; odd,
non-square input sizes (the final upsampling must land on torchvision's pixels). float64 must
agree to 1e-10; float32 is judged against the float64 truth (``seg_support.judge``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from seg_support import GRAD_FLOOR, _err, dropout_masks, judge, judge_all, run_torch
from support import randn, randomise, require_torchvision

import npmnv3
from npmnv3.nn.segmentation import segmentation_from_state_dict

BUILDERS = {"lraspp": "lraspp_mobilenet_v3_large", "deeplabv3": "deeplabv3_mobilenet_v3_large"}
DROPOUTS = {"lraspp": (), "deeplabv3": ("classifier.0.project.3", "aux_classifier.3")}


def make_checkpoints(torch, tv, directory) -> dict:
    """{kind: (torchvision model, path of its torch.save'd state_dict)} in ``directory``;
    DeepLabV3 with the aux classifier, as the official checkpoint has it. Also used by
    benchmarks/seg_parity.py (the README's table)."""
    out = {}
    for kind, builder in BUILDERS.items():
        with torch.random.fork_rng():
            torch.manual_seed(7)
            kw = {"aux_loss": True} if kind == "deeplabv3" else {}
            model = getattr(tv.models.segmentation, builder)(weights=None,
                                                             weights_backbone=None, **kw)
        randomise(torch, model, seed=8)
        path = Path(directory) / f"{kind}.pth"
        torch.save(model.state_dict(), path)
        out[kind] = (model, path)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tv = require_torchvision()
    import torch

    return make_checkpoints(torch, tv, tmp_path_factory.mktemp("ckpt"))


def ours_for(path, dtype, training):
    model = segmentation_from_state_dict(npmnv3.load_pth(path), dtype=dtype)
    return model.train(training)


def compare(kind, checkpoints, dtype, size, training, batch=2):
    """Everything of ours against torchvision (float64 truth; float32 also torch float32)."""
    import torch

    tv, path = checkpoints[kind]
    rng = np.random.default_rng(size[0] * 100 + size[1])
    x = randn(rng, (batch, 3) + size, np.float64)
    model = ours_for(path, dtype, training)
    result, record = model.forward_intermediates(x.astype(dtype), rng=0)   # dropout: seeded
    dout = {k: randn(rng, v.shape, np.float64) for k, v in result.items()}
    dx = model.backward({k: v.astype(dtype) for k, v in dout.items()})
    masks = dropout_masks(record, DROPOUTS[kind]) if training else None
    assert training == bool(masks) or kind == "lraspp"
    truth = run_torch(torch, copy.deepcopy(tv).double().train(training), [x], dout, "",
                      masks=masks)
    ref = truth
    if dtype == np.float32:
        ref = run_torch(torch, copy.deepcopy(tv).float().train(training), [x.astype(dtype)],
                        {k: v.astype(dtype) for k, v in dout.items()}, "", masks=masks)
    f32 = dtype == np.float32
    worst = {k: judge(k, result[k], ref["out"][k], truth["out"][k] if f32 else None)
             for k in ref["out"]}
    names = set(ref["outs"]) - {""}
    outs = {n: ref["outs"][n] for n in names}
    worst["modules"] = judge_all("module", record, outs, truth["outs"] if f32 else None)
    worst["dx"] = judge("dx", dx, ref["dinputs"][0], truth["dinputs"][0] if f32 else None)
    grads = dict(model.named_grads())
    assert set(grads) == set(ref["grads"])
    floor = GRAD_FLOOR * max(np.abs(g).max() for g in truth["grads"].values())
    worst["grads"] = judge_all("grad", grads, ref["grads"], truth["grads"] if f32 else None,
                               floor)
    if f32:                            # torch float32's own distance from the float64 truth
        worst["torch"] = {
            "out": max(_err(ref["out"][k], truth["out"][k], 0) for k in ref["out"]),
            "modules": max(_err(ref["outs"][n], truth["outs"][n], 0) for n in names),
            "dx": _err(ref["dinputs"][0], truth["dinputs"][0], 0),
            "grads": max(_err(ref["grads"][k], truth["grads"][k], floor) for k in grads)}
    if training:
        state = model.state_dict()
        for k, v in ref["state"].items():
            if "running" in k:
                judge(k, state[k], v, truth["state"][k] if f32 else None)
            elif "num_batches" in k:
                assert int(state[k]) == int(v), k
    return worst


# (kind, (H, W), batch, dtype): odd and non-square sizes, one below the 16-pixel output stride
# of the features (its high-level map is 2x2, the ASPP's dilated taps all read padding); float64
# everywhere the exactness is claimed, float32 at one size per model (its error is rounding).
EVAL_CASES = [("lraspp", (65, 49), 2, np.float64), ("lraspp", (33, 47), 1, np.float64),
              ("lraspp", (17, 23), 1, np.float64), ("lraspp", (33, 47), 2, np.float32),
              ("deeplabv3", (65, 49), 1, np.float64), ("deeplabv3", (17, 23), 2, np.float64),
              ("deeplabv3", (33, 47), 1, np.float32)]


@pytest.mark.parametrize("case", EVAL_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-"
                                                          f"{np.dtype(c[3]).name}")
def test_eval_matches_torchvision(checkpoints, case):
    kind, size, batch, dtype = case
    compare(kind, checkpoints, dtype, size, training=False, batch=batch)


# Train mode, batch 3 for DeepLabV3. At batch 2 the batch norm of ASPP's pooled branch
# normalises two values per channel: its output is +-sqrt(var / (var + eps)) whatever its input,
# and its input gradient is the upstream one times eps / (var + eps), ~0. So at batch 2 nothing
# that flows back through that branch is tested, and what either library computes there in
# float32 is rounding noise (~1e-4 of the largest gradient) that reaches every backbone
# gradient. From 3 values per channel the gradient is real (the stronger test); torch float32
# and npmnv3 float32 both land ~3e-5 from the float64 truth.
TRAIN_BATCH = {"lraspp": 2, "deeplabv3": 3}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_train_matches_torchvision(checkpoints, kind, dtype):
    compare(kind, checkpoints, dtype, (41, 31), training=True, batch=TRAIN_BATCH[kind])


def test_fused_eval_path_equals_recorded_path(checkpoints):
    """model(x) (BN and ReLU fused, nothing recorded) == forward_intermediates' result."""
    x = randn(np.random.default_rng(3), (1, 3, 41, 37), np.float32)
    for kind in BUILDERS:
        model = ours_for(checkpoints[kind][1], np.float32, False)
        fast = model(x)
        slow, _ = model.forward_intermediates(x)
        for k in fast:
            judge(f"{kind} {k}", fast[k], slow[k])


def test_structure_matches_torchvision(checkpoints):
    for kind, (tv, _) in checkpoints.items():
        model = ours_for(checkpoints[kind][1], np.float32, False)
        assert [k for k, _, _ in model.layout] == list(tv.state_dict())
        assert model.module_names() == [n for n, _ in tv.named_modules()][1:]
        assert model.num_parameters() == sum(p.numel() for p in tv.parameters())
        assert (model.low_pos, model.high_pos) == (4, 16)
    assert npmnv3.lraspp_mobilenet_v3_large().num_parameters() == 3_221_538
    assert npmnv3.deeplabv3_mobilenet_v3_large(aux_loss=True).num_parameters() == 11_029_328


def test_bad_input_and_state_dict(checkpoints):
    model = npmnv3.lraspp_mobilenet_v3_large(num_classes=3, dtype=np.float64).eval()
    with pytest.raises(ValueError, match=r"input must be a non-empty array of shape "
                                         r"\(N, 3, H, W\), got shape \(1, 4, 8, 8\)"):
        model(np.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="input is float32 .* but the model is float64"):
        model(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(RuntimeError, match="forward pass first"):
        model.backward({"out": np.zeros((1, 3, 8, 8))})
    y = model(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"dout\['out'\] must have shape \(1, 3, 8, 8\)"):
        model.backward({"out": np.zeros((1, 3, 8, 9))})
    with pytest.raises(ValueError, match="backward takes a dict with 'out', got"):
        model.backward(y["out"])
    sd = npmnv3.load_pth(checkpoints["lraspp"][1])
    with pytest.raises(ValueError, match="classifier.low_classifier.weight: checkpoint "
                                         r"\(21, 40, 1, 1\) vs model \(3, 40, 1, 1\)"):
        model.load_state_dict(sd)
    with pytest.raises(ValueError, match="not an LR-ASPP or DeepLabV3"):
        segmentation_from_state_dict({"features.0.0.weight": np.zeros((16, 3, 3, 3))})
    with pytest.raises(ValueError, match="no auxiliary classifier"):
        npmnv3.nn.segmentation.SegmentationModel("lraspp", aux_loss=True)


def test_freeze_backbone_trains_the_head_only(checkpoints):
    """Backbone in eval mode (its statistics untouched), head in train mode: the heads'
    gradients equal torchvision's with ``backbone.eval()``, and nothing else gets one."""
    import torch

    tv, path = checkpoints["lraspp"]
    tv = copy.deepcopy(tv).double().train()
    tv.backbone.eval()
    model = ours_for(path, np.float64, True)
    before = model.state_dict()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 37, 29))
    out = model(x, freeze_backbone=True)["out"]
    dout = rng.standard_normal(out.shape)
    assert model.backward({"out": dout}) is None
    ref = run_torch(torch, tv, [x], {"out": dout}, "")
    judge("out", out, ref["out"]["out"])
    assert set(model.grads) == {k for k in ref["grads"] if k.startswith("classifier.")}
    judge_all("grad", model.grads, {k: ref["grads"][k] for k in model.grads}, None)
    after = model.state_dict()
    for k, v in before.items():
        moved = not np.array_equal(after[k], v)
        assert moved == (k.startswith("classifier.") and ("running" in k or "num_b" in k)), k
