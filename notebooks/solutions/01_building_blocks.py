"""Solutions to the exercises of notebooks/01_building_blocks.ipynb.

Each section replaces the stub cell of the exercise with the same number; the notebook test
runs it in the notebook's kernel, then the check cell (see notebooks/README.md)."""
import numpy as np


# %% Exercise 1
def my_depthwise_backward(dout, x, w, stride, padding):
    """dx, dw of a depthwise conv (dilation 1, no bias): each tap gathers and scatters."""
    s, p = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))          # (N, C, H+2p, W+2p)
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    Ho, Wo = dout.shape[2:]
    for u in range(w.shape[2]):
        for v in range(w.shape[3]):
            rows = slice(u, u + s * (Ho - 1) + 1, s)
            cols = slice(v, v + s * (Wo - 1) + 1, s)
            dw[:, 0, u, v] = np.sum(xp[:, :, rows, cols] * dout, axis=(0, 2, 3))
            dxp[:, :, rows, cols] += w[None, :, 0, u, v, None, None] * dout
    H, W = x.shape[2:]
    return dxp[:, :, p:p + H, p:p + W], dw


# %% Exercise 2
def my_batchnorm_dx(dy, x, gamma, eps):
    """Training-mode batch norm input gradient: the boxed three-term formula."""
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)                        # biased
    r = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * r
    g = gamma[None, :, None, None]
    return g * r * (dy - dy.mean(axis=axes, keepdims=True)
                    - xhat * (dy * xhat).mean(axis=axes, keepdims=True))


# %% Exercise 3
def my_se_backward(dout, x, w1, b1, w2, b2):
    """Squeeze-and-excitation backward; dx = scale path + squeeze path."""
    N, C, H, W = x.shape
    S = w1.shape[0]
    W1, W2 = w1.reshape(S, C), w2.reshape(C, S)
    s = x.mean(axis=(2, 3))                                      # (N, C)
    z1 = s @ W1.T + b1                                           # (N, S)
    a = np.maximum(z1, 0)
    z2 = a @ W2.T + b2                                           # (N, C)
    g = np.clip(z2 + 3, 0, 6) / 6
    dg = np.sum(dout * x, axis=(2, 3))                           # (N, C)
    dz2 = dg * ((z2 > -3) & (z2 < 3)) / 6
    dW2, db2 = dz2.T @ a, dz2.sum(axis=0)
    da = dz2 @ W2
    dz1 = da * (z1 > 0)
    dW1, db1 = dz1.T @ s, dz1.sum(axis=0)
    ds = dz1 @ W1                                                # (N, C)
    dx = dout * g[:, :, None, None] + ds[:, :, None, None] / (H * W)
    return dx, dW1.reshape(S, C, 1, 1), db1, dW2.reshape(C, S, 1, 1), db2
