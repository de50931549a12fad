"""LR-ASPP, DeepLabV3 (ASPP) and FCN heads against torchvision's modules: every module's
output, the input and parameter gradients, running statistics; eval and train mode."""

import copy

import numpy as np
import pytest
from seg_support import dropout_masks, judge, judge_all, run_torch
from support import randn, randomise, require_torchvision

from npmnv3.nn.blocks import Ctx
from npmnv3.nn.seg_heads import DeepLabHead, FCNHead, LRASPPHead, init_head

# float64 in both modes; float32 in train mode, where rounding matters most (the model tests
# cover float32 eval)
MODES = [(np.float64, False), (np.float64, True), (np.float32, True)]
DROPOUTS = ("classifier.0.project.3", "aux_classifier.3")


def our_state(state, dtype):
    """torchvision's state_dict as ``p`` (parameters and buffers in the given dtype)."""
    return {k: (np.array(v, np.int64) if "num_batches" in k else v.astype(dtype))
            for k, v in state.items()}


def check_head(torch, head, tv_head, inputs, dtype, training, seed):
    """Ours and torchvision's head on the same weights, inputs and dropout masks (ours draws
    them, torch is made to use them): every module output, every gradient, the running
    statistics after the call. float32 is judged against torch in float64."""
    rng = np.random.default_rng(seed)
    randomise(torch, tv_head, seed)
    tv_head.train(training)
    n = head.name
    assert [k for k, _, _ in head.layout()] == [f"{n}.{k}" for k in tv_head.state_dict()]
    assert head.module_names() == [f"{n}.{m}" if m else n for m, _ in tv_head.named_modules()]
    state = {f"{n}.{k}": v.numpy().copy() for k, v in tv_head.state_dict().items()}
    record, updates = {}, ({} if training else None)
    ctx = Ctx(training, updates=updates, record=record, rng=np.random.default_rng(seed))
    out, cache = head.forward(*[a.astype(dtype) for a in inputs], our_state(state, dtype), ctx)
    dout = randn(rng, out.shape, np.float64)
    *dins, grads = head.backward(dout.astype(dtype), cache)
    masks = dropout_masks(record, DROPOUTS) if training else {}
    assert len(masks) == (training and sum(isinstance(m, torch.nn.Dropout)
                                           for m in tv_head.modules()))

    call = ((lambda m, low, high: m({"low": low, "high": high}))
            if isinstance(head, LRASPPHead) else None)
    truth = run_torch(torch, copy.deepcopy(tv_head).double(), inputs, {"out": dout}, n,
                      masks=masks, call=call)
    ref, f32 = truth, dtype == np.float32
    if f32:
        ref = run_torch(torch, copy.deepcopy(tv_head).float(), [a.astype(dtype) for a in inputs],
                        {"out": dout.astype(dtype)}, n, masks=masks, call=call)
    t = (lambda d: d) if f32 else (lambda d: None)
    judge("out", out, ref["out"]["out"], t(truth["out"]["out"]))
    judge_all("module", record, ref["outs"], t(truth["outs"]))
    for i, d in enumerate(dins):
        judge(f"d input {i}", d, ref["dinputs"][i], t(truth["dinputs"][i]))
    assert set(grads) == set(ref["grads"]), "a parameter gradient is missing or extra"
    judge_all("grad", grads, ref["grads"], t(truth["grads"]))
    for k, v in ref["state"].items():
        if "running" in k:
            judge(f"buffer {k}", updates[k] if training else state[k].astype(dtype), v,
                  t(truth["state"][k]))
        elif "num_batches" in k:
            assert int(updates[k] if training else state[k]) == int(v), f"buffer {k}"
    if not training:                  # the fused path (nothing recorded) gives the same output
        fused, _ = head.forward(*[a.astype(dtype) for a in inputs], our_state(state, dtype),
                                Ctx(False))
        judge("fused out", fused, ref["out"]["out"], t(truth["out"]["out"]))


@pytest.mark.parametrize("dtype, training", MODES)
def test_lraspp_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.lraspp import LRASPPHead as TV

    rng = np.random.default_rng(0)
    low, high = randn(rng, (2, 40, 9, 7), np.float64), randn(rng, (2, 960, 5, 4), np.float64)
    torch.manual_seed(1)                # the conv weights: the same whatever ran before
    check_head(torch, LRASPPHead(40, 960, 21), TV(40, 960, 21, 128), [low, high], dtype,
               training, seed=1)


@pytest.mark.parametrize("dtype, training", MODES)
def test_deeplab_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TV

    x = randn(np.random.default_rng(2), (2, 960, 5, 3), np.float64)
    torch.manual_seed(3)                # the conv weights: the same whatever ran before
    check_head(torch, DeepLabHead(960, 21), TV(960, 21), [x], dtype, training, seed=3)


@pytest.mark.parametrize("dtype, training", MODES)
def test_fcn_head(dtype, training):
    require_torchvision()
    import torch
    from torchvision.models.segmentation.fcn import FCNHead as TV

    x = randn(np.random.default_rng(4), (2, 40, 9, 7), np.float64)
    torch.manual_seed(5)                # the conv weights: the same whatever ran before
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
        head.forward(x, {**params, **buffers}, Ctx(True, updates={}))
    head.forward(x, {**params, **buffers}, Ctx(False))           # eval mode is fine
