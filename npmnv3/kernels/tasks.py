"""How the fast kernels use the cores: serial task loops started on Numba's thread pool.

Every channels-last training kernel is a loop over independent *tasks* (bands of pixels, or
images) whose partial sums go to per-task arrays, merged afterwards in task order. The loop is a
serial function over a range of tasks ``[t0, t1)`` (``@task_kernel``), compiled once per dtype
as a C callback (``numba.cfunc``); ``run_tasks`` runs tasks [0, T) on the threads of Numba's
threading layer (OpenMP here) through ``parallel_tasks``, the kernel called through its
address. This is the shape of ``at::parallel_for`` in PyTorch's CPU kernels; the eval engine's
``forward`` (``npmnv3/engine/run.py``) starts its phases the same way.

Why not a ``prange``: a ``parallel=True`` function is compiled as a separate "gufunc" module for
the loop body, then the function around it, and LLVM optimises the body's code again at each
level; the fourteen training loops written that way took ~33 s of a first training step on an
empty Numba cache (``benchmarks/bench_train.py --start``). Serial callbacks compile once each.
Even one ``prange`` loop that only calls a kernel through its address cost 0.6-1.5 s to compile
(its gufunc passes every array argument piece by piece), so neither path has one:
``parallel_tasks`` hands the threading layer's ``parallel_for`` (the entry point ``prange``
loops are lowered to) a worker of its own, a loop of a few LLVM instructions; ``_drive``
compiles in ~0.2 s (benchmarks/README.md, "No prange"). Python threads
instead of Numba's were measured too: a hand-off costs ~130 us on this VM (Numba's: ~4 us), and
a training step makes a few hundred kernel calls.

So that one driver fits every kernel, all task kernels share one C signature
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
from llvmlite import ir
from numba import njit, types
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
def parallel_tasks(typingctx, addr, T, args):
    """``kernel(t0, t1, *args)`` over tasks [0, T) on the ``numba.get_num_threads()`` threads
    of Numba's threading layer (as a ``prange`` loop: the layer sets every thread's own
    setting to the count it is given, so passing fewer, min(T, threads), left the caller's
    thread count at 1 after a one-task call), the kernel a C callback at address ``addr`` (int64)
    taking two int64 then the members of the tuple ``args``; every task ends before this
    returns.

    This is what a ``prange`` loop is lowered to, without the gufunc: the layer's
    ``parallel_for(fn, args, dims, steps, data, inner_ndim, array_count, threads)`` calls
    ``fn(args, dims, steps, data)`` on each thread for a chunk of ``dims[0]`` iterations (one per
    call with OpenMP, a thread's share with the workqueue layer) whose first index is
    ``args[0]``; with ``args[0] = 0`` and a step of 1 that pointer *is* the index. ``data``
    points to (addr, args) in this frame. Needs ``launch()`` before the caller is compiled or
    loaded (it registers ``numba_parallel_for`` and ``get_num_threads``), and a caller that
    does not hold the GIL (``nogil=True``): a worker may need it (Numba's BLAS entry point
    looks ``sgemm`` up through Python on its first call) while the caller waits for it."""
    if not (isinstance(args, types.BaseTuple) and isinstance(addr, types.Integer)
            and isinstance(T, types.Integer)):
        return None
    sig = types.void(addr, T, args)

    def codegen(context, builder, sig, llargs):
        mod = builder.module
        llargs = [context.cast(builder, llargs[0], addr, types.int64),
                  context.cast(builder, llargs[1], T, types.intp), llargs[2]]
        i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        intp = context.get_value_type(types.intp)
        data_ty = ir.LiteralStructType([i64, context.get_value_type(args)])
        kernel_ty = context.get_value_type(
            types.FunctionPrototype(types.void, (types.int64, types.int64, *args.types)))
        # the worker: for t in [first, first + count): kernel(t, t + 1, *args)
        worker = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p.as_pointer(),
                             intp.as_pointer(), intp.as_pointer(), i8p]),
                             name=mod.get_unique_name("npmnv3_tasks_worker"))
        worker.linkage = "internal"
        wb = ir.IRBuilder(worker.append_basic_block())
        w_args, w_dims, _, w_data = worker.args
        first = wb.ptrtoint(wb.load(w_args), i64)
        data = wb.load(wb.bitcast(w_data, data_ty.as_pointer()))
        kernel = wb.inttoptr(wb.extract_value(data, 0), kernel_ty)
        members = wb.extract_value(data, 1)
        members = [wb.extract_value(members, k) for k in range(len(args))]
        with cgutils.for_range(wb, wb.load(w_dims)) as loop:
            t = wb.add(first, loop.index)
            wb.call(kernel, [t, wb.add(t, i64(1)), *members])
        wb.ret_void()
        # the call: one "array" (the index) of step 1 starting at 0, T iterations
        d = cgutils.alloca_once(builder, data_ty)
        builder.store(builder.insert_value(builder.insert_value(data_ty(ir.Undefined),
                                                                llargs[0], 0), llargs[2], 1), d)
        base = cgutils.alloca_once_value(builder, i8p(None))
        dims = cgutils.alloca_once_value(builder, llargs[1])
        steps = cgutils.alloca_once_value(builder, intp(1))
        parallel_for = cgutils.get_or_insert_function(
            mod, ir.FunctionType(ir.VoidType(), [i8p] * 5 + [intp] * 3), "numba_parallel_for")
        get_num_threads = cgutils.get_or_insert_function(mod, ir.FunctionType(intp, []),
                                                         "get_num_threads")
        threads = builder.call(get_num_threads, [])     # this thread's setting, as prange's
        builder.call(parallel_for, [builder.bitcast(v, i8p) for v in (worker, base, dims, steps, d)]
                     + [intp(0), intp(1), threads])
        return context.get_dummy_value()
    return sig, codegen


_LAUNCHED = []


def launch():
    """Start Numba's threading layer (once; it registers the symbols ``parallel_tasks`` calls)."""
    if not _LAUNCHED:
        from numba.np.ufunc.parallel import _launch_threads
        _launch_threads()
        _LAUNCHED.append(True)


@njit(cache=True, nogil=True)
def _drive(addr, T, sz, a, b, c, d, e, f, g, u, v):
    """The one driver: tasks [0, T) of the kernel at ``addr``, spread over Numba's threads."""
    parallel_tasks(addr, T, (sz, a, b, c, d, e, f, g, u, v))


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
    launch()
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
