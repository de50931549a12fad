"""``gemm``: one BLAS matrix product for the fast kernels, called the way ``np.dot`` ends up
calling it, without what ``np.dot`` compiles around the call.

Inside Numba, ``np.dot(a, b, out)`` checks shapes, copies non-contiguous operands and handles
empty ones, and each combination of argument types compiles that code again (with its helper
functions) in every callback that uses it: ~0.3-0.6 s of an empty-cache start per process for a
product that is one call to SciPy's BLAS (``numba_xxgemm``, Numba's own entry point, which
looks up ``sgemm`` / ``dgemm`` in ``scipy.linalg.cython_blas``). The fast kernels pass
operands whose shapes come from one plan row and are contiguous by construction, so ``gemm``
is just that call: row-major ``out = op(a) @ b`` is column-major ``out^T = b^T @ op(a)^T``,
where ``op(a)`` is ``a`` (C order) or the transpose of a C-order array (an F-order view such as
``m.T``).

Contract (the caller's, as for any BLAS call): ``op(a)`` (P, C), ``b`` (C, K) C order, ``out``
(P, K) C order, one float dtype; nothing is checked at run time.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def gemm(typingctx, a, b, out):
    """out (P, K) = op(a) (P, C) @ b (C, K), overwriting out (see the module docstring)."""
    arrays = (a, b, out)
    if not all(isinstance(t, types.Array) and t.ndim == 2 for t in arrays):
        return None
    if a.layout not in "CF" or b.layout != "C" or out.layout != "C" or \
            len({t.dtype for t in arrays}) != 1 or a.dtype not in (types.float32, types.float64):
        return None
    sig = types.void(a, b, out)

    def codegen(context, builder, sig, args):
        from numba.np.linalg import ensure_blas
        ensure_blas()
        x, y, z = (context.make_array(t)(context, builder, v) for t, v in zip(arrays, args))
        P, C = cgutils.unpack_tuple(builder, x.shape)
        K = cgutils.unpack_tuple(builder, y.shape)[1]
        intp = context.get_value_type(types.intp)
        one = intp(1)
        if a.layout == "C":                   # a (P, C): column-major (C, P), no transpose
            trans_a, lda = ord("n"), builder.select(builder.icmp_signed("<", C, one), one, C)
        else:                                 # a = m.T, m (C, P) C order: column-major (P, C)
            trans_a, lda = ord("t"), builder.select(builder.icmp_signed("<", P, one), one, P)
        ldk = builder.select(builder.icmp_signed("<", K, one), one, K)
        char, vp = ir.IntType(8), cgutils.voidptr_t
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [
            char, char, char, intp, intp, intp, vp, vp, intp, vp, intp, vp, vp, intp]),
            "numba_xxgemm")
        dtype = context.get_value_type(a.dtype)
        alpha = cgutils.alloca_once_value(builder, dtype(1.0))
        beta = cgutils.alloca_once_value(builder, dtype(0.0))
        kind = ord("s") if a.dtype == types.float32 else ord("d")
        builder.call(fn, [char(kind), char(ord("n")), char(trans_a), K, P, C,
                          builder.bitcast(alpha, vp), builder.bitcast(y.data, vp), ldk,
                          builder.bitcast(x.data, vp), lda, builder.bitcast(beta, vp),
                          builder.bitcast(z.data, vp), ldk])
        return context.get_dummy_value()
    return sig, codegen
