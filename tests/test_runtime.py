"""The runtime helpers of the fast kernels: one BLAS thread inside the kernels' loops, and
freed memory kept for the next training step."""

import os
import resource

import numpy as np
import pytest

from npmnv3.kernels import heap, threads


def test_single_threaded_blas_nests_and_restores():
    before = threads.blas_threads()
    with threads.single_threaded_blas():
        assert set(threads.blas_threads().values()) == {1}
        with threads.single_threaded_blas():           # nested: still 1, and no restore
            assert set(threads.blas_threads().values()) == {1}
        assert set(threads.blas_threads().values()) == {1}
    assert threads.blas_threads() == before


def test_single_threaded_blas_restores_after_an_error():
    before = threads.blas_threads()
    with pytest.raises(RuntimeError), threads.single_threaded_blas():
        raise RuntimeError("inside")
    assert threads.blas_threads() == before
    with threads.single_threaded_blas():               # and the depth counter is back at 0
        assert set(threads.blas_threads().values()) == {1}


def test_freed_memory_is_reused_without_page_faults():
    if heap.user_malloc_settings():
        assert heap.keep_freed_memory() is False        # the user's settings win
        return
    if not heap.keep_freed_memory():
        pytest.skip("not glibc: nothing to tune")
    assert heap.keep_freed_memory() is True             # idempotent
    a = np.ones(4 << 20, dtype=np.float32)              # 16 MB: glibc would mmap it
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(4 << 20, dtype=np.float32)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert b.sum() == 4 << 20
    assert faults < 100, f"{faults} page faults: the freed 16 MB were not reused"


@pytest.mark.parametrize("name, value", [("MALLOC_ARENA_MAX", "2"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_the_users_malloc_settings_win(monkeypatch, name, value):
    called = []
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: called.append(a))
    monkeypatch.setenv(name, value)
    assert heap._apply() is False and not called        # glibc is not even opened


def test_no_glibc_is_a_no_op(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    for k in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(heap.ctypes, "CDLL", missing)
    assert heap._apply() is False
