"""Solutions to the exercises of notebooks/02_inverted_residual.ipynb.

Each section replaces the stub cell of the exercise with the same number; the notebook runner
executes it in the notebook's kernel, then the check cell (see notebooks/README.md)."""
import numpy as np

from npmnv3 import kernels as K


# %% Exercise 1
def my_make_divisible(v, divisor):
    """Nearest multiple (halves up), at least one divisor, never down by more than 10 %."""
    new_v = int(v + divisor / 2) // divisor * divisor         # rule 1
    new_v = max(new_v, divisor)                               # rule 2
    if new_v < 0.9 * v:                                       # rule 3
        new_v += divisor
    return new_v


# %% Exercise 2
def my_fold_bn(w, gamma, beta, mean, var, eps):
    """Eval-mode BN after a bias-free conv as one conv: w' = alpha w, b' = beta - alpha mu."""
    alpha = gamma / np.sqrt(var + eps)                         # (K,)
    return w * alpha[:, None, None, None], beta - alpha * mean


# %% Exercise 3
def my_fixed_bneck_backward(dout, c, b, pre):
    """The suspect backward with the depthwise activation's derivative taken at *its* input
    (c["dw.act"]); the suspect used the expand activation's cache, of the same shape at
    stride 1, so nothing complained."""
    g = {}
    dp, g[f"{pre}.block.3.1.weight"], g[f"{pre}.block.3.1.bias"] = K.batchnorm_backward(
        dout, c["project.bn"])
    ds, g[f"{pre}.block.3.0.weight"], _ = K.pointwise_backward(dp, c["project.conv"])
    dd, *gse = K.se_backward(ds, c["se"])
    for k, gk in zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), gse):
        g[f"{pre}.block.2.{k}"] = gk
    dd = K.activation_backward(b.act, dd, c["dw.act"])       # the fix: dw.act, not expand.act
    dd, g[f"{pre}.block.1.1.weight"], g[f"{pre}.block.1.1.bias"] = K.batchnorm_backward(
        dd, c["dw.bn"])
    de, g[f"{pre}.block.1.0.weight"], _ = K.depthwise_backward(dd, c["dw.conv"])
    de = K.activation_backward(b.act, de, c["expand.act"])
    de, g[f"{pre}.block.0.1.weight"], g[f"{pre}.block.0.1.bias"] = K.batchnorm_backward(
        de, c["expand.bn"])
    dx, g[f"{pre}.block.0.0.weight"], _ = K.pointwise_backward(de, c["expand.conv"])
    if b.use_residual:
        dx = dx + dout
    return dx, g
