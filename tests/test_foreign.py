"""Other libraries' checkpoints (timm, mmpretrain, netspresso-trainer) under torchvision's keys.

The key maps of ``npmnv3.io.foreign`` are derived by rules from the module tree; here they are
checked against the maps recorded from the real libraries (``shared/reference``, when present),
against timm itself (logits of a timm model with random weights and batch-norm state, loaded
with timm's eps 1e-5), and by round trips through mmpretrain's and netspresso-trainer's names.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
from support import RTOL32, RTOL64, randomise, require_timm, require_torch, require_torchvision

import npmnv3
from npmnv3.io.convert import convert
from npmnv3.io.foreign import (
    BN_EPS,
    SOURCES,
    from_torchvision,
    key_map,
    stage_positions,
    to_torchvision,
)
from npmnv3.io.load import load_model, read_weights
from npmnv3.io.npz import META_KEY, load_npz
from npmnv3.io.pth import CheckpointError
from npmnv3.nn.arch import load_stage_params, preset_spec
from npmnv3.nn.config import MobileNetV3Config
from npmnv3.tools.gradcheck import rel_error

# The key maps recorded from timm and netspresso-trainer themselves (the project's reference
# folder, copied here so that the tests carry their own evidence).
KEYMAPS = Path(__file__).resolve().parent / "data" / "keymaps"
TIMM_NAMES = {"large": "mobilenetv3_large_100", "small": "mobilenetv3_small_100"}
N_KEYS = {"large": 312, "small": 244}


def tv_state_dict(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-layout state_dict with random values everywhere (so that a permutation of
    tensors of equal shape would show)."""
    rng = np.random.default_rng(seed)
    sd = npmnv3.mobilenet_v3_large() if arch == "large" else npmnv3.mobilenet_v3_small()
    return {k: (np.array(int(rng.integers(1, 1000)), np.int64) if k.endswith("tracked")
                else rng.standard_normal(v.shape).astype(np.float32))
            for k, v in sd.state_dict().items()}


def assert_same(ours: dict, ref: dict):
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
        assert np.array_equal(ours[k], v), k


# ----------------------------------------------------------------------------- the rules


def read_map_file(source: str, arch: str):
    name = {"timm": "timm", "netspresso-trainer": "netspresso"}[source]
    path = KEYMAPS / f"map_torchvision_to_{name}_{arch}.txt"
    assert path.is_file(), f"{path} is missing from the repository"
    rows = []
    for line in path.read_text().splitlines():
        tv, tv_shape, arrow, key, shape = line.split("\t")
        assert arrow == "->"
        rows.append((tv, ast.literal_eval(tv_shape), key, ast.literal_eval(shape)))
    return rows


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("source", ["timm", "netspresso-trainer"])
def test_rule_maps_equal_the_recorded_maps(source, arch):
    rows = read_map_file(source, arch)
    assert len(rows) == N_KEYS[arch]
    kmap = key_map(source, preset_spec(arch))
    assert list(kmap.items()) == [(tv, key) for tv, _, key, _ in rows]
    tv_sd = tv_state_dict(arch)
    assert [v.shape for v in tv_sd.values()] == [s for _, s, _, _ in rows]
    foreign = from_torchvision(tv_sd, source)                       # shapes as the library's
    assert [(k, v.shape) for k, v in foreign.items()] == [(key, s) for _, _, key, s in rows]


@pytest.mark.parametrize("arch", ["large", "small"])
def test_netspresso_stages_are_the_shipped_configs(arch):
    """netspresso-trainer's stages (REFERENCE §4.4: Large [3,3,6,3], Small [1,2,5,3]) are the
    stage_params of the packaged configs, with the final conv appended to the last stage."""
    stages, _ = load_stage_params(npmnv3.config_path(arch))
    want = [(s, b) for s, st in enumerate(stages) for b in range(len(st["in_channels"]))]
    want.append((len(stages) - 1, len(stages[-1]["in_channels"])))
    assert stage_positions("netspresso-trainer", preset_spec(arch)) == want


def test_timm_stages():
    """timm's arch strings: Large stages [1,2,3,4,2,3,1], Small [1,2,3,2,3,1]."""
    for arch, sizes in (("large", [1, 2, 3, 4, 2, 3, 1]), ("small", [1, 2, 3, 2, 3, 1])):
        pos = stage_positions("timm", preset_spec(arch))
        assert [sum(s == i for s, _ in pos) for i in range(len(sizes))] == sizes


@pytest.mark.parametrize("arch, last", [("large", 16), ("small", 12)])
def test_mmpretrain_names(arch, last):
    """Spot checks against REFERENCE §4.2 (no recorded map file for mmpretrain)."""
    kmap = key_map("mmpretrain", preset_spec(arch))
    assert kmap["features.0.0.weight"] == "backbone.layer0.conv.weight"
    assert kmap["features.0.1.running_var"] == "backbone.layer0.bn.running_var"
    assert kmap["features.1.block.0.0.weight"] == "backbone.layer1.depthwise_conv.conv.weight"
    assert kmap["features.2.block.0.0.weight"] == "backbone.layer2.expand_conv.conv.weight"
    assert kmap["features.2.block.1.1.bias"] == "backbone.layer2.depthwise_conv.bn.bias"
    assert kmap["features.2.block.2.0.weight"] == "backbone.layer2.linear_conv.conv.weight"
    assert kmap["features.4.block.2.fc1.bias"] == "backbone.layer4.se.conv1.conv.bias"
    assert kmap["features.4.block.2.fc2.weight"] == "backbone.layer4.se.conv2.conv.weight"
    assert kmap["features.4.block.3.1.weight"] == "backbone.layer4.linear_conv.bn.weight"
    assert kmap[f"features.{last}.0.weight"] == f"backbone.layer{last}.conv.weight"
    assert kmap[f"features.{last}.1.num_batches_tracked"] == \
        f"backbone.layer{last}.bn.num_batches_tracked"
    assert kmap["classifier.0.weight"] == "head.layers.0.fc.weight"
    assert kmap["classifier.3.bias"] == "head.layers.1.fc.bias"
    assert not any("expand_conv" in k for k in kmap.values() if k.startswith("backbone.layer1."))
    if arch == "small":                                  # SE in the first (no-expand) block
        assert kmap["features.1.block.1.fc1.weight"] == "backbone.layer1.se.conv1.conv.weight"
    assert len(set(kmap.values())) == len(kmap) == N_KEYS[arch]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("source", SOURCES)
def test_round_trip_gives_torchvision_keys_and_values(source, arch):
    tv_sd = tv_state_dict(arch, seed=3)
    foreign = from_torchvision(tv_sd, source)
    assert not set(foreign) & set(tv_sd) or source == "timm"      # timm's 'classifier.*'
    back, info = to_torchvision(foreign)                            # source recognised
    assert_same(back, tv_sd)
    assert info == {"source": source, "bn_eps": BN_EPS[source], "tensors": N_KEYS[arch],
                    "config": MobileNetV3Config(arch)}
    assert to_torchvision(foreign, source)[0].keys() == tv_sd.keys()
    nbt = {k: v for k, v in foreign.items() if not k.endswith("num_batches_tracked")}
    back, _ = to_torchvision(nbt)                                   # older checkpoints
    assert list(back) == [k for k in tv_sd if not k.endswith("num_batches_tracked")]


@pytest.mark.parametrize("arch", ["large", "small"])
@pytest.mark.parametrize("source", ["timm", "netspresso-trainer"])
def test_recorded_maps_convert_to_torchvision(source, arch):
    """A state_dict named by the recorded map (not by our rules) maps back exactly."""
    rows = read_map_file(source, arch)
    tv_sd = tv_state_dict(arch, seed=5)
    foreign = {key: tv_sd[tv].reshape(shape) for tv, _, key, shape in rows}
    back, info = to_torchvision(foreign)
    assert info["source"] == source
    assert_same(back, tv_sd)


def test_other_variants_and_netspresso_regrouped_stages():
    tv = npmnv3.mobilenet_v3_large(width_mult=0.75, reduced_tail=True, num_classes=10)
    sd = tv.state_dict()
    for source in SOURCES:
        back, info = to_torchvision(from_torchvision(sd, source))
        assert_same(back, sd)
        assert info["config"] == MobileNetV3Config("large", width_mult=0.75, reduced_tail=True,
                                                   num_classes=10)
    # netspresso-trainer with the same 15 blocks in two stages of 7 and 8 (a user config)
    spec = preset_spec("large")
    pos = [(0, i) for i in range(7)] + [(1, i) for i in range(9)]
    sd = tv_state_dict("large")
    foreign = {key_map("netspresso-trainer", spec, pos)[k]: v for k, v in sd.items()}
    assert "backbone.stages.1.8.block.conv.weight" in foreign             # the final conv
    assert_same(to_torchvision(foreign)[0], sd)


# ----------------------------------------------------------------------------- errors


def test_partial_and_unknown_checkpoints_are_refused():
    foreign = from_torchvision(tv_state_dict("small"), "mmpretrain")
    partial = dict(foreign)
    del partial["backbone.layer5.depthwise_conv.conv.weight"]
    del partial["head.layers.1.fc.bias"]
    partial["backbone.layer5.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        to_torchvision(partial)
    msg = str(e.value)
    assert "not a complete mmpretrain MobileNetV3 checkpoint" in msg
    assert "keys that did not map (1): backbone.layer5.extra.weight" in msg
    assert ("keys missing (2): backbone.layer5.depthwise_conv.conv.weight, "
            "head.layers.1.fc.bias") in msg
    backbone_only = {k: v for k, v in foreign.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match=r"keys missing \(4\): head\.layers\.0\.fc\.weight"):
        to_torchvision(backbone_only)
    with pytest.raises(ValueError, match="did not map"):             # wrong source named
        to_torchvision(foreign, "timm")
    with pytest.raises(ValueError, match="in no known style"):
        to_torchvision(tv_state_dict("small"))
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        to_torchvision(foreign, "keras")
    timm = from_torchvision(tv_state_dict("small"), "timm")
    timm["conv_head.weight"] = np.zeros((1024, 576, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv_head\.weight: expected a 1x1 conv"):
        to_torchvision(timm)


# ----------------------------------------------------------------------------- convert


def save_torch(torch, sd: dict, path: Path, wrap: bool = False):
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    obj = {"meta": {"mmpretrain_version": "1.2.0", "epoch": 3}, "state_dict": tensors} \
        if wrap else tensors
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("source", SOURCES)
def test_convert_records_source_and_eps(source, tmp_path):
    torch = require_torch()
    tv_sd = tv_state_dict("small", seed=7)
    src = save_torch(torch, from_torchvision(tv_sd, source), tmp_path / "f.pth",
                     wrap=source == "mmpretrain")
    meta = convert(src, tmp_path / "f.npz")
    assert meta["source_format"] == source and meta["bn_eps"] == BN_EPS[source]
    assert meta["arch"]["arch"] == "small" and meta["num_parameters"] == 2_542_856
    sd, meta2 = load_npz(tmp_path / "f.npz")
    assert meta2 == meta
    assert_same(sd, tv_sd)                                      # the .npz has torchvision keys
    model = load_model(tmp_path / "f.npz")
    assert model.bn_eps == BN_EPS[source] and not model.training
    assert load_model(src).bn_eps == BN_EPS[source]            # the .pth directly
    w = read_weights(src)
    assert (w.source_format, w.bn_eps, w.config) == (source, BN_EPS[source],
                                                     MobileNetV3Config("small"))
    meta = convert(src, tmp_path / "g.npz", source=source, bn_eps=1e-5)   # given explicitly
    assert meta["source_format"] == source and meta["bn_eps"] == 1e-5
    assert load_model(tmp_path / "g.npz", dtype=np.float64).bn_eps == 1e-5


def test_convert_foreign_errors_leave_no_file(tmp_path):
    torch = require_torch()
    tv_sd = tv_state_dict("small")
    foreign = from_torchvision(tv_sd, "netspresso-trainer")
    del foreign["backbone.stages.2.1.block.2.fc1.bias"]
    src = save_torch(torch, foreign, tmp_path / "p.pth")
    with pytest.raises(CheckpointError, match=r"(?s)p\.pth: not a complete netspresso-trainer .*"
                                              r"backbone\.stages\.2\.1\.block\.2\.fc1\.bias"):
        convert(src, tmp_path / "p.npz")
    tv = save_torch(torch, tv_sd, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="the keys are torchvision's, not timm's"):
        convert(tv, tmp_path / "p.npz", source="timm")
    with pytest.raises(ValueError, match="source must be one of"):
        convert(tv, tmp_path / "p.npz", source="tf")
    with pytest.raises(ValueError, match="bn_eps must be a number"):
        convert(tv, tmp_path / "p.npz", bn_eps=0)
    assert sorted(os.listdir(tmp_path)) == ["p.pth", "tv.pth"]
    meta = convert(tv, tmp_path / "tv.npz", source="torchvision")
    assert meta["source_format"] == "torchvision" and meta["bn_eps"] == 1e-3


def test_npz_without_eps_entries_reads_as_torchvision(tmp_path):
    """Format version 1 files, some written before source_format/bn_eps existed: no
    classes, preprocessing or arch.dropout either."""
    torch = require_torch()
    convert(save_torch(torch, tv_state_dict("small"), tmp_path / "a.pth"), tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop(META_KEY).tobytes())
    for k in ("source_format", "bn_eps", "classes", "preprocessing"):
        del meta[k]
    del meta["arch"]["dropout"]
    meta["format_version"] = 1
    np.savez(tmp_path / "old.npz", **arrays,
             **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    _, meta = load_npz(tmp_path / "old.npz")
    assert meta["source_format"] == "torchvision" and meta["bn_eps"] == 1e-3
    assert load_model(tmp_path / "old.npz").bn_eps == 1e-3


# ----------------------------------------------------------------------------- against timm


def calibrate(torch, model, seed: int):
    """``randomise``, then running statistics estimated on a random batch (a cumulative
    average over one train-mode forward) and random ``num_batches_tracked``.

    With random running statistics timm's models (whose depthwise convs are initialised with
    fan_out = k*k, not k*k*C as torch's kaiming init counts) reach activations of ~5e3 and
    logits of ~1e3, and timm's own float32 logits differ from its float64 ones by up to 1.5e-4
    relative, more than the float32 tolerance; with data-like statistics by ~1e-6."""
    randomise(torch, model, seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 128, 128, generator=g))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=g)))
    return model.eval()


@pytest.mark.parametrize("arch", ["large", "small"])
def test_timm_checkpoint_gives_timm_logits(arch, tmp_path):
    torch, timm = require_torch(), require_timm()
    torch.manual_seed(0)
    tm = calibrate(torch, timm.create_model(TIMM_NAMES[arch], pretrained=False), seed=1)
    assert all(m.eps == 1e-5 for m in tm.modules() if isinstance(m, torch.nn.BatchNorm2d))
    src = tmp_path / f"{TIMM_NAMES[arch]}.pth"
    torch.save(tm.state_dict(), src)
    meta = convert(src, tmp_path / "t.npz")                           # source recognised
    assert meta["source_format"] == "timm" and meta["bn_eps"] == 1e-5
    assert meta["arch"]["arch"] == arch
    assert meta["num_parameters"] == sum(p.numel() for p in tm.parameters())

    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224))
    with torch.no_grad():
        ref32 = tm(torch.from_numpy(x.astype(np.float32))).numpy()
    for dtype, tol in ((np.float32, RTOL32), (np.float64, RTOL64)):
        ref_model = tm if dtype == np.float32 else tm.double()
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x.astype(dtype))).numpy()
        model = load_model(tmp_path / "t.npz", dtype=dtype)
        assert model.bn_eps == 1e-5
        ours = model(x.astype(dtype))                                     # fused eval path
        err = rel_error(ours, ref)
        print(f"timm {arch} {np.dtype(dtype).name}: fused rel. error {err:.2e}")
        assert ours.dtype == dtype and err <= tol, (arch, dtype, err)
        if dtype == np.float64:                                           # reference path too
            ours = model.forward_intermediates(x)[0]
            err = rel_error(ours, ref)
            print(f"timm {arch} float64: reference path rel. error {err:.2e}")
            assert err <= tol, (arch, "reference path", err)
    # float32 against the float64 result: ours is as close as timm's own float32 logits
    err32 = rel_error(load_model(tmp_path / "t.npz")(x.astype(np.float32)), ref)
    print(f"timm {arch}: npmnv3 float32 vs timm float64 {err32:.2e}, timm float32 vs float64 "
          f"{rel_error(ref32, ref):.2e}")
    assert err32 <= RTOL32
    # with torchvision's eps the logits are measurably off: eps matters for these weights
    wrong = npmnv3.MobileNetV3(MobileNetV3Config.from_dict(meta["arch"]), dtype=np.float64)
    wrong.load_state_dict(load_npz(tmp_path / "t.npz")[0])
    assert rel_error(wrong.eval()(x), ref) > 1e3 * RTOL64


def test_finetuned_timm_weights_reload_with_their_eps(tmp_path):
    """timm-converted -> one SGD step -> save_weights -> load_model: the eps (1e-5) travels with
    the weights, so the reloaded model's float64 logits equal the fine-tuned model's exactly
    (with torchvision's 1e-3 they would not)."""
    torch, timm = require_torch(), require_timm()
    torch.manual_seed(0)
    tm = calibrate(torch, timm.create_model(TIMM_NAMES["small"], pretrained=False), seed=2)
    src = tmp_path / "timm.pth"
    torch.save(tm.state_dict(), src)
    model = load_model(src, dtype=np.float64).train()
    assert model.bn_eps == 1e-5
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 64, 64))
    loss, cache = npmnv3.kernels.cross_entropy_forward(model(x), np.array([1, 5, 7, 1]))
    model.backward(npmnv3.kernels.cross_entropy_backward(1.0, cache))
    npmnv3.optim.SGD(model, lr=0.1, momentum=0.9).step()
    before = model.eval()(x)
    npmnv3.save_weights(tmp_path / "ft.npz", model)
    again = load_model(tmp_path / "ft.npz", dtype=np.float64)
    assert again.bn_eps == 1e-5 and again.config == model.config
    np.testing.assert_array_equal(again(x), before)
    wrong = npmnv3.MobileNetV3(again.config, dtype=np.float64)
    wrong.load_state_dict(again.state_dict())
    assert rel_error(wrong.eval()(x), before) > 1e3 * RTOL64


def test_mmpretrain_checkpoint_gives_torchvision_logits(tmp_path):
    """mmpretrain's converted checkpoints are torchvision's weights (eps 1e-3 on both sides)."""
    torch, torchvision = require_torch(), require_torchvision()
    tv = torchvision.models.mobilenet_v3_small()
    randomise(torch, tv, seed=4)
    tv.eval()
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    src = save_torch(torch, from_torchvision(sd, "mmpretrain"), tmp_path / "mm.pth", wrap=True)
    meta = convert(src, tmp_path / "mm.npz")
    assert meta["source_format"] == "mmpretrain" and meta["bn_eps"] == 1e-3
    x = np.random.default_rng(3).standard_normal((1, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = tv(torch.from_numpy(x)).numpy()
    assert rel_error(load_model(tmp_path / "mm.npz")(x), ref) <= RTOL32
