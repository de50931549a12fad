"""``kernels.blas.gemm``: the fast kernels' one BLAS call, against NumPy's product."""

import numpy as np
import pytest
from numba import njit

from npmnv3.kernels.blas import gemm


@njit(cache=True)
def _plain(a, b, out):
    gemm(a, b, out)


@njit(cache=True)
def _transposed(m, b, out):
    gemm(m.T, b, out)


@njit(cache=True)
def _rows(a, b, out, r0, r1):
    gemm(a[r0:r1], b, out[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P,C,K", [(5, 7, 3), (1, 1, 1), (64, 27, 16), (0, 4, 3), (3, 0, 2),
                                   (4, 3, 0)])
def test_gemm_equals_numpy(dtype, P, C, K):
    """out = a @ b, a.T-views (F order, the im2col and dW products) and row bands too, empty
    sizes included (an empty inner dimension gives zeros); out is overwritten."""
    rng = np.random.default_rng(P * 100 + C * 10 + K)
    a = rng.standard_normal((P, C)).astype(dtype)
    b = rng.standard_normal((C, K)).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    out = np.full((P, K), np.nan, dtype)
    _plain(a, b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, **tol)
    out = np.full((P, K), np.nan, dtype)
    _transposed(np.ascontiguousarray(a.T), b, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, **tol)
    if P >= 2:
        out = np.full((P, K), 7.0, dtype)
        _rows(a, b, out, 1, P)
        np.testing.assert_allclose(out[1:], a[1:].astype(np.float64) @ b, **tol)
        assert np.all(out[0] == 7.0)                          # other rows untouched


def test_gemm_refuses_what_it_cannot_do_without_a_copy():
    """Strided operands or mixed dtypes are typing errors, never a silent copy."""
    from numba.core.errors import TypingError
    a = np.ones((4, 6), np.float32)
    with pytest.raises(TypingError):
        _plain(a[:, ::2], np.ones((3, 2), np.float32), np.empty((4, 2), np.float32))
    with pytest.raises(TypingError):
        _plain(a, np.ones((6, 2), np.float64), np.empty((4, 2), np.float32))
