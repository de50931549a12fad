"""Helpers shared by the benchmark scripts (imported from benchmarks/ as the working module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

THREADS = "2"


def run_worker(script: str, *args: str, timeout: float = 3600, env: dict | None = None) -> dict:
    """Run ``python script --worker ...args`` in a fresh process with 2 threads for every pool
    (OpenMP, Numba, OpenBLAS, MKL) and return the JSON dict it prints last. ``env``: extra
    environment variables for the worker (e.g. a fresh ``NUMBA_CACHE_DIR``)."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "NUMBA_NUM_THREADS": THREADS,
           "OPENBLAS_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, **(env or {})}
    cmd = [sys.executable, script, "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"worker {cmd} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` from /proc/self/status (Linux).

    Not ``ru_maxrss``: Linux carries the parent's high-water mark across fork + exec, so a worker
    started by a parent that imported torch (~500 MB) would report at least the parent's RSS.
    ``VmHWM`` belongs to the address space that exec created. Elsewhere: ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024            # kB
    except OSError:
        pass
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, else kB
