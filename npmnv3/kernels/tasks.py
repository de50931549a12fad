"""How the fast training kernels use the cores: serial task loops behind one parallel loop.

Every channels-last training kernel is a loop over independent *tasks* (bands of pixels, or
images) whose partial sums go to per-task arrays, merged afterwards in task order. The loop is a
serial function over a range of tasks ``[t0, t1)`` (``@task_kernel``), compiled once per dtype
as a C callback (``numba.cfunc``); ``run_tasks`` runs tasks [0, T) through **one** parallel loop
for the whole library (``_drive``: ``for t in prange(T): kernel(t, t + 1, ...)``, the kernel
called through its address). This is the shape of ``at::parallel_for`` in PyTorch's CPU kernels.

Why not a ``prange`` in every kernel: a ``parallel=True`` function is compiled as a separate
"gufunc" module for the loop body, then the function around it, and LLVM optimises the body's
code again at each level; the fourteen training loops written that way took ~33 s of a first
training step on an empty Numba cache (``benchmarks/bench_train.py --start``). Serial callbacks
compile once each, and the one parallel loop links none of them. Python threads instead of
Numba's were measured too: a hand-off costs ~130 us on this VM (Numba's: ~4 us), and a training
step makes a few hundred kernel calls.

So that one parallel loop fits every kernel, all task kernels share one C signature
(``task_signature``)::

    kernel(t0, t1, sz, a, b, c, d, e, f, g, u, v)

``sz`` int64 sizes and flags (each kernel documents its order), ``a``..``g`` flat C-contiguous
arrays of the data's dtype, ``u``, ``v`` flat float64 arrays; a kernel reshapes them first
thing and ignores the slots it does not use (``run_tasks`` fills them with an empty array).

Results do not depend on the thread count or on timing: each task writes its own rows or its
own partial sums, merged in task order (``sum_parts``, ``channels_last.merge_stats``). The
thread count is Numba's (``numba.set_num_threads``, ``NUMBA_NUM_THREADS``); BLAS runs
single-threaded inside the tasks (``threads.single_threaded_blas``, held by the callers).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .callbacks import Callback, helper_running

F_SLOTS, D_SLOTS = 7, 2          # arrays of the data's dtype, float64 arrays


def task_signature(dtype):
    """The C signature of every task kernel for arrays of ``dtype`` (NumPy or Numba float)."""
    f = dtype if isinstance(dtype, types.Float) else numba.from_dtype(np.dtype(dtype))
    return types.void(types.int64, types.int64, types.int64[::1],
                      *([f[::1]] * F_SLOTS), *([types.float64[::1]] * D_SLOTS))


def task_kernel(py_func) -> Callback:
    """Decorator of every task loop ``kernel(t0, t1, sz, a, b, c, d, e, f, g, u, v)``: a C
    callback of ``task_signature`` (``callbacks.Callback``), compiled on first use per dtype."""
    return Callback(py_func, task_signature)


@intrinsic
def _task_at(typingctx, addr, a):
    """The task kernel at address ``addr`` (int64), as a callable value for arrays like ``a``."""
    fty = types.FunctionType(task_signature(a.dtype))

    def codegen(context, builder, sig, args):
        fn = cgutils.create_struct_proxy(fty)(context, builder)    # the other fields: null
        fn.c_addr = builder.inttoptr(args[0], cgutils.voidptr_t)
        return fn._getvalue()
    return fty(addr, a), codegen


@njit(cache=True, parallel=True)
def _drive(addr, T, sz, a, b, c, d, e, f, g, u, v):
    """The one parallel loop: tasks [0, T) of the kernel at ``addr``, spread over threads."""
    kernel = _task_at(addr, a)
    for t in prange(T):
        t0 = np.int64(t)                   # prange's index is unsigned; the kernel takes int64
        kernel(t0, t0 + 1, sz, a, b, c, d, e, f, g, u, v)


def flat(a: np.ndarray) -> np.ndarray:
    """``a`` as a flat array without a copy (a kernel writes through it)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"task kernels take C-contiguous arrays, got strides {a.strides}")
    return a.reshape(-1)


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}      # the unused slots


def run_tasks(kernel: Callback, T: int, sizes, arrays=(), doubles=()) -> None:
    """Tasks [0, T) of ``kernel``; ``sizes`` its int64 sizes and flags, ``arrays`` (<= 7, of one
    float dtype) and ``doubles`` (<= 2, float64) any C-contiguous arrays, passed flat."""
    dtype = arrays[0].dtype
    f = [flat(a) for a in arrays] + [_EMPTY[dtype]] * (F_SLOTS - len(arrays))
    d = [flat(a) for a in doubles] + [_EMPTY[np.dtype(np.float64)]] * (D_SLOTS - len(doubles))
    ints = np.array(sizes, dtype=np.int64)
    if numba.config.DISABLE_JIT:
        kernel.py_func(0, T, ints, *f, *d)
        return
    addr = kernel.address(dtype)
    if helper_running():        # a compile helper holds a core (a first step on an empty cache)
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            _drive(addr, T, ints, *f, *d)
        finally:
            numba.set_num_threads(threads)
    else:
        _drive(addr, T, ints, *f, *d)


def stat_parts(T: int, K: int) -> np.ndarray:
    """Per-task running statistics in one float64 buffer: count (T,), mean (T, K), M2 (T, K)
    (``stat_views``), for ``channels_last._band_stats`` / ``merge_stats``."""
    return np.zeros(T * (1 + 2 * K))


@njit(cache=True, inline="always")
def stat_views(st, T, K):
    """(count (T, 1), mean (T, K), M2 (T, K)) views of a ``stat_parts`` buffer."""
    return (st[:T].reshape(T, 1), st[T:T + T * K].reshape(T, K),
            st[T + T * K:T + 2 * T * K].reshape(T, K))


def sum_parts(part, out):
    """out[r, c] = sum over t of part[t, r, c] (part float64 (T, R, C)), summed in task order
    (NumPy reduces a leading axis row after row), then rounded once to out's dtype: every
    result independent of how tasks met threads."""
    out[...] = part.sum(axis=0)
