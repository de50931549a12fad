"""Helpers of the segmentation tests: run a torchvision module with every submodule's output
recorded and its dropout masks captured (or imposed), and judge float32 against float64.

float32 results are judged against the float64 truth (torchvision in float64 on the same
weights, inputs and dropout masks), never more tightly than torch's own float32 result is: the
tolerance is ``max(RTOL32, TORCH_ERROR_MARGIN * error of torch float32)``. That matters where
the problem itself is ill-conditioned: ASPP's pooled branch normalises (N, 256, 1, 1) in train
mode, two values per channel at batch 2, and its float32 gradients carry ~1e-5 of rounding in
torch as much as here.
"""

from __future__ import annotations

import numpy as np
from support import RTOL32, RTOL64, rel_error

# Two implementations summing in different orders land at comparable, not equal, distances from
# the truth; 4x torch's own distance separates that from a real error (which is O(1)).
TORCH_ERROR_MARGIN = 4.0


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
            if isinstance(out, torch.Tensor):
                outs[full] = out.detach().clone()
            else:
                outs.update({f"{full}[{k}]": v.detach().clone() for k, v in out.items()})
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


def judge(name, ours, ref, truth=None):
    """float64: rel_error(ours, ref) <= RTOL64. float32: ours is compared with the float64
    ``truth``, tolerance max(RTOL32, TORCH_ERROR_MARGIN * torch float32's own error)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != reference {ref.dtype}"
    if ours.dtype == np.float64 or truth is None:
        tol = RTOL64 if ours.dtype == np.float64 else RTOL32
        err = rel_error(ours, ref)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
        return err
    err, torch_err = rel_error(ours, truth), rel_error(ref, truth)
    tol = max(RTOL32, TORCH_ERROR_MARGIN * torch_err)
    assert err <= tol, (f"{name}: relative error {err:.3e} vs float64 > {tol:.1e} "
                        f"(torch float32: {torch_err:.1e})")
    return err
