"""The activation epilogue: the one place a fused kernel's activation and its gradient are written.

Every kernel that fuses an activation into another pass (batch norm + activation, the direct
stem convolution, depthwise convolution, the fused eval path's bias + activation) calls
``apply_act`` on each value it writes and, in a backward, ``act_grad`` on each gradient it reads.
Both are inlined into the caller's loop by Numba, so fusion costs no call.

Activation codes (``ACT_CODES``): 0 none (identity), 1 ReLU, 2 hard-swish; and ``HARDSIGMOID`` = 3,
forward only (the SE gate of the eval engine; not in ``ACT_CODES``, so no backward accepts it).
The formulas and the
values at the kinks are torch's (``aten/src/ATen/native/cpu/Activation.cpp``), evaluated in the
same order so float32 results are bit-identical to torch's kernels and to ``activations.py``:

    ReLU        y = max(v, 0)                          dy/dv = 1 if v > 0 else 0
    hard-swish  y = (v * min(max(v + 3, 0), 6)) / 6     dy/dv = 0 (v <= -3), v/3 + 1/2, 1 (v >= 3)
    hard-sigm.  y = min(max(v + 3, 0), 6) / 6

The constants arrive as arguments in the input's dtype (``z`` = 0, ``three``, ``six``,
``half``): a bare literal such as ``v + 3`` would make Numba promote float32 to float64.
``consts(dtype)`` builds them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ACT_CODES = {None: 0, "relu": 1, "hardswish": 2}
HARDSIGMOID = 3


def act_code(act) -> int:
    """The epilogue code of activation ``act`` (None, "relu" or "hardswish")."""
    try:
        return ACT_CODES[act]
    except (KeyError, TypeError):
        raise ValueError(f"act must be one of {list(ACT_CODES)}, got {act!r}") from None


def consts(dtype):
    """``(z, three, six, half)`` in ``dtype``: the epilogue's constants."""
    t = np.dtype(dtype).type
    return t(0), t(3), t(6), t(0.5)


@njit(cache=True, inline="always")
def apply_act(v, act, z, three, six):
    """act(v) for code ``act`` (0 none, 1 ReLU, 2 hard-swish, 3 hard-sigmoid)."""
    if act == 1:
        return max(v, z)
    if act == 2:
        return (v * min(max(v + three, z), six)) / six
    if act == 3:
        return min(max(v + three, z), six) / six
    return v


@njit(cache=True, inline="always")
def act_grad(act, v, g, z, three, half):
    """dL/dv from g = dL/d act(v), with torch's values at the kinks."""
    if act == 1:
        return g if v > z else z
    if act == 2:
        if v <= -three:
            return z
        if v >= three:
            return g
        return g * (v / three + half)
    return g
