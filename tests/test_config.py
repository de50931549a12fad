"""Architecture as data: presets, width/tail/dilation rules, and stage_params configs."""

import json

import numpy as np
import pytest
from support import RTOL32, assert_close, randomise, require_torchvision

import npmnv3
from npmnv3.nn.arch import make_divisible, preset_spec

# torchvision's _make_divisible on the values MobileNetV3 feeds it
# (torchvision/models/mobilenetv3.py: InvertedResidualConfig.adjust_channels, the SE widths).
DIVISIBLE = {(16 * 0.75, 8): 16, (64 * 0.75, 8): 48, (72 // 4, 8): 24, (120 // 4, 8): 32,
             (16 // 4, 8): 8, (240 // 4, 8): 64, (144 // 4, 8): 40, (960 * 0.5, 8): 480,
             (1280 * 0.75, 8): 960, (8 * 0.35, 8): 8, (27, 8): 32, (12, 8): 16}


def test_make_divisible_matches_torchvision_values():
    for (v, d), want in DIVISIBLE.items():
        assert make_divisible(v, d) == want, (v, d)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_packaged_yaml_builds_exactly_the_preset(arch):
    from_yaml = npmnv3.mobilenet_v3_from_config(npmnv3.config_path(arch), seed=0)
    preset = getattr(npmnv3, f"mobilenet_v3_{arch}")(seed=0)
    assert from_yaml.spec == preset.spec
    assert from_yaml.layout == preset.layout
    for k, v in preset.state_dict().items():
        np.testing.assert_array_equal(from_yaml.state_dict()[k], v, err_msg=k)


def test_json_and_inline_lists_and_netspresso_model_config(tmp_path):
    import yaml
    data = yaml.safe_load(open(npmnv3.config_path("small")))
    p = tmp_path / "small.json"
    p.write_text(json.dumps(data))
    a = npmnv3.mobilenet_v3_from_config(p)
    b = npmnv3.mobilenet_v3_from_config(data["stage_params"], last_channel=1024)
    nested = {"model": {"architecture": {
        "backbone": {"name": "mobilenetv3", "params": {"stage_params": data["stage_params"]}},
        "head": {"name": "fc", "params": {"intermediate_channels": 1024}}}}}
    q = tmp_path / "netspresso.yaml"
    q.write_text(yaml.safe_dump(nested))
    c = npmnv3.mobilenet_v3_from_config(q)
    assert a.spec == b.spec == c.spec == npmnv3.mobilenet_v3_small().spec


def custom_stages():
    """A small user-defined network: two stages, SE, both activations, a dilated block."""
    return [
        {"in_channels": [16, 16], "kernel_sizes": [3, 5], "expanded_channels": [16, 48],
         "out_channels": [16, 24], "use_se": [True, False], "act_type": ["relu", "relu"],
         "stride": [2, 2]},
        {"in_channels": [24, 24], "kernel_sizes": [3, 5], "expanded_channels": [72, 96],
         "out_channels": [24, 32], "use_se": [False, True],
         "act_type": ["hard_swish", "hard_swish"], "stride": [1, 2], "dilation": [1, 2]},
    ]


def test_user_defined_config_matches_torchvision_built_from_the_same_rows():
    """torchvision's MobileNetV3 class built from the same InvertedResidualConfig rows."""
    require_torchvision()
    import torch
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    stages = custom_stages()
    ours = npmnv3.mobilenet_v3_from_config(stages, last_channel=128, num_classes=10, seed=1)
    rows = []
    for st in stages:
        for j in range(len(st["in_channels"])):
            rows.append(InvertedResidualConfig(
                st["in_channels"][j], st["kernel_sizes"][j], st["expanded_channels"][j],
                st["out_channels"][j], st["use_se"][j],
                {"relu": "RE", "hard_swish": "HS"}[st["act_type"][j]], st["stride"][j],
                st.get("dilation", [1] * 99)[j], 1.0))
    tv = MobileNetV3(rows, last_channel=128, num_classes=10).eval()
    randomise(torch, tv, seed=0)
    ours.load_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})
    assert ours.num_parameters() == sum(p.numel() for p in tv.parameters())
    x = np.random.default_rng(0).standard_normal((2, 3, 37, 29)).astype(np.float32)
    with torch.no_grad():
        ref = tv(torch.from_numpy(x))
    for impl in ("fast", "naive"):
        ours.eval().impl = impl
        assert_close(f"custom logits ({impl})", ours(x), ref, np.float32, RTOL32)
    ours.train()
    out = ours(x)                                   # train mode runs (batch statistics)
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s[0].update(out_channels=[16]), r"stage_params\[0\].*different lengths"),
    (lambda s: s[1].update(in_channels=[20, 24]), r"stage_params\[1\] block 0: in_channels 20 "
                                                  r"does not chain"),
    (lambda s: s[1].update(act_type=["hard_swish", "gelu"]), r"stage_params\[1\] block 1: "
                                                             r"unknown act_type 'gelu'"),
    (lambda s: s[0].pop("use_se"), r"stage_params\[0\] is missing the field 'use_se'"),
    (lambda s: s[0].update(stride=[3, 2]), r"stage_params\[0\] block 0: stride must be 1 or 2"),
    (lambda s: s[0].update(kernel_sizes=[4, 5]), r"block 0: kernel_sizes must be odd"),
    (lambda s: s[0].update(use_se=["yes", False]), r"block 0: use_se must be true or false"),
    (lambda s: s[0].update(colour=[1, 2]), r"stage_params\[0\]: unknown field"),
])
def test_invalid_configs_name_stage_and_field(mutate, message):
    stages = custom_stages()
    mutate(stages)
    with pytest.raises(ValueError, match=message):
        npmnv3.mobilenet_v3_from_config(stages, last_channel=128)


def test_missing_last_channel_and_empty_config(tmp_path):
    with pytest.raises(ValueError, match="last_channel"):
        npmnv3.mobilenet_v3_from_config(custom_stages())
    with pytest.raises(ValueError, match="non-empty list"):
        npmnv3.mobilenet_v3_from_config([], last_channel=8)
    p = tmp_path / "empty.yaml"
    p.write_text("foo: 1\n")
    with pytest.raises(ValueError, match="no stage_params"):
        npmnv3.mobilenet_v3_from_config(p)


def test_derived_rules():
    large = preset_spec("large")
    assert [i for i, b in enumerate(large.blocks, 1) if b.use_residual] == \
        [1, 3, 5, 6, 8, 9, 10, 12, 14, 15]
    assert [i for i, b in enumerate(preset_spec("small").blocks, 1) if b.use_residual] == \
        [3, 5, 6, 8, 10, 11]
    assert not large.blocks[0].has_expand and large.blocks[1].has_expand
    assert [b.se_channels for b in large.blocks if b.se] == [24, 32, 32, 120, 168, 168, 240, 240]
    dil = preset_spec("large", dilated=True)
    assert [(b.dw_stride, b.dilation, b.padding) for b in dil.blocks[-3:]] == \
        [(1, 2, 4), (1, 2, 4), (1, 2, 4)]
    assert not dil.blocks[-3].use_residual            # the configured stride 2 still counts
    assert preset_spec("small", width_mult=0.5).blocks[6].use_residual   # use_res_connect
    rt = preset_spec("large", reduced_tail=True)
    assert (rt.head_channels, rt.last_channel, rt.blocks[-3].exp) == (480, 640, 672)
    with pytest.raises(ValueError, match="width_mult"):
        preset_spec("large", width_mult=0)
