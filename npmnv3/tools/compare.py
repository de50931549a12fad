"""Module-by-module comparison of an npmnv3 model with torchvision's, to find where they part.

``compare_with_torchvision(model, tv_model, x)`` runs both in eval mode on the same input and
returns one ``CompareRow`` per module, in the order torchvision's modules finish their forward
(children before their parent, so the first row over tolerance is the innermost module where
the two disagree). torchvision's outputs are captured with forward hooks and cloned at once:
ReLU/Hardswish run in place, and so does the residual add (``result += input``), which would
otherwise rewrite outputs already captured. npmnv3's come from ``model.forward_intermediates``.

torch is imported only inside the functions that need it; the rest of npmnv3 never imports it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..nn.config import MobileNetV3Config
from ..nn.model import MobileNetV3

# max|ours - torch| / max|torch| per module. float32: different summation orders (oneDNN vs
# NumPy/Numba) move results by a few ulp, ~1e-7 relative; 1e-5 leaves two decades of margin.
TOL32 = 1e-5
# float64: reordering costs ~1e-16..1e-14; 1e-10 still catches any real formula error.
TOL64 = 1e-10
TORCH_NEEDED = "npmnv3 compare needs torch and torchvision (pip install -e '.[test]')"


class CompareRow(NamedTuple):
    name: str
    shape: tuple
    max_abs: float            # max |ours - torch|
    max_rel: float            # max |ours - torch| / max |torch|
    tol: float
    note: str = ""            # "missing in npmnv3", "shape ...": compared nothing

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol


def tolerance_for(dtype) -> float:
    return TOL32 if np.dtype(dtype) == np.float32 else TOL64


def _diff(name, ours, ref: np.ndarray, tol) -> CompareRow:
    if ours is None:
        return CompareRow(name, ref.shape, math.inf, math.inf, tol, "missing in npmnv3")
    if ours.shape != ref.shape:
        return CompareRow(name, ref.shape, math.inf, math.inf, tol,
                          f"npmnv3 shape {ours.shape}")
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    abs_err = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    if not math.isfinite(abs_err):
        abs_err = rel = math.inf                       # NaN anywhere is a failure
    return CompareRow(name, ref.shape, abs_err, rel, tol)


def torchvision_outputs(tv_model, x):
    """``{name: numpy output}`` of every named module of ``tv_model`` (root excluded), in the
    order their forwards finish, and the logits; ``x`` is a numpy array."""
    import torch

    outs, hooks = {}, []

    def hook(name):
        def save(_module, _inputs, output):
            outs[name] = output.detach().clone()       # clone: in-place ops follow
        return save

    try:
        for name, mod in tv_model.named_modules():
            if name:
                hooks.append(mod.register_forward_hook(hook(name)))
        dtype = next(tv_model.parameters()).dtype
        with torch.no_grad():
            logits = tv_model(torch.from_numpy(np.ascontiguousarray(x)).to(dtype))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.cpu().numpy() for k, v in outs.items()}, logits.cpu().numpy()


def compare_with_torchvision(model, tv_model, x, *, tol: float | None = None) -> list:
    """One ``CompareRow`` per torchvision module (innermost first, in forward order).

    Both models should hold the same weights (``model.load_state_dict`` of torchvision's
    ``state_dict`` converted to numpy). They run in eval mode; their modes are restored after.
    ``tol`` defaults to 1e-5 if either model is float32, else 1e-10.
    """
    x = np.asarray(x)
    tv_dtype = str(next(tv_model.parameters()).dtype).replace("torch.", "")
    if tol is None:
        tol = max(tolerance_for(model.dtype), tolerance_for(tv_dtype))
    was_training, tv_was_training = model.training, tv_model.training
    model.eval()
    tv_model.eval()
    try:
        ref, _ = torchvision_outputs(tv_model, x)
        _, ours = model.forward_intermediates(x.astype(model.dtype))
    finally:
        model.train(was_training)
        tv_model.train(tv_was_training)
    return [_diff(name, ours.get(name), r, tol) for name, r in ref.items()]


def first_failure(rows):
    """The first row over tolerance (the innermost module that diverges first), or None."""
    return next((r for r in rows if not r.ok), None)


def format_rows(rows) -> list[str]:
    """One line per module, the first over tolerance marked, then a verdict line."""
    first = first_failure(rows)
    width = max((len(r.name) for r in rows), default=4)
    lines = []
    for r in rows:
        mark = ">> FIRST OVER TOLERANCE" if r is first else ("   over" if not r.ok else "")
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}}  {shape:<16} max abs {r.max_abs:9.2e}  "
                     f"max rel {r.max_rel:9.2e}  {r.note}{mark}".rstrip())
    bad = sum(not r.ok for r in rows)
    tol = rows[0].tol if rows else float("nan")
    if bad:
        lines.append(f"{bad} of {len(rows)} modules over tolerance {tol:.0e}; the first is "
                     f"{first.name}")
    else:
        lines.append(f"all {len(rows)} modules within tolerance {tol:.0e}")
    return lines


def plot_rows(rows, path, title: str = ""):
    """Save a log-scale plot of each module's relative error with the tolerance line (Agg,
    no pyplot state touched); returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 1e-18                                       # exact zeros drawn at the bottom
    rel = [min(max(r.max_rel, floor), 1e3) for r in rows]
    idx = np.arange(len(rows))
    ok = np.array([r.ok for r in rows], dtype=bool)
    ax.semilogy(idx, rel, "-", color="0.7", lw=0.8)
    ax.semilogy(idx[ok], np.array(rel)[ok], ".", color="tab:blue", label="within tolerance")
    if (~ok).any():
        ax.semilogy(idx[~ok], np.array(rel)[~ok], "x", color="tab:red", label="over tolerance")
        first = int(np.flatnonzero(~ok)[0])
        ax.annotate(f"first over tolerance: {rows[first].name}", (first, rel[first]),
                    textcoords="offset points", xytext=(25, -30), color="tab:red",
                    arrowprops={"arrowstyle": "->", "color": "tab:red"})
    if rows:
        ax.axhline(rows[0].tol, color="tab:red", ls="--", lw=1,
                   label=f"tolerance {rows[0].tol:.0e}")
    top = [i for i, r in enumerate(rows)                # features.N and classifier
           if (r.name.startswith("features.") and r.name.count(".") == 1)
           or r.name == "classifier"]
    ax.set_xticks(top, [rows[i].name for i in top], rotation=90, fontsize=7)
    ax.grid(axis="x", color="0.9")                     # each tick ends a top-level module
    ax.set_ylabel("max|npmnv3 - torch| / max|torch|")
    ax.set_xlabel(f"module, in forward order (exact zeros drawn at {floor:.0e})")
    ax.set_title(title or "npmnv3 vs torchvision, per module")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- inputs, models


def randomise(torch, model, seed: int):
    """Random BN weight/bias/running_mean/running_var/num_batches_tracked and nonzero biases
    (SE convs, classifier, timm's conv_head): torchvision initialises all of them to 1/0, and
    identity batch norm hides bugs. Works on torchvision and timm models (the tests and the
    quantized references of ``tools/qcompare.py`` use it). The ranges keep the
    network well conditioned (BN weights 0.5..1.5, variances 0.5..2), so float32 results stay
    within a few ulp-accumulations of the float64 truth and a tolerance can be tight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=g)))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def random_input(seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


def torchvision_model(config, state_dict=None, *, dtype="float32", seed: int = 0,
                      bn_eps: float | None = None):
    """torchvision's model for ``config`` (a ``MobileNetV3Config`` or dict of builder
    arguments): with ``state_dict`` (numpy arrays) loaded strictly, else randomly initialised
    with randomised batch-norm parameters and statistics (all-ones/zeros would hide batch-norm
    mistakes). ``bn_eps``: batch norm's eps if not torchvision's 1e-3 (timm's weights: 1e-5)."""
    import torch
    import torchvision

    c = MobileNetV3Config.from_dict(config)
    if c.arch == "custom":
        raise ValueError("torchvision has no model for a custom stage_params MobileNetV3")
    torch.manual_seed(seed)
    builder = getattr(torchvision.models, f"mobilenet_v3_{c.arch}")
    tv = builder(width_mult=c.width_mult, reduced_tail=c.reduced_tail, dilated=c.dilated,
                 num_classes=c.num_classes, dropout=c.dropout)
    if state_dict is not None:
        with torch.no_grad():
            tv.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    else:
        randomise(torch, tv, seed)
    if bn_eps is not None:
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = bn_eps
    tv = tv.to(getattr(torch, dtype)).eval()
    return tv


def npmnv3_twin(tv_model, config, dtype="float32"):
    """An npmnv3 model holding exactly ``tv_model``'s parameters and buffers."""
    model = MobileNetV3(MobileNetV3Config.from_dict(config), dtype=dtype)
    model.load_state_dict({k: v.detach().cpu().numpy() for k, v in tv_model.state_dict().items()})
    return model.eval()
