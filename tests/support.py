"""Shared test helpers: tolerances, the torch gate, random data, and comparison asserts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from npmnv3.tools.compare import randomise  # noqa: F401  (the one BN/bias randomiser)
from npmnv3.tools.gradcheck import numerical_gradient, rel_error

# Tolerances, as max|ours - torch| / max|torch| over a whole tensor (npmnv3.rel_error).
# float32: different summation orders (BLAS/oneDNN vs NumPy/Numba) over sums of up to a few
# thousand terms move results by a few ulp (~1e-7 relative); 1e-5 leaves two decades of margin.
RTOL32 = 1e-5
# float64: the same reordering costs ~1e-16..1e-14; 1e-10 catches any real formula error.
RTOL64 = 1e-10
# Central differences in float64 with h = 1e-6: truncation O(h^2) plus rounding eps/h ~ 1e-10,
# relative to gradients of order one; 1e-6 is the usual bound for a correct backward.
RTOL_FD = 1e-6


def rtol_for(dtype) -> float:
    return RTOL32 if np.dtype(dtype) == np.float32 else RTOL64


def require(module: str):
    """Import a reference library (torch, torchvision, timm, ...) for a test: skip without it,
    but fail in CI (CI=true), where every reference test must run."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is required for the reference tests when CI=true "
                        f"(pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed: reference tests skipped "
                    f"(pip install -e '.[test]')")


def require_torch():
    """torch, with 2 threads (the machine's cores; the benchmarks use the same)."""
    torch = require("torch")
    torch.set_num_threads(2)
    return torch


def require_torchvision():
    require_torch()
    return require("torchvision")


def require_timm():
    require_torch()
    return require("timm")


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def assert_close(name, ours, ref, dtype, rtol=None):
    """Assert rel_error(ours, ref) <= rtol, naming the tensor and the max abs difference."""
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    assert ours.dtype == np.dtype(dtype), f"{name}: dtype {ours.dtype}, expected {dtype}"
    tol = rtol_for(dtype) if rtol is None else rtol
    err = rel_error(ours, ref)
    assert err <= tol, (f"{name}: relative error {err:.3e} > {tol:.0e} "
                        f"(max abs diff {np.abs(ours.astype(np.float64) - ref).max():.3e})")


def fd_check(name, forward, args, index, analytic, dout, rtol=RTOL_FD, h=1e-6):
    """Compare ``analytic`` with central differences of sum(forward(*args) * dout) wrt args[index].

    ``forward`` returns the output (first element if a tuple). args are float64 and are
    perturbed in place (a private copy is taken here).
    """
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]

    def f():
        out = forward(*args)
        out = out[0] if isinstance(out, tuple) else out
        return float(np.sum(out * dout))

    num = numerical_gradient(f, args[index], h=h)
    err = rel_error(analytic, num)
    assert err <= rtol, (f"{name}: finite-difference relative error {err:.3e} > {rtol:.0e} "
                        f"(max abs diff {np.abs(analytic - num).max():.3e})")


def calibrated_small(photos, path, seed: int = 2):
    """(torchvision mobilenet_v3_small in eval mode, ``path`` where its state_dict was
    ``torch.save``d) whose outputs depend on the image and whose top-5 are well separated.

    Random affine batch-norm parameters; running statistics measured on the photos (flipped
    too) and noise, as a calibration pass would, so that activations stay normalised (with
    made-up statistics every image gets the same logits). The classifier is drawn with std
    0.1 / 0.5 and no bias (torchvision's N(0, 0.01) would give nearly uniform probabilities,
    the top-5 order then decided by noise). Every random number comes from ``seed``.
    """
    torchvision = require_torchvision()
    import torch
    from PIL import Image
    from torchvision.models import MobileNet_V3_Small_Weights

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():           # the conv init draws from the global generator:
        torch.manual_seed(seed)             # seed it too, or the top-5 gaps vary run to run
        model = torchvision.models.mobilenet_v3_small()
    transform = MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.momentum = None               # running stats = average over the pass
                m.reset_running_stats()
        model.train()
        model(torch.cat([x, x.flip(3), 0.5 * torch.randn(4, 3, 224, 224, generator=g)]))
        for lin, std in ((model.classifier[0], 0.1), (model.classifier[3], 0.5)):
            lin.weight.copy_(std * torch.randn(lin.weight.shape, generator=g))
            lin.bias.zero_()
    torch.save(model.state_dict(), path)
    return model.eval(), path
