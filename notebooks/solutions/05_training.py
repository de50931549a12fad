# Solutions to the exercises of notebooks/05_training.ipynb.
# Each section replaces the exercise's stub cell; the tests run it, then the check cell.
# ruff: noqa: F821  (np, conv_bn_act_backward, ... come from the notebook's kernel)

# %% Exercise 1
def my_smoothed_ce_grad(logits, labels, eps):
    """d(mean label-smoothed cross-entropy)/d(logits), (N, K)."""
    N, K = logits.shape
    e = np.exp(logits - logits.max(axis=1, keepdims=True))      # max-shifted: no overflow
    p = e / e.sum(axis=1, keepdims=True)                         # softmax
    q = np.full((N, K), eps / K)
    q[np.arange(N), labels] += 1 - eps                           # the smoothed target
    return (p - q) / N                                           # softmax minus target, mean


# %% Exercise 2
def my_block_backward(dout, cache):
    """(dL/dx, {key: gradient}) of one inverted residual block."""
    grads = {}
    d, g = conv_bn_act_backward(dout, cache.project)             # the last step first
    grads.update(g)
    if cache.se is not None:
        d, g = squeeze_excite_backward(d, cache.se)              # both SE paths summed inside
        grads.update(g)
    d, g = conv_bn_act_backward(d, cache.depthwise)
    grads.update(g)
    if cache.expand is not None:
        d, g = conv_bn_act_backward(d, cache.expand)
        grads.update(g)
    if cache.m.spec.use_residual:                                # x fed the block and the skip
        d = d + dout
    return d, grads


# %% Exercise 3
def my_sgd_step(p, g, buf, lr, momentum, weight_decay):
    """One torch.optim.SGD step (dampening 0): returns (new parameter, new momentum buffer)."""
    g = g + weight_decay * p                                     # L2 added to the gradient
    buf = g.copy() if buf is None else momentum * buf + g        # b_1 = g_1, then mu b + g
    return p - lr * buf, buf


# %% Exercise 4
def my_gradcam(A, dA):
    """Grad-CAM maps (N, h, w) at the layer's resolution, before resizing and scaling."""
    alpha = dA.mean(axis=(2, 3))                                 # (N, K): pooled gradients
    return np.maximum((alpha[:, :, None, None] * A).sum(axis=1), 0)  # ReLU(sum_k alpha_k A_k)
