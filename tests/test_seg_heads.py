"""LR-ASPP, DeepLabV3 (ASPP) and FCN heads against torchvision's modules: every module's
output, the input and parameter gradients, running statistics; eval and train mode."""

import copy

import numpy as np
import pytest
from seg_support import judge, run_torch
from support import randn, randomise, require_torchvision

from npmnv3.nn.seg_heads import DeepLabHead, FCNHead, LRASPPHead, Run, init_head

DTYPES = [np.float32, np.float64]


def our_state(state, dtype):
    params = {k: v.astype(dtype) for k, v in state.items() if "running" not in k
              and "num_batches" not in k}
    buffers = {k: (v.astype(dtype) if "running" in k else np.array(v, np.int64))
               for k, v in state.items() if k not in params}
    return params, buffers


def check_head(torch, head, tv_head, inputs, dtype, training, seed):
    """Ours and torchvision's head on the same weights, inputs and dropout masks: every
    module output, every gradient, the running statistics after the call."""
    rng = np.random.default_rng(seed)
    randomise(torch, tv_head, seed)
    tv_head.train(training)
    n = head.name
    assert [k for k, _, _ in head.layout()] == [f"{n}.{k}" for k in tv_head.state_dict()]
    assert head.module_names() == [f"{n}.{m}" if m else n for m, _ in tv_head.named_modules()]
    state = {f"{n}.{k}": v.numpy().copy() for k, v in tv_head.state_dict().items()}
    call = ((lambda m, low, high: m({"low": low, "high": high}))
            if isinstance(head, LRASPPHead) else None)
    inputs64 = [a.astype(np.float64) for a in inputs]
    dout64 = {"out": randn(rng, (inputs[0].shape[0], head.num_classes if hasattr(
        head, "num_classes") else head.channels) + inputs[0].shape[2:], np.float64)}
    torch.manual_seed(seed)
    truth = run_torch(torch, copy.deepcopy(tv_head).double(), inputs64, dout64, n, call=call)
    ref = truth
    if dtype == np.float32:
        ref = run_torch(torch, copy.deepcopy(tv_head).float(), [a.astype(dtype) for a in inputs],
                        {"out": dout64["out"].astype(dtype)}, n, masks=truth["masks"], call=call)
    assert len(ref["masks"]) == (training and sum(isinstance(m, torch.nn.Dropout)
                                                  for m in tv_head.modules()))
    params, buffers = our_state(state, dtype)
    run = Run(params, buffers, training, outs={}, masks=ref["masks"])
    out, cache = head.forward(run, *[a.astype(dtype) for a in inputs])
    t32 = dtype == np.float32
    judge("out", out, ref["out"]["out"], truth["out"]["out"] if t32 else None)
    for name in ref["outs"]:
        assert name in run.outs, f"module {name} not recorded"
        judge(name, run.outs[name], ref["outs"][name], truth["outs"][name] if t32 else None)
    *dins, grads = head.backward(dout64["out"].astype(dtype), cache)
    for i, d in enumerate(dins):
        judge(f"d input {i}", d, ref["dinputs"][i], truth["dinputs"][i] if t32 else None)
    assert set(grads) == set(ref["grads"]), "a parameter gradient is missing or extra"
    for k, g in grads.items():
        judge(f"grad {k}", g, ref["grads"][k], truth["grads"][k] if t32 else None)
    for k, v in ref["state"].items():
        if "running" in k:
            judge(f"buffer {k}", buffers[k], v, truth["state"][k] if t32 else None)
        elif "num_batches" in k:
            assert int(buffers[k]) == int(v), f"buffer {k}"
    if not training:                  # the fused path (nothing recorded) gives the same output
        fused, _ = head.forward(Run(*our_state(state, dtype), training),
                                *[a.astype(dtype) for a in inputs])
        judge("fused out", fused, ref["out"]["out"], truth["out"]["out"] if t32 else None)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lraspp_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.lraspp import LRASPPHead as TV

    rng = np.random.default_rng(0)
    low, high = randn(rng, (2, 40, 9, 7), np.float64), randn(rng, (2, 960, 5, 4), np.float64)
    check_head(torch, LRASPPHead(40, 960, 21), TV(40, 960, 21, 128), [low, high], dtype,
               training, seed=1)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deeplab_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TV

    x = randn(np.random.default_rng(2), (2, 960, 5, 3), np.float64)
    check_head(torch, DeepLabHead(960, 21), TV(960, 21), [x], dtype, training, seed=3)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fcn_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.fcn import FCNHead as TV

    x = randn(np.random.default_rng(4), (2, 40, 9, 7), np.float64)
    check_head(torch, FCNHead(40, 21), TV(40, 21), [x], dtype, training, seed=5)


def test_init_follows_torch_defaults():
    """Conv weights/biases ~ U(+-1/sqrt(fan_in)) like nn.Conv2d's reset_parameters, BN 1/0."""
    head = LRASPPHead(40, 960, 21)
    params, buffers = init_head(head, np.random.default_rng(0), np.float32)
    assert set(params) | set(buffers) == {k for k, _, _ in head.layout()}
    w = params["classifier.cbr.0.weight"]
    assert w.dtype == np.float32 and np.abs(w).max() <= 1 / np.sqrt(960)
    assert np.abs(w).max() > 0.9 / np.sqrt(960)                  # uniform up to the bound
    b = params["classifier.low_classifier.bias"]
    assert np.abs(b).max() <= 1 / np.sqrt(40) and np.abs(b).max() > 0
    assert (params["classifier.cbr.1.weight"] == 1).all()
    assert (buffers["classifier.cbr.1.running_var"] == 1).all()


def test_train_mode_pool_branch_needs_two_values():
    """ASPP's pooled branch has one value per channel and image: like torch, batch 1 in train
    mode is an error (batch norm needs more than one value per channel)."""
    head = DeepLabHead(16, 3, atrous_rates=(2,))
    params, buffers = init_head(head, np.random.default_rng(0), np.float64)
    x = np.random.default_rng(1).standard_normal((1, 16, 5, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        head.forward(Run(params, buffers, True), x)
    head.forward(Run(params, buffers, False), x)                 # eval mode is fine
