"""Softmax cross-entropy with optional label smoothing (torch ``F.cross_entropy``).

Legend: N batch, K classes. logits z (N, K), integer labels y (N,), smoothing eps in [0, 1].

    logp = z - logsumexp(z)                      (row-wise, max-shifted for stability)
    q    = (1 - eps) * onehot(y) + eps / K       the smoothed target distribution
    loss_n = - sum_k q[n, k] logp[n, k]          reduction: mean over n (default), sum, or none
    dz   = softmax(z) - q                        (divided by N for "mean"), times dloss

Label smoothing: Szegedy et al., arXiv:1512.00567 §7; torch's definition is the one above.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import check_array, choose_impl

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyCache(NamedTuple):
    prob: np.ndarray       # (N, K) softmax(z)
    target: np.ndarray     # (N, K) smoothed one-hot q
    reduction: str


def _check_args(logits, labels, label_smoothing, reduction):
    check_array("logits", logits, ndim=2)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer numpy array, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    N, K = logits.shape
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape ({N},) to match logits {logits.shape}, "
                         f"got {labels.shape}")
    if N and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}) for logits {logits.shape}; got values "
                         f"from {labels.min()} to {labels.max()}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_sample, reduction):
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def cross_entropy_forward_naive(logits, labels, *, label_smoothing=0.0, reduction="mean"):
    """One sample at a time, as the formula reads. Returns ``(loss, cache)``."""
    _check_args(logits, labels, label_smoothing, reduction)
    N, K = logits.shape
    dt = logits.dtype
    prob = np.zeros_like(logits)
    target = np.zeros_like(logits)
    per_sample = np.zeros(N, dtype=dt)
    for n in range(N):
        z = logits[n] - logits[n].max()
        logp = z - np.log(np.sum(np.exp(z)))                   # (K,) log-softmax
        q = np.full(K, label_smoothing / K, dtype=dt)
        q[labels[n]] += 1 - label_smoothing                     # smoothed one-hot
        per_sample[n] = -np.sum(q * logp)
        prob[n], target[n] = np.exp(logp), q
    return _reduce(per_sample, reduction), CrossEntropyCache(prob, target, reduction)


def cross_entropy_forward_fast(logits, labels, *, label_smoothing=0.0, reduction="mean"):
    """Vectorised over the batch; same contract as the naive version."""
    _check_args(logits, labels, label_smoothing, reduction)
    N, K = logits.shape
    dt = logits.dtype
    z = logits - logits.max(axis=1, keepdims=True)             # (N, K)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))    # (N, K)
    target = np.full((N, K), label_smoothing / K, dtype=dt)
    target[np.arange(N), labels] += dt.type(1 - label_smoothing)
    per_sample = -(target * logp).sum(axis=1)                   # (N,)
    return _reduce(per_sample, reduction), CrossEntropyCache(np.exp(logp), target, reduction)


def cross_entropy_backward(dloss, cache: CrossEntropyCache, *, impl="fast"):
    """dlogits = (softmax - q) * dloss (/N for the mean). ``dloss`` is a scalar, or (N,) for
    ``reduction="none"``. One closed form serves both implementations (``impl`` is checked)."""
    choose_impl(impl, "fast", "naive")
    prob, target, reduction = cache
    N = prob.shape[0]
    d = np.asarray(dloss, dtype=prob.dtype)
    if reduction == "none":
        if d.shape not in ((), (N,)):
            raise ValueError(f"dloss must be a scalar or have shape ({N},), got {d.shape}")
        d = d.reshape(-1, 1) if d.ndim else d
    elif d.shape != ():
        raise ValueError(f"dloss must be a scalar for reduction={reduction!r}, got {d.shape}")
    scale = d / N if reduction == "mean" else d
    return ((prob - target) * scale).astype(prob.dtype)


def cross_entropy_forward(logits, labels, *, label_smoothing=0.0, reduction="mean",
                          impl="fast"):
    """Softmax cross-entropy of logits (N, K) against integer labels (N,): ``(loss, cache)``."""
    f = choose_impl(impl, cross_entropy_forward_fast, cross_entropy_forward_naive)
    return f(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
