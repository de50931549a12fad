"""Solutions to the exercises of notebooks/08_int8_quantization.ipynb.

Each block below replaces the exercise cell of the same number; ``tests/test_notebooks.py``
runs them with the notebook's first cell and its check cells, and requires every check to
print "Exercise N: correct". The blocks use the names the notebook's first cell imports
(``np``, ``K``); the imports here only make the file importable on its own.
"""

import numpy as np

from npmnv3 import kernels as K


# %% Exercise 1
def my_qparams(lo, hi):
    lo = np.minimum(np.float32(lo), np.float32(0))         # the range must contain 0.0
    hi = np.maximum(np.float32(hi), np.float32(0))
    scale = np.maximum((hi - lo) / np.float32(255), np.finfo(np.float32).eps)
    zero_point = int(np.clip(-np.rint(lo / scale), 0, 255))
    return float(scale), zero_point


# %% Exercise 2
def my_requantize(acc, x_scale, w_scale, out_scale, out_zp, relu=False):
    M = (np.asarray(w_scale, np.float32) * np.float32(x_scale)) * (np.float32(1) /
                                                                    np.float32(out_scale))
    y = np.rint(acc.astype(np.float32) * M[None, :, None, None]) + out_zp
    return np.clip(y, out_zp if relu else 0, 255).astype(np.uint8)


# %% Exercise 3
def my_float_add(qa, sa, za, qb, sb, zb, s_out, z_out):
    total = K.dequantize(qa, sa, za) + K.dequantize(qb, sb, zb)
    return K.quantize_per_tensor(total, s_out, z_out)


# %% Exercise 4
def my_weight_scales(w):
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return (absmax / np.float32(127.5)).astype(np.float32)
