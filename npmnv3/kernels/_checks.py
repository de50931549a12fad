"""Argument checks shared by every kernel.

Each check raises ``ValueError`` naming the argument and the shapes involved, so a wrong call
fails at the kernel boundary with a message that says what is wrong, not deep inside a loop.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(name: str, a, ndim: int | tuple[int, ...] | None = None,
                dtype: np.dtype | None = None) -> np.ndarray:
    """Return ``a`` if it is a float32/float64 ndarray with ``ndim`` dims and ``dtype``."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got dtype {a.dtype} "
                         f"(shape {a.shape})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if a.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but the input has dtype {dtype}; "
                         f"cast one of them (shape {a.shape})")
    return a


def check_shape(name: str, a: np.ndarray, shape: tuple[int, ...], why: str = "") -> None:
    if a.shape != tuple(shape):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {a.shape}")


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def conv_out_size(name: str, size: int, k: int, stride: int, padding: int,
                  dilation: int) -> int:
    """Output length of a convolution: floor((size + 2p - d(k-1) - 1) / s) + 1 (torch's rule)."""
    span = dilation * (k - 1) + 1
    if size + 2 * padding < span:
        raise ValueError(
            f"input {name} size {size} with padding {padding} is smaller than the dilated "
            f"kernel span {span} (kernel {k}, dilation {dilation})")
    return (size + 2 * padding - span) // stride + 1


def check_conv_geometry(x: np.ndarray, kh: int, kw: int, stride: int, padding: int,
                        dilation: int) -> tuple[int, int]:
    """Validate stride/padding/dilation and return (Ho, Wo)."""
    check_positive_int("stride", stride)
    check_positive_int("dilation", dilation)
    check_positive_int("padding", padding, minimum=0)
    ho = conv_out_size("height", x.shape[2], kh, stride, padding, dilation)
    wo = conv_out_size("width", x.shape[3], kw, stride, padding, dilation)
    return ho, wo


def choose_impl(impl: str, fast, naive):
    """Return ``fast`` or ``naive`` for ``impl="fast"`` / ``impl="naive"``."""
    if impl == "fast":
        return fast
    if impl == "naive":
        return naive
    raise ValueError(f"impl must be 'fast' or 'naive', got {impl!r}")
