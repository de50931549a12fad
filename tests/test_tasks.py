"""The task runner (kernels/tasks.py) and the compile helper (kernels/callbacks.py)."""

import os
import subprocess
import sys
import textwrap
import time

import numba
import numpy as np
import pytest

from npmnv3.kernels import callbacks, channels_last, convbn, tasks
from npmnv3.kernels.channels_last import grad_sums, mean_pixels, pointwise_fwd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_do_not_depend_on_the_thread_count():
    """Every task writes its own partial sums, merged in task order: one thread and two give
    bit-identical statistics and sums."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    wt = rng.standard_normal((24, 40)).astype(np.float32)
    bc = rng.standard_normal((6, 40))
    kc = np.array([0, 3, 6, 0.5], np.float32)
    out = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            y, mv, sums = np.empty((3000, 40), np.float32), np.empty((2, 40)), np.empty((2, 40))
            pointwise_fwd(x, wt, 64, 8, True, y, mv)
            grad_sums(y, y, bc, 2, kc, 8, sums)
            out.append((y, mv, sums))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(out[0][1][0], (x @ wt).mean(0, dtype=np.float64), rtol=1e-5,
                               atol=1e-6)


def _count_tasks(t0, t1, sz, a, b, c, d, e, f, g, u, v):
    """Test kernel: a[t] += 1 and u[t] = the thread that ran task t, for t in [t0, t1)."""
    for t in range(t0, t1):
        a[t] += 1.0
        u[t] = numba.get_thread_id()


COUNT_TASKS = tasks.task_kernel(_count_tasks)


@pytest.mark.parametrize("T", [0, 1, 2, 3, 17])
def test_parallel_tasks_runs_every_task_once_on_the_threads(T):
    """``parallel_tasks`` (no prange): each task of [0, T) runs exactly once, whatever the
    thread count; with two threads and two or more tasks both threads take part, with one
    thread only thread 0 does; the caller's thread count is what it was (it sets the engine's
    task count, and results depend on that)."""
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            a, ids = np.zeros(T + 1, np.float32), np.full(T + 1, -1.0)
            tasks.run_tasks(COUNT_TASKS, T, [0], [a], [ids])
            np.testing.assert_array_equal(a, [1.0] * T + [0.0])
            assert set(ids[:T]) == set(range(min(T, threads)))
            assert numba.get_num_threads() == threads        # the caller's setting is kept
    finally:
        numba.set_num_threads(before)


def test_task_kernels_take_contiguous_arrays_only():
    """A kernel writes through the flat views it is given: a strided output would be a copy,
    and the result lost, so it is refused."""
    x3 = np.ones((2, 5, 3), np.float32)
    out = np.empty((3, 2), np.float32).T                  # (2, 3), not C-contiguous
    with pytest.raises(ValueError, match="C-contiguous"):
        mean_pixels(x3, out)


def test_the_signature_is_one_for_every_task_kernel():
    sig = tasks.task_signature(np.float32)
    assert len(sig.args) == 3 + tasks.F_SLOTS + tasks.D_SLOTS
    assert all(cb.signature is tasks.task_signature for cb in convbn.TRAINING_TASKS)


def _run(code, cache_dir, **env):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


PROBE = """
    import numpy as np
    from npmnv3.kernels import callbacks
    from npmnv3.kernels.channels_last import _dot_pixels_tasks as a, _scale_pixels_tasks as b
    proc = callbacks.compile_ahead([a, b], np.float32)
    print(proc is not None, proc.proc.wait() if proc else None)
    print(a.cached(np.float32), b.cached(np.float32), a.cached(np.float64))
    print(callbacks.compile_ahead([a, b], np.float32) is None)      # considered once
"""


def test_a_helper_process_fills_the_cache(tmp_path):
    """On an empty cache, compile_ahead starts one helper that compiles the callbacks into
    Numba's cache and exits 0; afterwards they are cached (for that dtype only)."""
    out = _run(PROBE, tmp_path)
    assert out == ["True", "0", "True", "True", "False", "True"]
    # a second process finds them cached and starts nothing
    again = _run(PROBE.replace("print(proc is not None, proc.proc.wait() if proc else None)",
                               "print(proc is None)"), tmp_path)
    assert again[0] == "True"


def test_a_dispatcher_is_compiled_ahead_too(tmp_path):
    """The engine's driver (``run.forward``, a Numba dispatcher: a Warmup, called on zero
    phases) goes to the helper like a callback (here with the SE gate step: one callback alone
    starts no helper); afterwards it is cached for that dtype only."""
    out = _run("""
        import numpy as np
        from npmnv3.engine import run
        from npmnv3.kernels import callbacks
        h = callbacks.compile_ahead([run._STEP_CALLBACKS[2], run._FORWARD], np.float32)
        print(h.proc.wait(), run._FORWARD.cached(np.float32), run._FORWARD.cached(np.float64))
    """, tmp_path)
    assert out == ["0", "True", "False"]


def test_no_helper_when_switched_off(tmp_path):
    out = _run(PROBE, tmp_path, NPMNV3_COMPILE_HELPER="0")
    assert out[:2] == ["False", "None"] and out[2:4] == ["False", "False"]


def test_a_failed_helper_only_costs_time(monkeypatch):
    """If the helper dies, the callback is compiled here, and computes the same."""
    monkeypatch.setattr(callbacks.sys, "executable", "/bin/false")
    monkeypatch.setattr(callbacks, "_CONSIDERED", set())
    pair = (channels_last._dot_pixels_tasks, channels_last._scale_add_pixels_tasks)
    for c in pair:
        monkeypatch.setattr(c, "cached", lambda dtype: False)
        monkeypatch.setattr(c, "_compiled", {})
    cb = pair[0]
    proc = callbacks.compile_ahead(pair, np.float64)
    assert proc is not None and proc.proc.wait() != 0
    x3 = np.random.default_rng(1).standard_normal((3, 7, 5))
    d3 = np.random.default_rng(2).standard_normal((3, 7, 5))
    out = np.empty((3, 5))
    channels_last.dot_pixels(x3, d3, out)                   # waits for the helper, compiles
    np.testing.assert_allclose(out, (x3 * d3).sum(1), rtol=1e-12)
    assert (cb.name, np.dtype(np.float64)) not in callbacks._PENDING
    callbacks._PENDING.pop((pair[1].name, np.dtype(np.float64)), None)


def _fake_helper(monkeypatch, tmp_path, script):
    """compile_ahead on two callbacks with ``script`` (sh) as the helper; returns the Helper."""
    fake = tmp_path / "helper"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setattr(callbacks.sys, "executable", str(fake))
    monkeypatch.setattr(callbacks, "_CONSIDERED", set())
    pair = (channels_last._dot_pixels_tasks, channels_last._scale_add_pixels_tasks)
    # the helper's arguments: -m MODULE DTYPE NAME0 NAME1
    for c in pair:
        monkeypatch.setattr(c, "cached", lambda dtype: False)
        monkeypatch.setattr(c, "_compiled", {})
    helper = callbacks.compile_ahead(pair, np.float64)
    return helper, pair


def test_a_stuck_helper_is_killed(monkeypatch, tmp_path):
    """A helper that starts the callback this process needs and never finishes is killed after
    HELPER_TIMEOUT_S; the callback is compiled here."""
    monkeypatch.setattr(callbacks, "HELPER_TIMEOUT_S", 0.5)
    helper, pair = _fake_helper(monkeypatch, tmp_path, 'echo "start $4"\nsleep 60\n')
    for _ in range(200):                                     # its report has arrived
        if pair[0].name in helper.started:
            break
        time.sleep(0.05)
    x3 = np.ones((2, 3, 4))
    out = np.empty((2, 4))
    channels_last.dot_pixels(x3, 2 * x3, out)                # needs NAME0: waits, then kills
    np.testing.assert_array_equal(out, 6.0)
    assert helper.proc.wait(timeout=5) != 0                  # killed
    callbacks._PENDING.pop((pair[1].name, np.dtype(np.float64)), None)


def test_a_callback_the_helper_has_not_started_is_compiled_here(monkeypatch, tmp_path):
    """No waiting for a callback the helper has not started: this process compiles it and
    tells the helper to skip it ("taken NAME" on its stdin)."""
    monkeypatch.setattr(callbacks, "HELPER_TIMEOUT_S", 120)
    seen = tmp_path / "seen"
    helper, pair = _fake_helper(monkeypatch, tmp_path, f'read line\necho "$line" > {seen}\n'
                                                       'sleep 60\n')
    x3 = np.ones((2, 3, 4))
    out = np.empty((2, 4))
    t = time.perf_counter()
    channels_last.dot_pixels(x3, 2 * x3, out)
    assert time.perf_counter() - t < 60                      # did not wait for the helper
    np.testing.assert_array_equal(out, 6.0)
    helper.proc.stdin.close()
    for _ in range(100):
        if seen.exists() and seen.read_text():
            break
        time.sleep(0.05)
    assert seen.read_text().split() == ["taken", pair[0].name]
    helper.proc.kill()
    callbacks._PENDING.pop((pair[1].name, np.dtype(np.float64)), None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_does_not_wait_for_the_parents_helper(monkeypatch, tmp_path):
    """A child forked while a helper runs (a data-loading worker, say) forgets it: the helper's
    reports reach the parent's reader thread only."""
    helper, pair = _fake_helper(monkeypatch, tmp_path, 'echo "start $4"\nsleep 60\n')
    assert callbacks._PENDING and callbacks.helper_running()
    pid = os.fork()
    if pid == 0:                                              # the child
        os._exit(0 if not callbacks._PENDING and not callbacks.helper_running() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert callbacks._PENDING                                 # the parent keeps its own
    helper.proc.kill()
    for c in pair:
        callbacks._PENDING.pop((c.name, np.dtype(np.float64)), None)
