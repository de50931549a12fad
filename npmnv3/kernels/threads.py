"""Who owns the cores: one thread pool at a time, whatever was imported first.

Two pools share the two cores of a small machine: Numba's (OpenMP) for our loops and the BLAS
threads of OpenBLAS (NumPy ships one copy, SciPy another; Numba's BLAS calls go to SciPy's). An
OpenBLAS worker spins for a while after each multiply, and a Numba worker spins after each
parallel loop; when they alternate on the same cores each waits for the other's time slice
(~8 ms per switch measured here, ``benchmarks/README.md``). The environment variables that tune
the spinning (``OPENBLAS_THREAD_TIMEOUT``, ``OMP_WAIT_POLICY``) are read once, when each library
is loaded, so they depend on import order; npmnv3 does not touch them.

Instead, the eval engine puts all its parallelism in Numba loops and calls BLAS from inside
them, one single-threaded multiply per thread: ``single_threaded_blas()`` sets every loaded
BLAS to one thread for the duration of a call, through threadpoolctl (one
``ThreadpoolController``, made once), and restores the previous counts afterwards. The OpenBLAS
workers then never wake up, whichever library was imported first.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

_CONTROLLER = None
_BLAS = None            # the lib controllers of every BLAS loaded when the controller was made
_DEPTH = 0              # nesting depth of single_threaded_blas(): inner calls cost nothing


def init():
    """Called by ``import npmnv3``: nothing is set at import (no environment variable, no
    thread count); the pools are taken only while an engine call runs."""
    return None


def controller():
    """The process's ``threadpoolctl.ThreadpoolController``, made on first use, after loading
    the BLAS that Numba calls (SciPy's) so that the controller sees it."""
    global _CONTROLLER
    if _CONTROLLER is None:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS behind np.dot and blas.gemm)
        from threadpoolctl import ThreadpoolController
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def _blas_libs():
    global _BLAS
    if _BLAS is None:
        _BLAS = list(controller().select(user_api="blas").lib_controllers)
    return _BLAS


@contextmanager
def single_threaded_blas():
    """Every BLAS library single-threaded inside the block; previous counts restored after.

    threadpoolctl's own ``limit`` context re-selects the libraries on every entry (~40 us);
    this keeps the selection and costs a few ctypes calls, so it can wrap every GEMM call of
    the reference kernels too. Re-entrant: a nested call (a kernel inside a model's training
    step, which holds the outer one) costs nothing and restores nothing.
    """
    global _DEPTH
    if _DEPTH:
        _DEPTH += 1
        try:
            yield
        finally:
            _DEPTH -= 1
        return
    libs = _blas_libs()
    before = [lib.get_num_threads() for lib in libs]
    for lib, n in zip(libs, before):
        if n != 1:
            lib.set_num_threads(1)
    _DEPTH = 1
    try:
        yield
    finally:
        _DEPTH = 0
        for lib, n in zip(libs, before):
            if n != 1:
                lib.set_num_threads(n)


def blas_single(fn):
    """Decorator: run ``fn`` inside ``single_threaded_blas()``. The fast reference kernels
    alternate GEMMs with Numba parallel loops; with multi-threaded BLAS the two pools spin
    against each other (a Small training step at batch 32: 45-49 ms/image, vs 17-18 with
    BLAS single-threaded and Numba's threads owning the cores, benchmarks/README.md)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)
    return wrapped


def blas_threads() -> dict:
    """{library file name: thread count} of every BLAS loaded in the process."""
    return {lib.filepath.rsplit("/", 1)[-1]: lib.num_threads
            for lib in controller().select(user_api="blas").lib_controllers}
