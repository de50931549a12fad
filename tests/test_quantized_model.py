"""The int8 model against torchvision's quantized MobileNetV3 on the qnnpack engine.

The reference models are built by the tests with torchvision (``npmnv3.tools.qcompare``):
QAT-prepared, batch norms randomised, observers calibrated on a few batches, converted. Every
module's output integers, scale and zero point must equal torch's, and so must the logits
(dequantized with the same float32 formula): the arithmetic is the same, so no step of
difference is allowed.
"""

from __future__ import annotations

import numpy as np
import pytest

import npmnv3
from npmnv3.tools.qcompare import compare_quantized, numpy_state_dict, torchvision_quantized
from tests.support import require_torchvision

BUILDERS = {"large": npmnv3.quantized_mobilenet_v3_large,
            "small": npmnv3.quantized_mobilenet_v3_small}


@pytest.fixture(scope="module", params=[("small", 1.0, 10), ("large", 1.0, 1000)],
                ids=["small-10", "large-1000"])
def reference(request, tmp_path_factory):
    """torchvision's converted model, saved with torch.save and read back with load_pth."""
    require_torchvision()
    import torch
    arch, width, classes = request.param
    model = torchvision_quantized(arch, engine="qnnpack", width_mult=width, num_classes=classes,
                                  image_size=64, seed=3)
    path = tmp_path_factory.mktemp("q") / f"quantized_{arch}.pth"
    torch.save(model.state_dict(), path)
    ours = BUILDERS[arch](num_classes=classes, width_mult=width)
    ours.load_state_dict(npmnv3.load_pth(path))
    return model, ours


def test_every_module_equals_torch_qnnpack(reference):
    model, ours = reference
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 48)).astype(np.float32)
    rows, logits, ref_logits = compare_quantized(ours, model, x, engine="qnnpack")
    names = {r.name for r in rows}
    missing = [n for n in ours.module_names() if n not in names]
    assert not missing, f"torch reported no output for {missing[:5]}"
    bad = [r for r in rows if r.differing or not r.same_qparams]
    total = sum(int(np.prod(r.shape)) for r in rows)
    assert not bad, (f"{len(bad)} modules differ from torch ({sum(r.differing for r in bad)} of "
                     f"{total} integers; first {bad[0]})")
    np.testing.assert_array_equal(logits, ref_logits, err_msg="dequantized logits")


def test_state_dict_round_trip_and_keys(reference):
    model, ours = reference
    sd = ours.state_dict()
    assert list(sd) == list(model.state_dict()), "keys or their order differ from torchvision's"
    again = npmnv3.QuantizedMobileNetV3(ours.config).load_state_dict(sd)
    x = np.random.default_rng(1).standard_normal((1, 3, 40, 40)).astype(np.float32)
    np.testing.assert_array_equal(again(x), ours(x))


def test_in_memory_state_dict_reads_as_the_file_does(reference):
    model, ours = reference
    again = npmnv3.QuantizedMobileNetV3(ours.config).load_state_dict(
        numpy_state_dict(model.state_dict()))
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(again(x), ours(x))


def test_naive_kernels_give_the_same_network():
    require_torchvision()
    model = torchvision_quantized("small", width_mult=0.5, num_classes=10, image_size=32, seed=5)
    ours = npmnv3.quantized_mobilenet_v3_small(num_classes=10, width_mult=0.5)
    ours.load_state_dict(numpy_state_dict(model.state_dict()))
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    fast = ours.forward_intermediates(x)[1]
    ours.impl = "naive"
    naive = ours.forward_intermediates(x)[1]
    for name, q in fast.items():
        np.testing.assert_array_equal(naive[name].int_repr, q.int_repr, err_msg=name)


def test_wrong_checkpoints_are_named():
    ours = npmnv3.quantized_mobilenet_v3_small(num_classes=10)
    float_sd = npmnv3.mobilenet_v3_small(num_classes=10).state_dict()
    with pytest.raises(ValueError, match="float MobileNetV3 state_dict"):
        ours.load_state_dict(float_sd)
    with pytest.raises(ValueError, match="QAT"):
        ours.load_state_dict({"features.0.0.weight_fake_quant.scale": np.ones(1)})
    with pytest.raises(ValueError, match="missing"):
        ours.load_state_dict({"quant.scale": np.ones(1)})
    with pytest.raises(ValueError, match="no weights"):
        ours(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("engine,observing", [("qnnpack", True), ("qnnpack", False),
                                              ("fbgemm", True)])
def test_qat_checkpoint_converts_as_torch_converts(engine, observing, tmp_path):
    """A QAT-prepared state_dict (the format of torchvision's published quantized weights),
    saved and read back, converted by npmnv3 and by torch.ao.quantization.convert: the same
    qparams and integer weights; on qnnpack the same integers everywhere."""
    require_torchvision()
    import torch

    from npmnv3.nn.qat import from_qat_state_dict
    from npmnv3.tools.qcompare import qat_prepared, quantized_engine
    kw = dict(engine=engine, width_mult=0.5, num_classes=10, seed=2)
    with quantized_engine(engine):
        m = qat_prepared("small", **kw)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(2):
                m(torch.randn(2, 3, 48, 48, generator=g))
        if not observing:                 # torchvision's recipe stops the observers late on
            m.apply(torch.ao.quantization.disable_observer)
        path = tmp_path / "qat.pth"
        torch.save(m.state_dict(), path)
        ref = qat_prepared("small", **kw)
        ref.load_state_dict(torch.load(path))
        torch.ao.quantization.convert(ref, inplace=True)      # in train mode, as torchvision
        ref.eval()
    ours = from_qat_state_dict(npmnv3.load_pth(path), reduce_range=engine != "qnnpack")
    assert ours.config == npmnv3.MobileNetV3Config("small", 0.5, num_classes=10)
    want = npmnv3.QuantizedMobileNetV3(ours.config).load_state_dict(
        numpy_state_dict(ref.state_dict()))
    assert ours.qparams == want.qparams
    for name, c in want.convs.items():
        np.testing.assert_array_equal(ours.convs[name].weight, c.weight, err_msg=name)
        np.testing.assert_array_equal(ours.convs[name].w_scale, c.w_scale, err_msg=name)
        np.testing.assert_array_equal(ours.convs[name].bias, c.bias, err_msg=name)
    if engine == "qnnpack":
        x = np.random.default_rng(4).standard_normal((1, 3, 48, 48)).astype(np.float32)
        rows, logits, ref_logits = compare_quantized(ours, ref, x)
        assert not [r for r in rows if r.differing], "integers differ from torch's"
        np.testing.assert_array_equal(logits, ref_logits)
    with pytest.raises(ValueError, match="QAT"):
        npmnv3.QuantizedMobileNetV3(ours.config).load_state_dict(npmnv3.load_pth(path))
