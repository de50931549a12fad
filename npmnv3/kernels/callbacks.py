"""C callbacks: Numba functions compiled at one fixed C signature per dtype, called through their
address, and compiled by a helper process in parallel with this one when the cache is empty.

The fast paths call their loops through addresses (the training kernels' ``tasks.run_tasks``,
the engine's step functions in ``engine/run.py``): each loop is compiled once, as a
``numba.cfunc``, and no caller links (and re-optimises) a copy of it. A fixed signature has a
second use: the callbacks a program will need are known before it calls them, so they can be
compiled ahead, elsewhere.

Numba compiles under one global lock, on one core. On an empty cache a first training step or a
first prediction spends most of its time there, with the other core idle. ``compile_ahead``
hands the callbacks needed *later* (the backward loops, while the forward runs; the engine's
block steps, while the stem's compiles) to one helper process,
``python -m npmnv3.kernels.callbacks DTYPE NAME...``, which compiles them into Numba's on-disk
cache and exits; when this process reaches one of them it waits for the helper and loads the
result from the cache. If the helper fails for any reason, this process compiles the callback
itself: the helper only ever saves time. It is started only for callbacks missing from the
cache (so never on a warm machine), never from a helper, and not at all with
``NPMNV3_COMPILE_HELPER=0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
from numba import cfunc
from numba.core import event

REGISTRY: dict[str, Callback] = {}     # "module.qualname" -> Callback (what a helper compiles)
_PENDING: dict[tuple, subprocess.Popen] = {}     # (name, dtype) -> the helper compiling it
_CONSIDERED: set[tuple] = set()                 # (name, dtype) pairs compile_ahead has seen
ENV = "NPMNV3_COMPILE_HELPER"
HELPER_TIMEOUT_S = 300          # a helper compiles in ~10 s here; one that hangs is killed


class Callback:
    """``py_func`` compiled as a C callback of signature ``signature(dtype)``, once per dtype
    (float32 / float64), loaded from Numba's cache when it is there."""

    def __init__(self, py_func, signature):
        self.py_func, self.signature = py_func, signature
        self.__name__, self.__doc__ = py_func.__name__, py_func.__doc__
        self.name = f"{py_func.__module__}.{py_func.__qualname__}"
        self._compiled = {}
        REGISTRY[self.name] = self

    def compiled(self, dtype):
        """The ``numba.cfunc`` object for ``dtype`` (kept alive here)."""
        key = np.dtype(dtype)
        if key not in self._compiled:
            helper = _PENDING.pop((self.name, key), None)
            if helper is not None:     # it is compiling this one into the cache: load it after
                try:
                    helper.wait(timeout=HELPER_TIMEOUT_S)
                except subprocess.TimeoutExpired:     # stuck: compile here instead
                    helper.kill()
            # A cfunc fires no compile event of its own: announce it as a dispatcher would, so
            # the benchmarks' per-function compile times (numba:compile listeners) include it.
            data = {"dispatcher": SimpleNamespace(py_func=self.py_func)}
            with event.trigger_event("numba:compile", data=data):
                self._compiled[key] = cfunc(self.signature(key), cache=True)(self.py_func)
        return self._compiled[key]

    def address(self, dtype) -> int:
        return self.compiled(dtype).address

    def cached(self, dtype) -> bool:
        """Whether Numba's on-disk cache holds this callback for ``dtype`` (reads its index)."""
        from numba.core.caching import FunctionCache
        try:
            overloads = FunctionCache(self.py_func)._cache_file._load_index()
        except Exception:        # an unreadable index: Numba would recompile, so "not cached"
            return False
        sig = self.signature(np.dtype(dtype))
        return any(key[0] == sig for key in overloads)


def compile_ahead(callbacks, dtype) -> subprocess.Popen | None:
    """Start one helper process compiling those of ``callbacks`` that are neither compiled in
    this process nor in the cache; returns it (None if there was nothing to do)."""
    key = np.dtype(dtype)
    todo = [cb for cb in callbacks if (cb.name, key) not in _CONSIDERED]
    if not todo:                       # the common case: a cheap no-op after the first call
        return None
    _CONSIDERED.update((cb.name, key) for cb in todo)
    if os.environ.get(ENV) == "0" or _jit_disabled():
        return None
    todo = [cb for cb in todo if key not in cb._compiled and not cb.cached(key)]
    if len(todo) < 2:                  # one callback: not worth a process start
        return None
    env = dict(os.environ, **{ENV: "0"})                 # a helper never starts another one
    proc = subprocess.Popen([sys.executable, "-m", __name__, key.name, *[cb.name for cb in todo]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    for cb in todo:
        _PENDING[(cb.name, key)] = proc
    return proc


def _jit_disabled() -> bool:
    from numba.core import config
    return bool(config.DISABLE_JIT)


def main(argv) -> int:
    """The helper: compile the named callbacks for the dtype into the cache."""
    import importlib
    dtype, names = np.dtype(argv[0]), argv[1:]
    for name in names:
        importlib.import_module(name.rsplit(".", 1)[0])
        REGISTRY[name].compiled(dtype)
    return 0


if __name__ == "__main__":
    # the package module's registry (the one the kernels fill), not this __main__ copy's
    from npmnv3.kernels.callbacks import main as _main
    sys.exit(_main(sys.argv[1:]))
