"""The eval engine (``npmnv3/engine``, ``npmnv3/kernels/nhwc.py``) against torchvision.

Every stage output of ``FoldedNet.trace`` (the stem, each inverted residual, the last conv) and
the logits, for the variant zoo of ``test_model.py``, in both threading modes (whole images per
thread, row bands per thread); float64 through the same engine; each NHWC kernel against the
NCHW reference kernel on odd sizes and partial row ranges; the snapshot semantics of
``fold``; and the thread-pool guard (BLAS single-threaded inside, previous counts restored).
"""

from __future__ import annotations

import numpy as np
import pytest
from support import RTOL32, RTOL64, require_torch
from test_model import (
    CASES_224,
    CASES_ODD,
    DTYPES,
    case_id,
    load,
    make_input,
    torch_forward,
    zoo,  # noqa: F401  (the module-scoped fixture of torchvision models)
)

import npmnv3
from npmnv3 import kernels as K
from npmnv3.engine import plan, run
from npmnv3.kernels import nhwc, threads
from npmnv3.kernels.epilogue import ACT_CODES
from npmnv3.nn.folded import fold
from npmnv3.tools.gradcheck import rel_error

ENGINE_CASES = ([(c, "float32") for c in CASES_224 + CASES_ODD[:6]]
                + [(c, "float64") for c in CASES_ODD[6:9]])


def _check_stages(outs, ref_outs, names, dtype):
    tol = RTOL32 if dtype == np.float32 else RTOL64
    for name in names:
        o, r = outs[name], ref_outs[name]
        assert o.shape == r.shape and o.dtype == np.dtype(dtype), f"{name}: {o.shape} {o.dtype}"
        err = rel_error(o, r)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", ENGINE_CASES, ids=case_id)
def test_every_stage_matches_torchvision(zoo, case):  # noqa: F811
    (variant, shape), dname = case
    torch = require_torch()
    dtype = DTYPES[dname]
    ref = zoo.get(variant)
    x = make_input(shape, dtype, seed=2)
    ref_logits, ref_outs = torch_forward(torch, ref.torch_model(dtype), x)
    net = fold(load(ref, dtype))
    ref_outs["logits"] = ref_logits
    names = net.names + ["logits"]
    assert net.names[0] == "features.0" and net.names[-1] == f"features.{len(net.names) - 1}"
    for mode in ("images", "bands"):
        _check_stages(net.trace(x, mode=mode), ref_outs, names, dtype)
    feats = net.features(x)
    _check_stages({net.names[-1]: feats}, ref_outs, net.names[-1:], dtype)
    _check_stages({"logits": net(x)}, ref_outs, ["logits"], dtype)


@pytest.mark.parametrize("rule", ["never", "always"])
def test_whole_image_expansion_either_way(zoo, monkeypatch, rule):  # noqa: F811
    """F_PRE (a block's whole expansion in one GEMM, split by pixels in "bands" mode) or the
    banded expansion: the same stages either way, for every block of Large and Small."""
    torch = require_torch()
    monkeypatch.setattr(plan, "PRE_BYTES", 0 if rule == "never" else 1 << 40)
    monkeypatch.setattr(plan, "PRE_SPLIT_MACS", 0)
    for variant, shape in (c for c in CASES_224 if c[0] in ("large", "small")):
        ref = zoo.get(variant)
        x = make_input((1,) + tuple(shape[1:]), np.float32, seed=3)
        ref_logits, ref_outs = torch_forward(torch, ref.torch_model(np.float32), x)
        ref_outs["logits"] = ref_logits
        net = fold(load(ref, np.float32))
        for mode in ("images", "bands"):
            tab, _ = net.plan.table(x.shape[2], x.shape[3], mode)
            expands = tab[:, plan.F_EXPAND] == 1
            assert (tab[:, plan.F_PRE] == (expands if rule == "always" else 0)).all()
            _check_stages(net.trace(x, mode=mode), ref_outs, net.names + ["logits"],
                          np.float32)


def test_band_tables_differ_in_whole_image_expansion_only():
    """The "bands" table keeps F_PRE for the big expansions only; its phases run EXPAND (the
    expansion split by pixels) right before the FRONT of those blocks and nowhere else."""
    from npmnv3 import mobilenet_v3_large
    net = fold(mobilenet_v3_large(seed=0).eval())
    images, _ = net.plan.table(224, 224, "images")
    bands, _ = net.plan.table(224, 224, "bands")
    other = [f for f in range(plan.NF) if f != plan.F_PRE]
    assert (images[:, other] == bands[:, other]).all()
    pre_i, pre_b = images[:, plan.F_PRE] == 1, bands[:, plan.F_PRE] == 1
    assert pre_b.any() and (pre_i | ~pre_b).all() and (pre_i & ~pre_b).any()
    t = images[pre_i]
    assert (t[:, plan.F_H] * t[:, plan.F_W] * t[:, plan.F_CEXP] * 4 <= plan.PRE_BYTES).all()
    t = bands[pre_b]
    assert (t[:, plan.F_H] * t[:, plan.F_W] * t[:, plan.F_CIN] * t[:, plan.F_CEXP]
            >= plan.PRE_SPLIT_MACS).all()
    phases = net.band_phases(bands, False).tolist()
    for i in range(len(bands)):
        k = phases.index([run.FRONT, i])
        assert (phases[k - 1] == [run.EXPAND, i]) == pre_b[i]
    assert sum(p[0] == run.EXPAND for p in phases) == pre_b.sum()


def test_fold_is_a_snapshot():
    import npmnv3
    model = npmnv3.mobilenet_v3_small(seed=0).eval()
    x = make_input((1, 3, 40, 40), np.float32)
    net = fold(model)
    before = net(x)
    model.params["classifier.3.bias"] += 1.0          # later edits do not reach the snapshot
    assert np.array_equal(net(x), before)
    assert model.folded() is model.folded()           # cached until model.changed()
    model.changed()
    assert np.allclose(model.folded()(x), before + 1.0, rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_clear_error():
    import npmnv3
    net = fold(npmnv3.mobilenet_v3_small(seed=0).eval())
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(np.zeros((1, 4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="too small"):
        net(np.zeros((1, 3, 0, 5), np.float32))
    with pytest.raises(ValueError, match="mode"):
        net.trace(np.zeros((1, 3, 32, 32), np.float32), mode="rows")


# ----------------------------------------------------------------------------- kernels

def _nhwc(a):          # (1, C, H, W) -> (H, W, C)
    return np.ascontiguousarray(a[0].transpose(1, 2, 0))


def _act(y, act):
    if act == "relu":
        return np.maximum(y, 0)
    if act == "hardswish":
        return K.hardswish_forward(y, impl="naive")[0]
    return y


DW_CASES = [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2), (5, 1, 2), (7, 1, 1), (3, 2, 2)]


@pytest.mark.parametrize("k, s, d", DW_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("act", ["relu", "hardswish", None])
def test_depthwise_rows_equal_reference(k, s, d, act):
    rng = np.random.default_rng(k * 100 + s * 10 + d)
    C, H, W = 24, 13, 10
    p = (k - 1) // 2 * d
    x = rng.standard_normal((1, C, H, W))
    w = rng.standard_normal((C, 1, k, k))
    b = rng.standard_normal(C)
    ref = _act(K.depthwise_forward(x, w, b, stride=s, padding=p, dilation=d, impl="naive")[0],
               act)
    Ho, Wo = ref.shape[2:]
    out = np.zeros((Ho, Wo, C))
    pool = np.zeros(C)
    kc = np.array([0.0, 3.0, 6.0])
    wk = np.ascontiguousarray(w[:, 0].reshape(C, -1).T)                 # (k*k, C)
    geom = (H, W, Ho, Wo, k, s, p, d)
    src = _nhwc(x)
    for o0, o1 in ((0, 2), (2, Ho)):                    # two row bands, like two threads
        nhwc.depthwise_rows(src, 0, wk, b, geom, ACT_CODES[act], kc, o0, o1,
                            np.zeros((Wo, C)), out, pool)
    assert rel_error(out, _nhwc(ref)) < RTOL64
    assert rel_error(pool, ref.sum(axis=(0, 2, 3))) < RTOL64
    band = src[3:]                                      # a band of input rows starting at 3
    out2 = np.zeros_like(out)
    lo_row = next(i for i in range(Ho) if i * s - p >= 3)     # reads no row above 3
    nhwc.depthwise_rows(band, 3, wk, b, geom, ACT_CODES[act], kc, lo_row, Ho,
                        np.zeros((Wo, C)), out2, pool[:0])
    assert rel_error(out2[lo_row:], _nhwc(ref)[lo_row:]) < RTOL64


@pytest.mark.parametrize("K_out, H, W", [(16, 17, 12), (8, 9, 14), (16, 17, 13), (4, 3, 1),
                                         (4, 4, 2), (8, 2, 5)])
def test_conv_rows_equal_reference(K_out, H, W):
    """The stem's NHWC conv (im2col rows from column pairs + one GEMM per band of two rows)
    against the NCHW reference: even and odd widths, one column, two (no pair feeds tap 0)."""
    rng = np.random.default_rng(K_out + H + W)
    x = rng.standard_normal((1, 3, H, W))
    w = rng.standard_normal((K_out, 3, 3, 3))
    b = rng.standard_normal(K_out)
    ref = _act(K.conv2d_forward(x, w, b, stride=2, padding=1, impl="naive")[0], "hardswish")
    Ho, Wo = ref.shape[2:]
    out = np.full((Ho, Wo, K_out), np.nan)
    nhwc.conv_rows(x[0], np.ascontiguousarray(w.reshape(K_out, -1).T), b,
                   (H, W, Ho, Wo, 3, 2, 1, 1), ACT_CODES["hardswish"],
                   np.array([0.0, 3.0, 6.0]), 0, Ho, np.full(2 * 27 * Wo, np.nan), out)
    assert rel_error(out, _nhwc(ref)) < RTOL64


@pytest.mark.parametrize("attr, value", [("stride", 1), ("padding", 0), ("k", 5),
                                         ("dilation", 2)])
def test_engine_refuses_another_stem_geometry(attr, value):
    """The engine's stem kernel is torchvision's 3x3 / stride 2 / padding 1 conv only: any
    other geometry is one clear error when the engine is built, never a wrong result."""
    model = npmnv3.mobilenet_v3_small(seed=0).eval()
    setattr(model.features[0], attr, value)
    with pytest.raises(ValueError, match=r"features\.0 has \(kernel, stride, padding"):
        fold(model)


def test_pointwise_and_se_gate_equal_reference():
    rng = np.random.default_rng(5)
    kc = np.array([0.0, 3.0, 6.0])
    x = rng.standard_normal((37, 24))
    w = rng.standard_normal((24, 40))
    b = rng.standard_normal(40)
    res = rng.standard_normal((37, 40))
    out = np.empty((37, 40))
    with threads.single_threaded_blas():
        nhwc.pointwise(x, w, b, 0, kc, out, res)
    assert rel_error(out, x @ w + b + res) < RTOL64
    C, S, P = 40, 16, 9
    xs = rng.standard_normal((1, C, 3, 3))
    w1, b1 = rng.standard_normal((S, C, 1, 1)), rng.standard_normal(S)
    w2, b2 = rng.standard_normal((C, S, 1, 1)), rng.standard_normal(C)
    gate = K.se_forward(xs, w1, b1, w2, b2, impl="naive")[1].gate[0]
    g, h = np.empty(C), np.empty(S)
    nhwc.se_gate(xs.sum(axis=(0, 2, 3)), P, w1.reshape(S, C), b1, w2.reshape(C, S), b2, kc, h, g)
    assert rel_error(g, gate) < RTOL64


def test_single_threaded_blas_restores_counts():
    before = threads.blas_threads()
    assert before, "no BLAS library found by threadpoolctl"
    with threads.single_threaded_blas():
        assert set(threads.blas_threads().values()) == {1}
    assert threads.blas_threads() == before
