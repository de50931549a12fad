"""C callbacks: Numba functions compiled at one fixed C signature per dtype, called through their
address, and compiled by a helper process in parallel with this one when the cache is empty.

The fast paths call their loops through addresses (the training kernels' ``tasks.run_tasks``,
the engine's step functions in ``engine/run.py``): each loop is compiled once, as a
``numba.cfunc``, and no caller links (and re-optimises) a copy of it. A fixed signature has a
second use: the callbacks a program will need are known before it calls them, so they can be
compiled ahead, elsewhere.

Numba compiles under one global lock, on one core. On an empty cache a first training step or a
first prediction spends most of its time there, with the other core idle. ``compile_ahead``
hands the list of callbacks a program is about to need, in the order it will need them (a
training step's eleven loops; the engine's seven callbacks and its driver), to one
helper process,
``python -m npmnv3.kernels.callbacks DTYPE NAME...``, which compiles them into Numba's on-disk
cache and exits. The two processes split the list from its two ends: the helper works from the
last callback backwards, reporting ``start NAME`` / ``done NAME`` on its stdout; when this process
needs one, it loads it from the cache if the helper is done with it, waits if the helper is
compiling it, and otherwise compiles it itself and tells the helper (``taken NAME`` on its
stdin) so the helper skips it. So neither process idles while the other has work left. (If both
start the same callback at the same moment, both compile it; Numba writes its cache files
atomically.)

If the helper fails for any reason, this process compiles the callback itself: the helper only
ever saves time (one compiling a callback for longer than ``HELPER_TIMEOUT_S`` is killed). It is
started only for callbacks missing from the cache (so never on a warm machine), never from a
helper, and not at all with ``NPMNV3_COMPILE_HELPER=0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
from numba import cfunc
from numba.core import event

REGISTRY: dict[str, Callback] = {}     # "module.qualname" -> Callback (what a helper compiles)
_PENDING: dict[tuple, Helper] = {}     # (name, dtype) -> the helper that may compile it
_CONSIDERED: set[tuple] = set()                 # (name, dtype) pairs compile_ahead has seen
ENV = "NPMNV3_COMPILE_HELPER"
HELPER_TIMEOUT_S = 300          # a callback compiles in ~1-2 s here; a helper that hangs is killed


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
            if helper is not None:     # loaded from the cache if the helper compiled it
                helper.claim(self.name)
            # A cfunc fires no compile event of its own: announce it as a dispatcher would, so
            # the benchmarks' per-function compile times (numba:compile listeners) include it.
            data = {"dispatcher": SimpleNamespace(py_func=self.py_func)}
            with event.trigger_event("numba:compile", data=data):
                self._compiled[key] = self._build(key)
        return self._compiled[key]

    def _build(self, dtype):
        return cfunc(self.signature(dtype), cache=True)(self.py_func)

    def address(self, dtype) -> int:
        return self.compiled(dtype).address

    def cached(self, dtype) -> bool:
        """Whether Numba's on-disk cache holds this callback for ``dtype`` (reads its index)."""
        sig = self.signature(np.dtype(dtype))
        return any(args == sig for args in self._cached_signatures())

    def _cached_signatures(self):
        """The argument types of every overload in Numba's cache index for ``py_func``."""
        from numba.core.caching import FunctionCache
        try:
            overloads = FunctionCache(self.py_func)._cache_file._load_index()
        except Exception:        # an unreadable index: Numba would recompile, so "not cached"
            return []
        return [key[0] for key in overloads]


class Warmup(Callback):
    """A Numba dispatcher (a function Python calls with arrays, which a C callback cannot
    take) handled like a callback: ``call(dtype)`` calls it once with arguments of the
    program's types that do no work, which compiles it into the cache (or loads it). ``arg``:
    the position of an array argument of the data's dtype, to read the cache's index."""

    def __init__(self, dispatcher, call, arg):
        super().__init__(dispatcher.py_func, None)
        self.dispatcher, self.call, self.arg = dispatcher, call, arg

    def _build(self, dtype):
        self.call(dtype)
        return self.dispatcher

    def cached(self, dtype) -> bool:
        from numba import from_dtype
        t = from_dtype(np.dtype(dtype))
        return any(getattr(args[self.arg], "dtype", None) == t
                   for args in self._cached_signatures())


class Helper:
    """A helper process and what it reports: the names it has started and finished."""

    def __init__(self, names, dtype):
        env = dict(os.environ, **{ENV: "0"})                 # a helper never starts another one
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, dtype.name, *names],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        self.names, self.taken = set(names), set()
        self.started, self.done, self.ended = set(), set(), False
        self._cond = threading.Condition()
        _RUNNING.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            word, _, name = line.strip().partition(" ")
            with self._cond:
                (self.started if word == "start" else self.done).add(name)
                self._cond.notify_all()
        self.proc.wait()
        with self._cond:                    # exited (or killed): nothing more will come
            self.ended = True
            self._cond.notify_all()

    def busy(self) -> bool:
        """Whether it is still compiling something (not merely exiting)."""
        return not self.ended and bool(self.names - self.done - self.taken)

    def claim(self, name) -> None:
        """Return once ``name`` is this process's to load (the helper compiled it into the
        cache) or to compile (the helper has not started it: it is told to skip it; it failed;
        or it took longer than ``HELPER_TIMEOUT_S`` and was killed)."""
        with self._cond:
            if name not in self.started and not self.ended:
                self.taken.add(name)
                try:
                    self.proc.stdin.write(f"taken {name}\n")
                    self.proc.stdin.flush()
                except OSError:             # it exited meanwhile
                    pass
                return
            if not self._cond.wait_for(lambda: name in self.done or self.ended,
                                       HELPER_TIMEOUT_S):
                self.proc.kill()            # stuck: compile here instead


_RUNNING: list[Helper] = []       # helpers started by this process


def helper_running() -> bool:
    """Whether a helper is compiling on the other core(s) right now (``tasks.run_tasks`` then
    runs its loops on one thread: a second one would wait for a core at every barrier)."""
    if _RUNNING and not any(h.busy() for h in _RUNNING):
        _RUNNING.clear()
    return bool(_RUNNING)


def _forget_helpers():
    """In a forked child: the helpers belong to the parent (their reader threads did not fork),
    so the child compiles whatever it needs itself."""
    _PENDING.clear()
    _RUNNING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def compile_ahead(callbacks, dtype) -> Helper | None:
    """Start one helper process compiling those of ``callbacks`` (given in the order this
    process will need them) that are neither compiled in this process nor in the cache; the
    helper takes them from the end of the list. Returns it (None if there was nothing to do)."""
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
    helper = Helper([cb.name for cb in todo], key)
    for cb in todo:
        _PENDING[(cb.name, key)] = helper
    return helper


def _jit_disabled() -> bool:
    from numba.core import config
    return bool(config.DISABLE_JIT)


def main(argv) -> int:
    """The helper: compile the named callbacks for the dtype into the cache, last first,
    skipping those the parent has taken (``Helper.claim``)."""
    import importlib
    dtype, names = np.dtype(argv[0]), argv[1:]
    taken = set()

    def listen():
        for line in sys.stdin:
            taken.add(line.strip().partition(" ")[2])
    threading.Thread(target=listen, daemon=True).start()
    for name in reversed(names):
        if name in taken:
            continue
        _report("start", name)
        importlib.import_module(name.rsplit(".", 1)[0])
        REGISTRY[name].compiled(dtype)
        _report("done", name)
    return 0


def _report(word, name):
    """One line to the parent; if it has exited, keep compiling into the cache regardless."""
    try:
        print(word, name, flush=True)
    except OSError:
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    # the package module's registry (the one the kernels fill), not this __main__ copy's
    from npmnv3.kernels.callbacks import main as _main
    sys.exit(_main(sys.argv[1:]))
