"""Post-training quantization against torch's eager PTQ of torchvision's quantizable model.

Observers and qparams are compared exactly (same float32 formula on the same data). The whole
pipeline is compared on the same float weights: torch folds batch norm and runs its float
forward with other summation orders than ours, so observed ranges differ by float32 rounding
(~1e-7 relative); everything downstream is held to what that can move.
"""

from __future__ import annotations

import numpy as np
import pytest

import npmnv3
from npmnv3.nn.ptq import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    affine_qparams,
    calibrate,
    folded_conv_bn,
    layer_errors,
    symmetric_scales,
)
from npmnv3.tools.qcompare import compare_quantized, numpy_state_dict, quantized_engine
from tests.support import RTOL32, randomise, require_torchvision

# Observed ranges come from two float32 forwards (torch's and ours) that differ by rounding,
# ~1e-7 relative; RTOL32 (1e-5) leaves two decades of margin. Scales follow the ranges.
RANGE_RTOL = RTOL32
# A folded weight may then land on the other side of a rounding tie: w / s_w within this of
# k + 1/2 (float32 rounding of W', s_w and the product, a few ulp of ~128) may round either way.
TIE_ATOL = 1e-4


def test_observers_and_qparams_equal_torch():
    require_torchvision()
    import torch
    from torch.ao.quantization import observer as tob
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 8, 5, 5)) * rng.uniform(0.1, 3) + rng.uniform(-1, 1))
               .astype(np.float32) for _ in range(5)]
    for ours, ref in ((MinMaxObserver(), tob.MinMaxObserver()),
                      (MovingAverageMinMaxObserver(), tob.MovingAverageMinMaxObserver())):
        for b in batches:
            ours.update(b)
            ref(torch.from_numpy(b))
        s, z = ref.calculate_qparams()
        assert ours.qparams() == (float(s), int(z)), type(ours).__name__
    for lo, hi in ((0.3, 2.0), (-5.0, -1.0), (-1e-3, 7.25), (0.0, 0.0)):   # all >= 0, all <= 0
        ref = tob.MinMaxObserver()
        ref(torch.tensor([lo, hi]))
        s, z = ref.calculate_qparams()
        assert affine_qparams(lo, hi) == (float(s), int(z)), (lo, hi)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    ref = tob.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    ref(torch.from_numpy(w))
    np.testing.assert_array_equal(symmetric_scales(np.abs(w.reshape(6, -1)).max(1)),
                                  ref.calculate_qparams()[0].numpy())


def torch_ptq(torch, tv_float, images, per_channel):
    """torch's eager PTQ: fuse, prepare, calibrate, convert. Returns ({module: (min, max)} of
    the calibrated observers, converted model)."""
    from torch.ao.quantization import QConfig
    from torch.ao.quantization import observer as tob
    m = tv_float
    m.eval()
    m.fuse_model(is_qat=False)
    weight = (tob.PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                     qscheme=torch.per_channel_symmetric)
              if per_channel else tob.MinMaxObserver.with_args(
                  dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    m.qconfig = QConfig(activation=tob.MinMaxObserver.with_args(dtype=torch.quint8), weight=weight)
    torch.ao.quantization.prepare(m, inplace=True)
    with torch.no_grad():
        for i in range(0, len(images), 4):
            m(torch.from_numpy(images[i:i + 4]))
    ranges = {n.replace(".activation_post_process", ""): (float(o.min_val), float(o.max_val))
              for n, o in m.named_modules() if isinstance(o, tob.MinMaxObserver)}
    torch.ao.quantization.convert(m, inplace=True)
    return ranges, m


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_matches_torch_post_training_quantization(per_channel):
    require_torchvision()
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
    from torchvision.models.quantization.mobilenetv3 import (
        QuantizableInvertedResidual,
        QuantizableMobileNetV3,
        _replace_relu,
    )
    rng = np.random.default_rng(1)
    images = rng.standard_normal((8, 3, 48, 48)).astype(np.float32)
    with quantized_engine("qnnpack") as torch:
        torch.manual_seed(0)
        setting, last = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
        tv = QuantizableMobileNetV3(setting, last, block=QuantizableInvertedResidual,
                                    num_classes=10)
        _replace_relu(tv)
        randomise(torch, tv, 4)
        ours_float = npmnv3.mobilenet_v3_small(num_classes=10, width_mult=0.5)
        ours_float.load_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})
        ranges, ref = torch_ptq(torch, tv, images, per_channel)
    obs = calibrate(ours_float, images, batch_size=4)
    ours = npmnv3.quantize(ours_float, images, per_channel=per_channel, batch_size=4)

    # the same tensors are observed (names, ranges), the same qparams follow from them
    assert set(obs) <= set(ranges), f"not observed by torch: {sorted(set(obs) - set(ranges))}"
    for n, o in obs.items():
        lo, hi = ranges[n]
        tol = RANGE_RTOL * (hi - lo)
        assert abs(o.min_val - lo) <= tol and abs(o.max_val - hi) <= tol, (n, o.min_val, lo,
                                                                          o.max_val, hi)
        assert o.qparams() == affine_qparams(o.min_val, o.max_val)
    # the same integer weights, except where W'/s_w sits on a rounding tie
    sd = numpy_state_dict(ref.state_dict())
    folded = folded_conv_bn(ours_float)
    for n, c in ours.convs.items():
        w = sd[f"{n}.weight"] if f"{n}.weight" in sd else \
            sd[f"{n}._packed_params._packed_params"][0]
        np.testing.assert_allclose(c.w_scale, np.broadcast_to(w.scale, c.w_scale.shape),
                                   rtol=RANGE_RTOL, err_msg=n)
        wf = folded[n[:-2]][0] if n[:-2] in folded else ours_float.params[f"{n}.weight"]
        t = wf.astype(np.float64) / c.w_scale.reshape((-1,) + (1,) * (wf.ndim - 1))
        differ = c.weight != w.int_repr
        assert np.all(np.abs(c.weight.astype(int) - w.int_repr)[differ] == 1), n
        assert np.all(np.abs(t - np.floor(t) - 0.5)[differ] < TIE_ATOL), f"{n}: not a tie"
    # and our kernels on torch's parameters give torch's integers (every module)
    mirror = npmnv3.quantized_mobilenet_v3_small(num_classes=10, width_mult=0.5)
    mirror.load_state_dict(sd)
    x = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)
    rows, logits, ref_logits = compare_quantized(mirror, ref, x)
    assert not [r for r in rows if r.differing], "kernels differ on torch's own PTQ model"
    np.testing.assert_array_equal(logits, ref_logits)
    assert np.all(np.isfinite(ours(x)))


def test_quantize_is_close_to_the_float_model_and_reports_layer_errors():
    rng = np.random.default_rng(2)
    model = npmnv3.mobilenet_v3_small(num_classes=10, width_mult=0.5, seed=0)
    images = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    for observer in ("minmax", "moving_average"):
        q = npmnv3.quantize(model, images, observer=observer)
        errors = layer_errors(model, q, images[:4])
        assert list(errors)[0] == "quant" and errors["quant"] < 0.01, errors["quant"]
        assert all(np.isfinite(v) for v in errors.values())
    with pytest.raises(ValueError, match="observer"):
        npmnv3.quantize(model, images, observer="histogram")
    with pytest.raises(ValueError, match="calibration images"):
        npmnv3.quantize(model, images[:, :1])
