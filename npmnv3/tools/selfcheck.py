"""Self-check without torch: every kernel's backward against central differences, and the fast
implementation against the naive one, in float64 on small random inputs.

``run_selfcheck()`` returns one ``CheckRow`` per (kernel, quantity); ``iter_selfcheck()`` yields
them as each is done (``npmnv3 selfcheck`` prints them so). The tests (tests/) hold the full,
torch-referenced checks; this is the quick proof a user can run anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import kernels as K
from .gradcheck import numerical_gradient, rel_error

FD_TOL = 1e-6          # central differences, h = 1e-6, float64
AGREE_TOL = 1e-12      # naive vs fast, float64: only summation order differs


class CheckRow(NamedTuple):
    kernel: str
    check: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def _cases(rng):
    """(name, forward(*arrays, impl), backward(dout, cache, impl), arrays, grad names)."""
    r = rng.standard_normal
    bn = dict(eps=1e-3, momentum=0.01)
    return [
        ("conv2d 3x3 s2", lambda x, w, impl: K.conv2d_forward(x, w, stride=2, padding=1,
                                                              impl=impl),
         K.conv2d_backward, [r((2, 3, 7, 6)), r((4, 3, 3, 3))], ["dx", "dw"]),
        ("pointwise 1x1", lambda x, w, b, impl: K.pointwise_forward(x, w, b, impl=impl),
         K.pointwise_backward, [r((2, 5, 3, 4)), r((6, 5, 1, 1)), r(6)], ["dx", "dw", "db"]),
        ("depthwise 5x5 s2", lambda x, w, impl: K.depthwise_forward(x, w, stride=2, padding=2,
                                                                    impl=impl),
         K.depthwise_backward, [r((2, 3, 9, 8)), r((3, 1, 5, 5))], ["dx", "dw"]),
        ("depthwise 3x3 d2", lambda x, w, impl: K.depthwise_forward(x, w, padding=2, dilation=2,
                                                                    impl=impl),
         K.depthwise_backward, [r((1, 3, 7, 7)), r((3, 1, 3, 3))], ["dx", "dw"]),
        ("batchnorm train", lambda x, w, b, impl: K.batchnorm_forward(
            x, w, b, np.zeros(3), np.ones(3), training=True, impl=impl, **bn)[:2],
         K.batchnorm_backward, [r((2, 3, 4, 5)), r(3) + 1, r(3)], ["dx", "dweight", "dbias"]),
        ("batchnorm eval", lambda x, w, b, impl: K.batchnorm_forward(
            x, w, b, np.full(3, 0.3), np.full(3, 1.7), training=False, impl=impl, **bn)[:2],
         K.batchnorm_backward, [r((2, 3, 4, 5)), r(3) + 1, r(3)], ["dx", "dweight", "dbias"]),
        ("batchnorm + hardswish", lambda x, w, b, impl: K.batchnorm_act_forward(
            x, w, b, np.zeros(3), np.ones(3), act="hardswish", training=True, impl=impl,
            **bn)[:2],
         K.batchnorm_act_backward, [r((2, 3, 4, 5)), r(3) + 1, r(3)],
         ["dx", "dweight", "dbias"]),
        ("hardswish", lambda x, impl: K.hardswish_forward(x, impl=impl), K.hardswish_backward,
         [r((2, 3, 4)) * 4], ["dx"]),
        ("hardsigmoid", lambda x, impl: K.hardsigmoid_forward(x, impl=impl),
         K.hardsigmoid_backward, [r((2, 3, 4)) * 4], ["dx"]),
        ("relu", lambda x, impl: K.relu_forward(x, impl=impl), K.relu_backward,
         [r((2, 3, 4))], ["dx"]),
        ("squeeze-excite", lambda x, w1, b1, w2, b2, impl: K.se_forward(x, w1, b1, w2, b2,
                                                                       impl=impl),
         K.se_backward, [r((2, 8, 3, 4)), r((8, 8, 1, 1)), r(8), r((8, 8, 1, 1)), r(8)],
         ["dx", "dw1", "db1", "dw2", "db2"]),
        ("avgpool", lambda x, impl: K.avgpool_forward(x, impl=impl), K.avgpool_backward,
         [r((2, 3, 4, 5))], ["dx"]),
        ("linear", lambda x, w, b, impl: K.linear_forward(x, w, b, impl=impl), K.linear_backward,
         [r((3, 5)), r((4, 5)), r(4)], ["dx", "dw", "db"]),
    ]


def _away_from_kinks(a):
    """Nudge values off the activation kinks (0, +-3) where derivatives jump."""
    for k in (-3.0, 0.0, 3.0):
        a[np.abs(a - k) < 1e-3] += 2e-3
    return a


def run_selfcheck(seed: int = 0) -> list[CheckRow]:
    """Every check's ``CheckRow``."""
    return list(iter_selfcheck(seed))


def iter_selfcheck(seed: int = 0):
    """Yield the ``CheckRow`` of each check as soon as it is done."""
    rng = np.random.default_rng(seed)
    for name, fwd, bwd, arrays, gnames in _cases(rng):
        arrays = [_away_from_kinks(a) for a in arrays]
        outs = {}
        for impl in ("naive", "fast"):
            out, cache = fwd(*arrays, impl)
            outs[impl] = out
            dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
            grads = bwd(dout, cache, impl=impl)
            grads = grads if isinstance(grads, tuple) else (grads,)
            outs[impl + "_grads"] = grads
        yield CheckRow(name, "naive == fast (forward)", rel_error(outs["naive"], outs["fast"]),
                       AGREE_TOL)
        for i, g in enumerate(gnames):
            yield CheckRow(name, f"naive == fast ({g})",
                           rel_error(outs["naive_grads"][i], outs["fast_grads"][i]), AGREE_TOL)

            def f(fwd=fwd, arrays=arrays, dout=dout):    # sum(out * dout): d/da = backward
                return float(np.sum(fwd(*arrays, "fast")[0] * dout))

            num = numerical_gradient(f, arrays[i])
            yield CheckRow(name, f"finite differences ({g})",
                           rel_error(outs["fast_grads"][i], num), FD_TOL)
    z = rng.standard_normal((4, 6))
    y = np.array([0, 5, 2, 2])
    loss, cache = K.cross_entropy_forward(z, y, label_smoothing=0.1)
    num = numerical_gradient(
        lambda: float(K.cross_entropy_forward(z, y, label_smoothing=0.1)[0]), z)
    yield CheckRow("cross-entropy", "finite differences (dlogits)",
                   rel_error(K.cross_entropy_backward(1.0, cache), num), FD_TOL)
