"""Is Numba's on-disk cache of npmnv3's kernels empty? (the CLI then says it is compiling).

Numba (``cache=True``) keeps, per jitted function, an index file ``<module>.<name>-<line>.py<ver>
.nbi`` in the first usable of (``numba/core/caching.py``, ``CacheImpl._locator_classes``):
``$NUMBA_CACHE_DIR/<dir>_<sha1 of the source dir>`` if that variable is set, else the source
directory's ``__pycache__``, else the user-wide ``~/.cache/numba/<dir>_<sha1>``. Looking for
index files there costs a few directory listings and imports nothing, so the check runs before
any kernel module is loaded. It answers "nothing compiled yet" (a fresh install, a new Python
version or cache directory), not whether every kernel a command needs is cached.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]            # npmnv3/
MESSAGE = ("compiling kernels, once per machine (about 10-20 s; cached on disk for every "
           "later run)...")
_announced = False


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numba"                            # appdirs' user_cache_dir on Linux


def cache_dirs(source_dir: Path) -> list[Path]:
    """Where Numba would keep the cache of functions defined in ``source_dir``."""
    source_dir = Path(os.path.abspath(source_dir))
    sub = f"{source_dir.name}_{hashlib.sha1(str(source_dir).encode()).hexdigest()}"
    if os.environ.get("NUMBA_CACHE_DIR"):
        return [Path(os.environ["NUMBA_CACHE_DIR"]) / sub]
    return [source_dir / "__pycache__", _user_cache_dir() / sub]


def kernels_cached(package: Path = PACKAGE) -> bool:
    """True if any npmnv3 function has a Numba cache index on disk."""
    for dirpath, dirnames, _ in os.walk(package):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for d in cache_dirs(Path(dirpath)):
            try:
                if any(name.endswith(".nbi") for name in os.listdir(d)):
                    return True
            except OSError:
                continue
    return False


def announce_compile(file=None) -> bool:
    """Print ``MESSAGE`` once per process if the cache is empty; True if it was printed."""
    global _announced
    if _announced or os.environ.get("NUMBA_DISABLE_JIT") == "1" or kernels_cached():
        return False
    _announced = True
    print(f"npmnv3: {MESSAGE}", file=file or sys.stderr, flush=True)
    return True
