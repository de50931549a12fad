"""Solutions to the exercises of notebooks/03_the_network.ipynb.

Each section replaces the stub cell of the exercise with the same number; the notebook runner
executes it in the notebook's kernel, then the check cell (see notebooks/README.md)."""
import numpy as np


# %% Exercise 1
def my_num_parameters(spec):
    """Stem + blocks + last 1x1 + classifier; convs have no bias, each BN adds 2 per channel."""
    C0, CL, L, n = spec.stem_channels, spec.blocks[-1].cout, spec.last_channel, spec.num_classes
    total = 3 * C0 * 3 * 3 + 2 * C0                              # stem conv 3x3 + BN
    for b in spec.blocks:
        E, S = b.exp, b.se_channels
        if b.has_expand:
            total += b.cin * E + 2 * E                           # expand 1x1 + BN
        total += E * b.k * b.k + 2 * E                           # depthwise k x k + BN
        if b.se:
            total += E * S + S + S * E + E                       # fc1, fc2 with biases
        total += E * b.cout + 2 * b.cout                         # project 1x1 + BN
    total += CL * 6 * CL + 2 * 6 * CL                            # last 1x1 + BN
    total += 6 * CL * L + L + L * n + n                          # classifier.0, classifier.3
    return total


# %% Exercise 2
def my_receptive_fields(spec):
    """(output stride j, local receptive field r) per module of features."""
    j, r = 2, 3                                                  # stem: 3x3, stride 2
    out = [(j, r)]
    for b in spec.blocks:
        r += b.dilation * (b.k - 1) * j                          # r_l = r + d (k - 1) j_{l-1}
        j *= b.dw_stride                                         # j_l = j_{l-1} s_l
        out.append((j, r))
    out.append((j, r))                                           # the last 1x1 changes nothing
    return out


# %% Exercise 3
def my_head_backward(dlogits, F, p):
    """avgpool -> Linear -> hard-swish -> (eval: no dropout) -> Linear, backwards."""
    N, C, h, w = F.shape
    W0, b0 = p["classifier.0.weight"], p["classifier.0.bias"]       # (L, C), (L,)
    W3 = p["classifier.3.weight"]                                   # (n, L)
    pooled = F.mean(axis=(2, 3))                                    # (N, C)
    z = pooled @ W0.T + b0                                          # (N, L)
    a = z * np.clip(z + 3, 0, 6) / 6                                # hard-swish
    dW3, db3 = dlogits.T @ a, dlogits.sum(axis=0)
    da = dlogits @ W3                                               # (N, L)
    dz = da * np.where(z <= -3, 0, np.where(z >= 3, 1, z / 3 + 0.5))
    dW0, db0 = dz.T @ pooled, dz.sum(axis=0)
    dpooled = dz @ W0                                               # (N, C)
    dF = np.broadcast_to(dpooled[:, :, None, None] / (h * w), F.shape).copy()
    return dF, {"classifier.0.weight": dW0, "classifier.0.bias": db0,
                "classifier.3.weight": dW3, "classifier.3.bias": db3}
