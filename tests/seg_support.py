"""Helpers of the segmentation tests: run a torchvision module with every submodule's output
recorded and its dropout masks captured (or imposed), and judge float32 against float64.

float32 results are judged against the float64 truth (torchvision in float64 on the same
weights, inputs and dropout masks), never more tightly than torch's own float32 result is: the
tolerance is ``max(RTOL32, TORCH_ERROR_MARGIN * error of torch float32)``. That matters where
the problem itself is ill-conditioned: ASPP's pooled branch normalises (N, 256, 1, 1) in train
mode, N values per channel, and its float32 gradients carry ~3e-5 of rounding at batch 3 in
torch as much as here (at batch 2 the exact gradient there is ~0: test_segmentation.TRAIN_BATCH).
"""

from __future__ import annotations

import numpy as np
from support import RTOL32, RTOL64, rel_error

# Two implementations summing in different orders land at comparable, not equal, distances from
# the truth; 4x torch's own distance separates that from a real error (which is O(1)).
TORCH_ERROR_MARGIN = 4.0


def dropout_masks(record: dict, names) -> dict:
    """The masks our forward drew, read off its records: each Dropout module's output and its
    input (the output of the module before it, whose name ends in the previous index); True
    where the input was 0 (any value gives the same gradients there)."""
    masks = {}
    for name in names:
        if name in record:
            before = name[:-1] + str(int(name[-1]) - 1)
            masks[name] = (record[name] != 0) | (record[before] == 0)
    return masks


def run_torch(torch, module, inputs, dout, prefix, *, masks=None, call=None):
    """Forward ``module`` on ``inputs`` (numpy arrays; gradients wanted for all), backward with
    ``dout`` ({output name: array}); ``call(module, *tensors)``, if given, replaces
    ``module(*tensors)``. Returns a dict: ``out``, ``outs`` (every named submodule's output,
    copied: in-place ReLUs would overwrite BN outputs), ``masks`` (each Dropout's mask in train
    mode: the one imposed if ``masks`` is given, else the one torch drew; True where the input
    was 0, since any value gives the same gradients there), ``dinputs``, ``grads`` (by
    ``prefix.name``) and ``state`` (the state_dict after the call, by ``prefix.name``)."""
    outs, drawn, handles = {}, {}, []
    for name, m in module.named_modules():
        full = f"{prefix}.{name}" if name and prefix else (name or prefix)

        def hook(mod, inp, out, full=full):
            if isinstance(mod, torch.nn.Dropout) and mod.training:
                if masks is not None:
                    keep = torch.from_numpy(masks[full])
                    out = inp[0] * keep / (1 - mod.p)
                drawn[full] = ((out != 0) | (inp[0] == 0)).numpy()
            if isinstance(out, torch.Tensor):          # (not IntermediateLayerGetter's dict)
                outs[full] = out.detach().clone()
            return out
        handles.append(m.register_forward_hook(hook))
    ts = [torch.from_numpy(np.array(a)).requires_grad_() for a in inputs]
    try:
        ref = call(module, *ts) if call else module(*ts)
    finally:
        for h in handles:
            h.remove()
    refs = ref if isinstance(ref, dict) else {"out": ref}
    dsum = sum((r * torch.from_numpy(dout[k])).sum() for k, r in refs.items())
    dsum.backward()
    pre = f"{prefix}." if prefix else ""
    return {"out": {k: v.detach().numpy() for k, v in refs.items()},
            "outs": {k: v.numpy() for k, v in outs.items()}, "masks": drawn,
            "dinputs": [t.grad.numpy() for t in ts],
            "grads": {pre + k: p.grad.numpy() for k, p in module.named_parameters()},
            "state": {pre + k: v.numpy().copy() for k, v in module.state_dict().items()}}


# Gradients are judged relative to max(their own largest value, GRAD_FLOOR * the largest
# gradient of the network): a BN bias followed by a train-mode BN has the exact gradient 0, and
# what is computed there is rounding noise (as in tests/test_backward.py).
GRAD_FLOOR = 1e-3


def _err(a, b, floor):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor, 1e-300))


def judge(name, ours, ref, truth=None, floor=0.0, torch_err=None):
    """float64: error(ours, ref) <= RTOL64. float32: ours is compared with the float64
    ``truth``, tolerance max(RTOL32, TORCH_ERROR_MARGIN * torch float32's own error), that error
    being ``torch_err`` if given (the worst over a group of tensors) else this tensor's. The
    error is max |difference| / max(max |reference|, ``floor``); returns it."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    if ours.dtype == np.float64 or truth is None:
        tol = RTOL64 if ours.dtype == np.float64 else RTOL32
        err = _err(ours, ref, floor) if floor else rel_error(ours, ref)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
        return err
    err = _err(ours, truth, floor)
    torch_err = _err(ref, truth, floor) if torch_err is None else torch_err
    tol = max(RTOL32, TORCH_ERROR_MARGIN * torch_err)
    assert err <= tol, (f"{name}: relative error {err:.3e} vs float64 > {tol:.1e} "
                        f"(torch float32: {torch_err:.1e})")
    return err


def judge_all(what, ours: dict, ref: dict, truth: dict | None, floor=0.0) -> float:
    """``judge`` every tensor of ``ref`` (a dict by name); in float32 each is allowed
    TORCH_ERROR_MARGIN times torch's worst float32 error over the whole group (the tensors of
    one kind: all module outputs, or all parameter gradients), since where one tensor's rounding
    lands is luck. Returns the worst error."""
    missing = set(ref) - set(ours)
    assert not missing, f"{what}: not computed: {sorted(missing)[:5]}"
    group = None
    if truth is not None:
        group = max(_err(ref[k], truth[k], floor) for k in ref)
    return max(judge(f"{what} {k}", ours[k], ref[k], None if truth is None else truth[k],
                     floor, group) for k in ref)
