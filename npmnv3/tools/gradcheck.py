"""Central finite differences and relative error, shared by the tests and the notebooks.

To check a backward, contract the forward with a fixed random upstream gradient ``dout``:
``f(a) = sum(forward(a) * dout)``; then df/da is exactly what backward returns for ``dout``.
A random ``dout`` (never ones: batch norm's input gradient is then identically zero) makes the
check sensitive to every output element.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(f: Callable[[], float], a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """df/da by central differences, perturbing ``a`` in place and restoring it.

    ``f`` takes no arguments and reads ``a`` (float64 recommended); error is O(h^2).
    """
    if a.dtype != np.float64:
        raise ValueError(f"finite differences need float64, got {a.dtype}")
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, a):
        raise ValueError("a must be contiguous so it can be perturbed in place")
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """max |a - b| / max(max |a|, max |b|, floor): one number for a whole tensor."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max(), floor)
    return float(np.abs(a - b).max() / scale)
