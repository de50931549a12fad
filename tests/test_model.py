"""The whole network against torchvision (issue "the network").

Every torchvision variant used here is built with randomised batch-norm parameters *and* running
statistics (identity batch norm hides bugs) and nonzero SE / classifier biases, written with
``torch.save(model.state_dict())`` and read back with ``npmnv3.load_pth``: the file torchvision
itself writes. They are built once per module (``zoo`` fixture).

Checked: the output of every module torchvision names (forward hooks), logits in float32 and
float64 through the fused eval path, the reference path and train mode (plus the running
statistics it leaves behind), the state_dict round trip, parameter counts and key lists,
torchvision's initialisation, load errors and their hints, the builders, input validation and
``forward_features``. Tests that need no torch (counts, init, errors) run without it.
"""

from __future__ import annotations

import ast
import copy
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from support import (
    RTOL32,
    RTOL64,
    assert_close,
    randomise,
    require_torch,
    require_torchvision,
)

import npmnv3
from npmnv3.tools.gradcheck import rel_error

# Full key / shape / dtype lists written from torchvision's ``state_dict()`` of every builder. They
# live outside the repository, so the test that reads them skips when they are absent.
REFERENCE_DIR = Path(os.environ.get("NPMNV3_REFERENCE_DIR", "/work/shared/reference"))

DTYPES = {"float32": np.float32, "float64": np.float64}

# name -> (arch, builder keyword arguments)
VARIANTS = {
    "large": ("large", {}),
    "small": ("small", {}),
    "large-w0.75": ("large", {"width_mult": 0.75}),
    "small-w0.75": ("small", {"width_mult": 0.75}),
    "large-w0.5": ("large", {"width_mult": 0.5}),
    "small-w0.5": ("small", {"width_mult": 0.5}),
    "large-rt": ("large", {"reduced_tail": True}),
    "small-rt": ("small", {"reduced_tail": True}),
    "large-dil": ("large", {"dilated": True}),
    "small-dil": ("small", {"dilated": True}),
    "large-rt-dil": ("large", {"reduced_tail": True, "dilated": True}),
    "small-rt-dil": ("small", {"reduced_tail": True, "dilated": True}),
}

# (variant, input shape). 224x224 only for the two 1.0 models in float32 (suite time); every
# variant on an odd, non-square size, batch 1 and 3 spread over them.
CASES_224 = [("large", (1, 3, 224, 224)), ("small", (3, 3, 224, 224))]
CASES_ODD = [
    ("large", (3, 3, 33, 45)),
    ("small", (1, 3, 97, 131)),
    ("large-w0.75", (1, 3, 97, 131)),
    ("small-w0.75", (3, 3, 33, 45)),
    ("large-w0.5", (3, 3, 33, 45)),
    ("small-w0.5", (3, 3, 97, 131)),
    ("large-rt", (1, 3, 33, 45)),
    ("small-rt", (3, 3, 33, 45)),
    ("large-dil", (1, 3, 97, 131)),
    ("small-dil", (3, 3, 33, 45)),
    ("large-rt-dil", (3, 3, 33, 45)),
    ("small-rt-dil", (1, 3, 97, 131)),
]
# (case, dtype name): float32 on everything, float64 on the odd sizes.
DTYPE_CASES = ([(c, "float32") for c in CASES_224 + CASES_ODD]
               + [(c, "float64") for c in CASES_ODD])


def case_id(case) -> str:
    (variant, shape), dtype = case
    return f"{variant}-{'x'.join(map(str, shape))}-{dtype}"


# ----------------------------------------------------------------------------- reference models

@dataclass
class Reference:
    """One randomised torchvision model and what ``load_pth`` reads from its checkpoint."""
    variant: str
    arch: str
    kwargs: dict
    model: object                       # torchvision float32 model in eval mode; never mutated
    path: Path                          # its torch.save(model.state_dict()) file
    sd: dict                            # npmnv3.load_pth(path)
    torch_sd: dict                      # model.state_dict() as numpy copies, torch's order
    _double: object = field(default=None, repr=False)

    def torch_model(self, dtype):
        """The float32 model, or a float64 copy of it (made once)."""
        if np.dtype(dtype) == np.float32:
            return self.model
        if self._double is None:
            self._double = copy.deepcopy(self.model).double()
        return self._double


def tv_builder(arch):
    torchvision = require_torchvision()
    return getattr(torchvision.models, f"mobilenet_v3_{arch}")


class Zoo:
    def __init__(self, root: Path):
        self.root, self._cache = root, {}

    def get(self, variant: str) -> Reference:
        torch = require_torch()
        if variant not in self._cache:
            arch, kwargs = VARIANTS[variant]
            seed = list(VARIANTS).index(variant)
            torch.manual_seed(seed)
            model = tv_builder(arch)(**kwargs)
            randomise(torch, model, 1000 + seed)
            model.eval().requires_grad_(False)
            path = self.root / f"{variant}.pth"
            torch.save(model.state_dict(), path)
            torch_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            self._cache[variant] = Reference(variant, arch, kwargs, model, path,
                                             npmnv3.load_pth(path), torch_sd)
        return self._cache[variant]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("torchvision_checkpoints"))


def build(arch, kwargs=None, **extra):
    return getattr(npmnv3, f"mobilenet_v3_{arch}")(**(kwargs or {}), **extra)


def load(ref: Reference, dtype=np.float32, **extra):
    """npmnv3 model of the reference's variant with the weights from its checkpoint, eval."""
    net = build(ref.arch, ref.kwargs, dtype=dtype, **extra)
    net.load_state_dict(ref.sd)
    return net.eval()


def make_input(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _keep_output(outs, name, module, inputs, output):
    # ReLU/Hardswish/Dropout run in place and the residual add is `result += input`: copy now.
    outs[name] = output.detach().clone().numpy()


def torch_forward(torch, model, x):
    """(logits, {module name: output}) for every module ``named_modules()`` lists."""
    outs = {}
    handles = [m.register_forward_hook(partial(_keep_output, outs, name))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(x.copy()))
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), outs


def assert_outputs_close(ours: dict, ref: dict, dtype, tol):
    """Same module names; every output within ``tol``. A failure names the first module (in
    torchvision's order) that is off, so it points at a location."""
    assert set(ours) == set(ref), (f"module names differ: only ours {sorted(set(ours) - set(ref))}"
                                   f", only torchvision {sorted(set(ref) - set(ours))}")
    bad = []
    for name, r in ref.items():
        o = np.asarray(ours[name])
        assert o.shape == r.shape, f"{name}: shape {o.shape} != torchvision {r.shape}"
        assert o.dtype == np.dtype(dtype), f"{name}: dtype {o.dtype}, expected {np.dtype(dtype)}"
        err = rel_error(o, r)
        if not err <= tol:
            bad.append((name, err, float(np.abs(o.astype(np.float64) - r).max())))
    assert not bad, (f"{len(bad)} of {len(ref)} module outputs differ from torchvision by more "
                     f"than {tol:.0e}; first: {bad[0][0]} (relative {bad[0][1]:.3e}, max abs "
                     f"diff {bad[0][2]:.3e}); all: {[b[0] for b in bad][:10]}")


# ----------------------------------------------------------------------------- every module

@pytest.mark.parametrize("case", DTYPE_CASES, ids=case_id)
def test_every_module_output_matches_torchvision(zoo, case):
    (variant, shape), dname = case
    torch = require_torch()
    dtype = DTYPES[dname]
    ref = zoo.get(variant)
    x = make_input(shape, dtype)
    ref_logits, ref_outs = torch_forward(torch, ref.torch_model(dtype), x)
    net = load(ref, dtype)
    logits, outs = net.forward_intermediates(x)
    tol = RTOL32 if dtype == np.float32 else RTOL64
    assert set(net.module_names()) == set(ref_outs), "module_names() != torchvision's names"
    assert_outputs_close(outs, ref_outs, dtype, tol)
    assert logits.shape == (shape[0], 1000)
    assert_close("logits", logits, ref_logits, dtype)


# ----------------------------------------------------------------------------- eval paths

# The naive kernels at 3x224x224 take seconds; the batch-1 224 case covers that size.
EVAL_CASES = [(c, impl) for c in DTYPE_CASES for impl in ("fast", "naive")
              if not (impl == "naive" and c[0] == ("small", (3, 3, 224, 224)))]


@pytest.mark.parametrize("case, impl", EVAL_CASES, ids=lambda v: v if isinstance(v, str)
                         else case_id(v))
def test_eval_logits_match_torchvision(zoo, case, impl):
    """``model.eval(); model(x)``: the fused, BN-folded path (impl "fast", the default) and the
    unfused reference path with the naive kernels."""
    (variant, shape), dname = case
    torch = require_torch()
    dtype = DTYPES[dname]
    ref = zoo.get(variant)
    x = make_input(shape, dtype, seed=1)
    with torch.no_grad():
        ref_logits = ref.torch_model(dtype)(torch.from_numpy(x.copy())).numpy()
    net = load(ref, dtype)
    assert net.impl == "fast" and not net.training
    net.impl = impl
    logits = net(x)
    if impl == "fast":
        assert net._folded is not None, "eval + impl 'fast' did not take the folded path"
    assert_close(f"{impl} logits", logits, ref_logits, dtype)


# ----------------------------------------------------------------------------- train mode

TRAIN_CASES = [("large", (3, 3, 33, 45)), ("small", (1, 3, 33, 45)),
               ("large-w0.5", (3, 3, 33, 45)), ("small-rt-dil", (3, 3, 33, 45))]


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_train_mode_matches_torchvision(zoo, case, dname):
    """Two train-mode forwards (batch statistics, running statistics updated with momentum
    0.01 and the unbiased variance), dropout 0: logits, then the whole state_dict."""
    variant, shape = case
    torch = require_torch()
    dtype = DTYPES[dname]
    ref = zoo.get(variant)
    tv = tv_builder(ref.arch)(dropout=0.0, **ref.kwargs)
    tv.load_state_dict(ref.model.state_dict())
    tv = tv.to(torch.float64 if dtype == np.float64 else torch.float32).train()
    net = build(ref.arch, ref.kwargs, dtype=dtype, dropout=0.0)
    net.load_state_dict(ref.sd)
    net.train()
    assert net.training
    for step in range(2):
        x = make_input(shape, dtype, seed=10 + step)
        with torch.no_grad():
            ref_logits = tv(torch.from_numpy(x.copy())).numpy()
        assert_close(f"train logits, step {step}", net(x), ref_logits, dtype)
    sd, tsd = net.state_dict(), tv.state_dict()
    assert list(sd) == list(tsd)
    for k, t in tsd.items():
        if k.endswith("num_batches_tracked"):
            assert sd[k].dtype == np.int64 and int(sd[k]) == int(t) == int(ref.sd[k]) + 2, (
                f"{k}: ours {sd[k]}, torchvision {int(t)}, checkpoint {ref.sd[k]}")
        else:
            assert_close(k, sd[k], t, dtype)
            if "running" not in k:               # parameters do not move in a forward pass
                assert np.array_equal(sd[k], ref.sd[k].astype(dtype)), f"{k} changed"


# ----------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trip(zoo, variant):
    """torchvision -> torch.save -> load_pth -> npmnv3 -> state_dict(): the same keys in the
    same order, the same dtypes and shapes, equal values."""
    ref = zoo.get(variant)
    tsd = ref.torch_sd
    assert list(ref.sd) == list(tsd), "load_pth changed the key order"
    net = build(ref.arch, ref.kwargs)
    assert net.load_state_dict(ref.sd) == {"missing": [], "unexpected": []}
    sd = net.state_dict()
    assert list(sd) == list(tsd), "state_dict keys/order differ from torchvision's"
    for k, t in tsd.items():
        want = np.int64 if k.endswith("num_batches_tracked") else np.float32
        assert t.dtype == want and sd[k].dtype == want, f"{k}: dtype {sd[k].dtype} / {t.dtype}"
        assert sd[k].shape == t.shape, f"{k}: shape {sd[k].shape} != {t.shape}"
        assert np.array_equal(sd[k], t), f"{k}: values differ"

    # float64 model: float32 arrays load (cast), and come back exactly.
    net64 = build(ref.arch, ref.kwargs, dtype=np.float64)
    net64.load_state_dict(ref.sd)
    sd64 = net64.state_dict()
    assert list(sd64) == list(tsd)
    for k, t in tsd.items():
        want = np.int64 if k.endswith("num_batches_tracked") else np.float64
        assert sd64[k].dtype == want, f"float64 model {k}: dtype {sd64[k].dtype}"
        assert np.array_equal(sd64[k], t.astype(want)), f"float64 model {k}: values differ"
    net32 = build(ref.arch, ref.kwargs)                         # and back into float32
    net32.load_state_dict(sd64)
    assert all(np.array_equal(v, tsd[k]) and v.dtype == tsd[k].dtype
               for k, v in net32.state_dict().items())


def test_state_dict_returns_copies():
    net = npmnv3.mobilenet_v3_small(seed=0)
    sd = net.state_dict()
    sd["features.0.0.weight"][...] = 7.0
    sd["features.0.1.num_batches_tracked"][...] = 7
    fresh = net.state_dict()
    assert not np.any(fresh["features.0.0.weight"] == 7.0)
    assert int(fresh["features.0.1.num_batches_tracked"]) == 0


# ----------------------------------------------------------------------------- counts and keys

PARAM_COUNTS = {          # sum(p.numel()) of torchvision's models; dilation adds no parameters
    "large": 5_483_032, "small": 2_542_856,
    "large-w0.75": 3_377_576, "small-w0.75": 1_653_920,
    "large-w0.5": 1_734_576, "small-w0.5": 917_264,
    "large-rt": 2_569_352, "small-rt": 1_099_672,
    "large-dil": 5_483_032, "small-dil": 2_542_856,
    "large-rt-dil": 2_569_352, "small-rt-dil": 1_099_672,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count(variant):
    arch, kwargs = VARIANTS[variant]
    net = build(arch, kwargs)
    assert net.num_parameters() == PARAM_COUNTS[variant]
    params = {k for k, _ in net.named_parameters()}
    sd = net.state_dict()
    assert sum(v.size for k, v in sd.items() if k in params) == PARAM_COUNTS[variant]
    # every non-parameter entry is a BN buffer
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
               for k in sd if k not in params)


def test_parameter_count_with_num_classes():
    net = npmnv3.mobilenet_v3_large(num_classes=10)
    assert net.num_parameters() == 5_483_032 - 990 * 1280 - 990
    assert net.state_dict()["classifier.3.weight"].shape == (10, 1280)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_equals_torchvision(zoo, variant):
    ref = zoo.get(variant)
    assert sum(p.numel() for p in ref.model.parameters()) == PARAM_COUNTS[variant]


@pytest.mark.parametrize("arch, n_keys, n_bn", [("large", 312, 46), ("small", 244, 34)])
def test_state_dict_keys_match_torchvision_list(arch, n_keys, n_bn):
    path = REFERENCE_DIR / f"keys_{arch}.txt"
    if not path.exists():
        pytest.skip(f"{path} not found: the torchvision key list lives outside the repository "
                    f"(set NPMNV3_REFERENCE_DIR to its folder)")
    want = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            want.append((key, tuple(ast.literal_eval(shape)), dtype))
    got = [(k, v.shape, str(v.dtype)) for k, v in build(arch).state_dict().items()]
    assert len(want) == n_keys
    assert sum(k.endswith("num_batches_tracked") for k, _, _ in want) == n_bn
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"entry {i}: ours {g} != torchvision {w}"
    assert len(got) == len(want)


# ----------------------------------------------------------------------------- initialisation

SIGMAS = 5   # tolerance in standard errors of the estimate: deterministic (seeded) but honest


def assert_std(name, v, std):
    """Sample std of ``v`` (mean-zero normal expected) within SIGMAS standard errors of
    ``std``: the sample std has relative standard error 1/sqrt(2n), the mean std/sqrt(n)."""
    v = v.astype(np.float64).ravel()
    n = v.size
    s = math.sqrt(np.mean(v**2))
    assert abs(s / std - 1) <= SIGMAS / math.sqrt(2 * n), (
        f"{name}: std {s:.5g}, expected {std:.5g} (n={n})")
    assert abs(v.mean()) <= SIGMAS * std / math.sqrt(n), f"{name}: mean {v.mean():.3g}"


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("arch", ["large", "small"])
def test_initialisation_like_torchvision(arch, dname):
    """kaiming_normal_(mode="fan_out") for every conv (fan_out = out_channels * kh * kw, groups
    not divided out: depthwise too), N(0, 0.01) for linear weights, zero biases, BN 1/0 and
    running statistics 0/1, num_batches_tracked 0."""
    dtype = DTYPES[dname]
    net = build(arch, dtype=dtype, seed=3)
    z = []
    for k, v in net.state_dict().items():
        want = np.int64 if k.endswith("num_batches_tracked") else dtype
        assert v.dtype == want, f"{k}: dtype {v.dtype}"
        if v.ndim == 4:
            std = math.sqrt(2.0 / (v.shape[0] * v.shape[2] * v.shape[3]))
            assert_std(k, v, std)
            z.append(v.ravel() / std)
        elif k.startswith("classifier") and k.endswith("weight"):
            assert_std(k, v, 0.01)
        elif k.endswith("num_batches_tracked"):
            assert int(v) == 0, k
        elif k.endswith("running_var") or (k.endswith(".weight") and v.ndim == 1):
            assert np.all(v == 1), f"{k}: expected ones"
        else:                                   # BN bias, running_mean, every conv/linear bias
            assert np.all(v == 0), f"{k}: expected zeros"
    # All conv weights together, normalised: standard normal (not uniform: P(|z| < 1)).
    z = np.concatenate(z).astype(np.float64)
    n = z.size
    assert abs(z.std() - 1) <= SIGMAS / math.sqrt(2 * n), f"pooled conv std {z.std():.5f}"
    assert abs(z.mean()) <= SIGMAS / math.sqrt(n), f"pooled conv mean {z.mean():.2e}"
    p = 0.6826894921370859
    frac = np.mean(np.abs(z) < 1)
    assert abs(frac - p) <= SIGMAS * math.sqrt(p * (1 - p) / n), f"P(|z|<1) = {frac:.4f}"


def test_initialisation_is_seeded():
    a = npmnv3.mobilenet_v3_small(seed=5).state_dict()
    b = npmnv3.mobilenet_v3_small(seed=5).state_dict()
    c = npmnv3.mobilenet_v3_small(seed=6).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["features.0.0.weight"], c["features.0.0.weight"])


def test_torchvision_initialisation_has_the_same_statistics():
    """The formula above is torchvision's: its conv stds follow sqrt(2 / fan_out) too."""
    torch = require_torch()
    torch.manual_seed(0)
    tv = tv_builder("small")()
    for k, v in tv.state_dict().items():
        if v.ndim == 4:
            assert_std(f"torchvision {k}", v.numpy(),
                       math.sqrt(2.0 / (v.shape[0] * v.shape[2] * v.shape[3])))


# ----------------------------------------------------------------------------- load errors

def load_error(net, sd) -> str:
    with pytest.raises(ValueError) as e:
        net.load_state_dict(sd)
    return str(e.value)


def test_load_error_lists_every_problem_and_leaves_the_model_untouched():
    net = npmnv3.mobilenet_v3_large(seed=0)
    before = net.state_dict()
    sd = npmnv3.mobilenet_v3_large(seed=1).state_dict()
    del sd["features.4.block.2.fc1.bias"]
    del sd["classifier.0.bias"]
    sd["features.99.weight"] = np.zeros((3,), np.float32)
    sd["features.0.0.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    sd["features.16.1.running_var"] = np.ones((961,), np.float32)
    msg = load_error(net, sd)
    for part in ("missing keys (2)", "features.4.block.2.fc1.bias", "classifier.0.bias",
                 "unexpected keys (1)", "features.99.weight",
                 "shape/dtype mismatches (2)", "features.0.0.weight", "(8, 3, 3, 3)",
                 "(16, 3, 3, 3)", "features.16.1.running_var", "(961,)", "(960,)"):
        assert part in msg, f"{part!r} not in the error:\n{msg}"
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before), "failed load changed it"


@pytest.mark.parametrize("src, dst, hint", [
    (("small", {}), ("large", {}), "matches mobilenet_v3_small()"),
    (("large", {}), ("small", {}), "matches mobilenet_v3_large()"),
    (("large", {"width_mult": 0.75}), ("large", {}), "mobilenet_v3_large(width_mult=0.75)"),
    (("small", {"width_mult": 0.5}), ("small", {}), "mobilenet_v3_small(width_mult=0.5)"),
    (("large", {"reduced_tail": True}), ("large", {}), "mobilenet_v3_large(reduced_tail=True)"),
], ids=["small-into-large", "large-into-small", "w0.75-into-1.0", "small-w0.5-into-1.0",
        "reduced-tail-into-full"])
def test_load_error_names_the_matching_variant(src, dst, hint):
    sd = build(src[0], src[1]).state_dict()
    msg = load_error(build(dst[0], dst[1]), sd)
    assert hint in msg, f"{hint!r} not in the error:\n{msg}"


def test_load_error_hints_at_1001_classes():
    sd = npmnv3.mobilenet_v3_large().state_dict()
    sd["classifier.3.weight"] = np.zeros((1001, 1280), np.float32)
    sd["classifier.3.bias"] = np.zeros((1001,), np.float32)
    msg = load_error(npmnv3.mobilenet_v3_large(), sd)
    assert "(1001, 1280)" in msg and "num_classes=1001" in msg, msg
    net = npmnv3.mobilenet_v3_large(num_classes=1001)        # the hint's suggestion works
    net.load_state_dict(sd)
    assert net.eval()(np.zeros((1, 3, 9, 9), np.float32)).shape == (1, 1001)


def _bn(prefix):
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                      "num_batches_tracked")]


def timm_keys():
    """timm ``mobilenetv3_large_100`` naming (timm/models/mobilenetv3.py), stages
    [1,2,3,4,2,3,1]."""
    keys = ["conv_stem.weight", *_bn("bn1"), "blocks.0.0.conv_dw.weight", *_bn("blocks.0.0.bn1"),
            "blocks.0.0.conv_pw.weight", *_bn("blocks.0.0.bn2")]
    for s, n in enumerate((2, 3, 4, 2, 3), start=1):
        for i in range(n):
            p = f"blocks.{s}.{i}"
            keys += [f"{p}.conv_pw.weight", *_bn(f"{p}.bn1"), f"{p}.conv_dw.weight",
                     *_bn(f"{p}.bn2"), f"{p}.se.conv_reduce.weight", f"{p}.se.conv_reduce.bias",
                     f"{p}.se.conv_expand.weight", f"{p}.se.conv_expand.bias",
                     f"{p}.conv_pwl.weight", *_bn(f"{p}.bn3")]
    keys += ["blocks.6.0.conv.weight", *_bn("blocks.6.0.bn1"), "conv_head.weight",
             "conv_head.bias", "classifier.weight", "classifier.bias"]
    return keys


def mmpretrain_keys():
    """mmpretrain ``MobileNetV3(arch='large')`` + StackedLinearClsHead
    (mmpretrain/models/backbones/mobilenet_v3.py): backbone.layer0 .. layer16,
    head.layers.{0,1}.fc."""
    keys = ["backbone.layer0.conv.weight", *_bn("backbone.layer0.bn")]
    for i in range(1, 16):
        p = f"backbone.layer{i}"
        for conv in ("expand_conv", "depthwise_conv"):
            keys += [f"{p}.{conv}.conv.weight", *_bn(f"{p}.{conv}.bn")]
        keys += [f"{p}.se.conv1.conv.weight", f"{p}.se.conv1.conv.bias",
                 f"{p}.se.conv2.conv.weight", f"{p}.se.conv2.conv.bias",
                 f"{p}.linear_conv.conv.weight", *_bn(f"{p}.linear_conv.bn")]
    keys += ["backbone.layer16.conv.weight", *_bn("backbone.layer16.bn"),
             "head.layers.0.fc.weight", "head.layers.0.fc.bias",
             "head.layers.1.fc.weight", "head.layers.1.fc.bias"]
    return keys


def netspresso_keys():
    """netspresso-trainer mobilenetv3 backbone + FC head (netspresso-trainer's
    mobilenetv3.py), stages [3,3,6,3] plus the final conv as stages.3.3."""
    keys = ["backbone.conv_first.block.conv.weight", *_bn("backbone.conv_first.block.norm")]
    for s, n in enumerate((3, 3, 6, 3)):
        for b in range(n):
            p = f"backbone.stages.{s}.{b}.block"
            keys += [f"{p}.0.block.conv.weight", *_bn(f"{p}.0.block.norm"),
                     f"{p}.1.block.conv.weight", *_bn(f"{p}.1.block.norm"),
                     f"{p}.2.fc1.weight", f"{p}.2.fc1.bias", f"{p}.2.fc2.weight",
                     f"{p}.2.fc2.bias", f"{p}.3.block.conv.weight", *_bn(f"{p}.3.block.norm")]
    keys += ["backbone.stages.3.3.block.conv.weight", *_bn("backbone.stages.3.3.block.norm"),
             "head.classifier.0.weight", "head.classifier.0.bias",
             "head.classifier.3.weight", "head.classifier.3.bias"]
    return keys


@pytest.mark.parametrize("style, keys", [("timm", timm_keys), ("mmpretrain", mmpretrain_keys),
                                         ("netspresso-trainer", netspresso_keys)],
                         ids=["timm", "mmpretrain", "netspresso"])
def test_load_error_recognises_other_libraries(style, keys):
    sd = {k: np.zeros((2,), np.float32) for k in keys()}
    msg = load_error(npmnv3.mobilenet_v3_large(), sd)
    assert f"look like a {style} checkpoint" in msg, f"no {style} hint in:\n{msg}"


def test_missing_num_batches_tracked_is_accepted_as_zero():
    src = npmnv3.mobilenet_v3_small(seed=1).state_dict()
    net = npmnv3.mobilenet_v3_small(seed=2)
    full = dict(src)
    for k in full:
        if k.endswith("num_batches_tracked"):
            full[k] = np.array(11, np.int64)
    net.load_state_dict(full)                              # nonzero first, so 0 is a change
    stripped = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    assert len(stripped) == 244 - 34
    assert net.load_state_dict(stripped) == {"missing": [], "unexpected": []}
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == np.int64 and v.shape == () and int(v) == 0, f"{k}: {v!r}"
        else:
            assert np.array_equal(v, src[k]), k


def test_non_strict_load_reports_missing_and_unexpected():
    sd = npmnv3.mobilenet_v3_small(seed=1).state_dict()
    del sd["classifier.3.bias"]
    sd["extra.weight"] = np.zeros(1, np.float32)
    net = npmnv3.mobilenet_v3_small(seed=2)
    report = net.load_state_dict(sd, strict=False)
    assert report == {"missing": ["classifier.3.bias"], "unexpected": ["extra.weight"]}
    assert np.array_equal(net.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])


# ----------------------------------------------------------------------------- builders, input

@pytest.mark.parametrize("arch", ["large", "small"])
def test_unknown_builder_keyword_is_an_error(arch):
    with pytest.raises(TypeError, match="widht_mult"):
        build(arch, widht_mult=0.5)


BAD_INPUTS = [
    ("ndim 3", (3, 33, 45), np.float32),
    ("ndim 5", (1, 1, 3, 8, 8), np.float32),
    ("1 channel", (2, 1, 8, 8), np.float32),
    ("4 channels", (1, 4, 8, 8), np.float32),
    ("empty batch", (0, 3, 8, 8), np.float32),
    ("empty height", (1, 3, 0, 8), np.float32),
    ("empty width", (2, 3, 8, 0), np.float64),
]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("what, shape, dtype", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_shape_is_a_value_error(what, shape, dtype, mode):
    net = npmnv3.mobilenet_v3_small().train(mode == "train")
    x = np.zeros(shape, dtype)
    for fn in (net, net.forward_intermediates, net.forward_features):
        with pytest.raises(ValueError) as e:
            fn(x)
        assert str(shape) in str(e.value), f"{what}: shape {shape} not in {e.value}"


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
def test_non_float_input_is_a_value_error(dtype):
    net = npmnv3.mobilenet_v3_small().eval()
    x = np.zeros((1, 3, 8, 8), dtype)
    for fn in (net, net.forward_intermediates, net.forward_features):
        with pytest.raises(ValueError, match=np.dtype(dtype).name):
            fn(x)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 7, 5), (3, 3, 2, 3), (1, 3, 1, 9)],
                         ids=str)
@pytest.mark.parametrize("variant", ["large", "small-dil"])
def test_any_input_size_works(zoo, variant, shape):
    """min_size is (1, 1): every H, W >= 1 gives (N, 1000) logits equal to torchvision's."""
    torch = require_torch()
    ref = zoo.get(variant)
    x = make_input(shape, np.float32, seed=2)
    ref_logits, ref_outs = torch_forward(torch, ref.model, x)
    net = load(ref)
    for impl in ("fast", "naive"):
        net.impl = impl
        logits = net(x)
        assert logits.shape == (shape[0], 1000)
        assert_close(f"{impl} logits", logits, ref_logits, np.float32)
    net.impl = "fast"
    _, outs = net.forward_intermediates(x)
    assert_outputs_close(outs, ref_outs, np.float32, RTOL32)


# ----------------------------------------------------------------------------- forward_features

# The last module at each output stride (2, 4, 8, 16, 32), as timm's features_only. Width and
# reduced_tail keep the block indices; dilated keeps them too, but the last stage stays at 16.
STAGE_MODULES = {"large": ["features.1", "features.3", "features.6", "features.12", "features.16"],
                 "small": ["features.0", "features.1", "features.3", "features.8", "features.12"]}


@pytest.mark.parametrize("variant, shape", [
    ("large", (1, 3, 97, 131)), ("small", (3, 3, 33, 45)), ("large-w0.5", (1, 3, 33, 45)),
    ("large-dil", (1, 3, 33, 45)), ("small-rt-dil", (3, 3, 33, 45)),
    ("large", (1, 3, 16, 16)), ("small-dil", (2, 3, 7, 5)),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_forward_features(zoo, variant, shape):
    """Five maps at strides 2, 4, 8, 16, 32 (dilated: 2, 4, 8, 16, 16), equal to torchvision's
    outputs of the modules that end each stride, whatever the input size (also when several
    strides give the same spatial size, e.g. 16x16 -> 1x1 at both 16 and 32)."""
    torch = require_torch()
    ref = zoo.get(variant)
    x = make_input(shape, np.float32, seed=3)
    _, ref_outs = torch_forward(torch, ref.model, x)
    net = load(ref)
    maps = net.forward_features(x)
    dilated = ref.kwargs.get("dilated", False)
    strides = (2, 4, 8, 16, 16 if dilated else 32)
    names = STAGE_MODULES[ref.arch]
    assert len(maps) == 5, (f"{len(maps)} feature maps {[m.shape for m in maps]}, expected 5 at "
                            f"strides {strides}")
    for s, name, fmap in zip(strides, names, maps):
        r = ref_outs[name]
        H, W = shape[2:]
        assert r.shape[2:] == (-(-H // s), -(-W // s))          # ceil(H / s): the reference
        assert_close(f"stride {s} ({name})", fmap, r, np.float32)
    for stages in ((5,), (2, 4), (1, 3, 5)):
        picked = net.forward_features(x, stages=stages)
        assert len(picked) == len(stages), f"stages={stages}: {len(picked)} maps"
        for s, fmap in zip(stages, picked):
            assert np.array_equal(fmap, maps[s - 1]), f"stages={stages}: stage {s} differs"


@pytest.mark.parametrize("stages", [(0,), (6,), (1, 7)])
def test_forward_features_rejects_bad_stages(stages):
    net = npmnv3.mobilenet_v3_small().eval()
    with pytest.raises(ValueError, match="stages"):
        net.forward_features(np.zeros((1, 3, 33, 45), np.float32), stages=stages)
