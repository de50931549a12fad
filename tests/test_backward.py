"""model.backward: every parameter gradient and the input gradient vs torch autograd."""

import numpy as np
import pytest
from support import randomise, require_torchvision

import npmnv3

# Error of a gradient: max|ours - torch| / max(max|torch|, 1e-3 * largest gradient of the net).
# The floor matters for BN biases followed by a train-mode BN, whose exact gradient is 0 and
# whose computed value is rounding noise. float64: rounding only. float32: 10x torch's own
# float32-vs-float64 error on the same cases (~8e-5 train, ~2e-6 eval).
TOL = {(np.float64, True): 1e-10, (np.float64, False): 1e-10,
       (np.float32, True): 1e-3, (np.float32, False): 1e-4}

CASES = [("small", {}, (2, 3, 64, 48)), ("large", {}, (2, 3, 40, 56)),
         ("small", {"width_mult": 0.75}, (3, 3, 33, 45)),
         ("large", {"width_mult": 0.5, "reduced_tail": True, "dilated": True}, (2, 3, 37, 29))]


def torchvision_twin(arch, kw, dtype):
    torchvision = require_torchvision()
    import torch
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"mobilenet_v3_{arch}")(dropout=0.0, **kw)
    randomise(torch, tv, seed=0)
    ours = getattr(npmnv3, f"mobilenet_v3_{arch}")(dropout=0.0, dtype=dtype, **kw)
    ours.load_state_dict({k: v.numpy() for k, v in tv.state_dict().items()})
    return torch, (tv.double() if dtype == np.float64 else tv), ours


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_gradients_equal_autograd(case, train, dtype):
    arch, kw, shape = case
    torch, tv, ours = torchvision_twin(arch, kw, dtype)
    tv.train(train)
    ours.train(train)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    out = tv(xt)
    dlogits = rng.standard_normal(out.shape).astype(dtype)
    out.backward(torch.from_numpy(dlogits))
    logits = ours(x)                 # eval: the folded engine; backward replays through the blocks
    dx = ours.backward(dlogits)
    ref = {k: p.grad.numpy() for k, p in tv.named_parameters()}
    ours_g = dict(ours.named_grads())
    assert list(ours_g) == list(ref), "parameter names/order differ from torchvision"
    floor = 1e-3 * max(np.abs(g).max() for g in ref.values())
    tol = TOL[(dtype, train)]

    def err(a, b):
        return np.abs(a - b).max() / max(np.abs(b).max(), floor)

    assert err(logits, out.detach().numpy()) <= tol
    assert dx.shape == x.shape and dx.dtype == np.dtype(dtype)
    assert err(dx, xt.grad.numpy()) <= tol, f"input gradient error {err(dx, xt.grad.numpy())}"
    worst = max(ref, key=lambda k: err(ours_g[k], ref[k]))
    assert err(ours_g[worst], ref[worst]) <= tol, \
        f"{worst}: error {err(ours_g[worst], ref[worst]):.2e} > {tol:.0e}"


def test_gradients_accumulate_and_zero_grad():
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=5, dtype=np.float64, seed=0)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    d = np.random.default_rng(1).standard_normal((2, 5))
    model(x)
    model.backward(d)
    once = {k: g.copy() for k, g in model.named_grads()}
    model(x)
    model.backward(d)
    for k, g in model.named_grads():
        np.testing.assert_allclose(g, 2 * once[k], rtol=1e-12, atol=1e-300, err_msg=k)
    model.zero_grad()
    assert all(not g.any() for _, g in model.named_grads())


@pytest.mark.parametrize("impl", ["fast", "naive"])
def test_backward_without_input_gradient(impl):
    """input_grad=False returns None and leaves every parameter gradient exactly as it was."""
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=5, dtype=np.float64, seed=0,
                                      dropout=0.0)
    model.impl = impl
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 40))
    d = np.random.default_rng(1).standard_normal((2, 5))
    state = model.state_dict()
    model.forward(x)
    assert model.backward(d).shape == x.shape
    full = {k: g.copy() for k, g in model.named_grads()}
    model.load_state_dict(state)                 # the same running statistics again
    model.zero_grad()
    model.forward(x)
    assert model.backward(d, input_grad=False) is None
    for k, g in model.named_grads():
        np.testing.assert_array_equal(g, full[k], err_msg=k)


@pytest.mark.parametrize("impl", ["fast", "naive"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_recording_changes_no_number(train, impl):
    """forward_intermediates runs the same kernels as forward's reference path: bitwise the
    same logits, gradients and running statistics, with every module's output recorded."""
    results = []
    for record in (False, True):
        model = npmnv3.mobilenet_v3_large(width_mult=0.5, num_classes=7, seed=1, dropout=0.0)
        model.impl = "naive" if impl == "naive" else "fast"
        model.train(train)
        x = np.random.default_rng(0).standard_normal((2, 3, 41, 35)).astype(np.float32)
        d = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)
        if record:
            logits, outs = model.forward_intermediates(x)
            assert set(outs) == set(model.module_names()), "a module output is not recorded"
            np.testing.assert_array_equal(outs["classifier"], logits)
        else:                     # the blocks as forward runs them (in eval too, not the engine)
            logits, model._trace = model._forward_blocks(x, model._ctx())
        dx = model.backward(d)
        results.append((logits, dx, dict(model.named_grads()), model.state_dict()))
    (l1, dx1, g1, s1), (l2, dx2, g2, s2) = results
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(dx1, dx2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)


def test_backward_errors_and_no_grad():
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=5).eval()
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(RuntimeError, match="backward needs the forward it follows"):
        model.backward(np.zeros((1, 5), np.float32))          # no forward yet
    with npmnv3.no_grad():
        model(x)                                              # keeps nothing
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.zeros((1, 5), np.float32))
    model(x)
    with pytest.raises(ValueError, match=r"dlogits must have the logits' shape \(1, 5\)"):
        model.backward(np.zeros((2, 5), np.float32))
    model(x)
    assert model.backward(np.zeros((1, 5), np.float32)).shape == x.shape
    with pytest.raises(RuntimeError, match="releases"):       # one backward per forward
        model.backward(np.zeros((1, 5), np.float32))
    model(x)
    model.train()                                            # a change of state drops it
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="capture"):
        model(np.zeros((2, 3, 32, 32), np.float32))
        model.backward(np.zeros((2, 5), np.float32), capture={"features.3.block.0"})
