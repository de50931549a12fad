"""Solutions to the exercises of notebooks/07_from_textbook_to_engine.ipynb (run by a test).

Each solution is followed by the same check the notebook's check cell makes.
"""

import numpy as np

import npmnv3
from npmnv3.engine.plan import fold_conv_bn
from npmnv3.engine.profile import PEAK_GFLOPS, profile


# Exercise 1: fold one Conv-BN by hand.
def fold_by_hand(w, gamma, beta, mean, var, eps):
    alpha = gamma / np.sqrt(var + eps)                     # (K,)
    return w * alpha[:, None, None, None], beta - mean * alpha


def check_fold(fold_fn):
    model = npmnv3.mobilenet_v3_small(seed=0, dtype=np.float64).eval()
    rng = np.random.default_rng(0)
    m = model.features[1].layers[0]                        # the first depthwise Conv-BN-Act
    bn = f"{m.name}.1"
    model.buffers[f"{bn}.running_mean"] = rng.standard_normal(m.cout)
    model.buffers[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, m.cout)
    w_ref, b_ref = fold_conv_bn(model, m)
    w, b = fold_fn(model.params[f"{m.name}.0.weight"], model.params[f"{bn}.weight"],
                   model.params[f"{bn}.bias"], model.buffers[f"{bn}.running_mean"],
                   model.buffers[f"{bn}.running_var"], model.bn_eps)
    assert np.allclose(w, w_ref, rtol=1e-12, atol=0) and np.allclose(b, b_ref, rtol=1e-12,
                                                                      atol=1e-15)
    return True


# Exercise 2: the compute floor of MobileNetV3-Small from the profile's MACs.
def floor_ms(rows):
    macs = sum(sum(r["macs"].values()) for r in rows)
    return 2 * macs / (PEAK_GFLOPS * 1e9) * 1e3


def check_floor(floor_fn):
    net = npmnv3.mobilenet_v3_small(seed=0).eval().folded()
    rows = profile(net, np.zeros((1, 3, 224, 224), np.float32), reps=1)
    assert abs(floor_fn(rows) - sum(r["floor_ms"] for r in rows)) < 1e-9
    assert 0.5 < floor_fn(rows) < 0.65                      # 56.5 M MACs at 200 GFLOP/s
    return True


# Exercise 3: the SE gate folded into the projection's weights instead of its input.
def project_with_gate_in_weights(D, g, Wp):
    return D @ (g[:, None] * Wp)


def check_gate(fn):
    rng = np.random.default_rng(1)
    D, g, Wp = rng.standard_normal((49, 96)), rng.uniform(0, 1, 96), rng.standard_normal((96, 40))
    assert np.allclose(fn(D, g, Wp), (D * g) @ Wp, rtol=1e-12, atol=1e-12)
    return True


if __name__ == "__main__":
    assert check_fold(fold_by_hand)
    assert check_floor(floor_ms)
    assert check_gate(project_with_gate_in_weights)
    print("all solutions pass")
