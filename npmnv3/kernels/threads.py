"""Who owns the cores: one thread pool at a time, whatever was imported first.

Two pools share the two cores of a small machine: Numba's (OpenMP) for our loops and the BLAS
threads of OpenBLAS (NumPy ships one copy, SciPy another; Numba's ``np.dot`` calls SciPy's). An
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

from contextlib import contextmanager

_CONTROLLER = None
_DEPTH = 0          # nesting depth of single_threaded_blas(): inner calls cost nothing


def init():
    """Called by ``import npmnv3``: nothing is set at import (no environment variable, no
    thread count); the pools are taken only while an engine call runs."""
    return None


def controller():
    """The process's ``threadpoolctl.ThreadpoolController``, made on first use, after loading
    the BLAS that Numba calls (SciPy's) so that the controller sees it."""
    global _CONTROLLER
    if _CONTROLLER is None:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS behind Numba's np.dot)
        from threadpoolctl import ThreadpoolController
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


@contextmanager
def single_threaded_blas():
    """Every BLAS library single-threaded inside the block; previous counts restored after.
    Re-entrant: a nested call (a kernel inside a model's training step) costs nothing, the
    outermost one pays threadpoolctl's ~60 us."""
    global _DEPTH
    if _DEPTH:
        _DEPTH += 1
        try:
            yield
        finally:
            _DEPTH -= 1
        return
    with controller().limit(limits=1, user_api="blas"):
        _DEPTH = 1
        try:
            yield
        finally:
            _DEPTH = 0


def blas_threads() -> dict:
    """{library file name: thread count} of every BLAS loaded in the process."""
    return {lib.filepath.rsplit("/", 1)[-1]: lib.num_threads
            for lib in controller().select(user_api="blas").lib_controllers}
