"""Executed copies of ``notebooks/*.ipynb``, shared by the test suite and the docs build.

Each notebook is executed once per CI run: ``tests/test_notebooks.py`` executes every notebook
in a fresh kernel and stores the result in ``build/notebooks/`` (git-ignored), stamped with the
SHA-256 of the notebook it ran and of the npmnv3 package it imported; the docs build
(``docs/hooks.py``) renders those copies and executes, the same way, only the notebooks whose
copy is missing or has another stamp (on a fresh checkout: all of them; after an edit to a
notebook or to the library: those). Execution needs no network.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "build" / "notebooks"
CELL_TIMEOUT = 300          # seconds per cell (nbclient's timeout)
STAMP = "npmnv3_executed"   # notebook metadata key: {"notebook_sha256": ..., "npmnv3_sha256": ...}
PACKAGE = ROOT / "npmnv3"


def sources() -> list[Path]:
    """Every notebook of the project, in order (the docs pick up new ones by this glob)."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def library_digest() -> str:
    """SHA-256 over the package's source and data files (what a notebook's outputs depend on)."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".yaml", ".txt"):
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stamp(data: bytes) -> dict:
    return {"notebook_sha256": hashlib.sha256(data).hexdigest(),
            "npmnv3_sha256": library_digest()}


def read(path: Path):
    """``(notebook, stamp)`` of one read of ``path``: the stamp is of the bytes parsed."""
    import nbformat

    data = Path(path).read_bytes()
    return nbformat.reads(data.decode("utf-8"), as_version=4), stamp(data)


def executed_path(path: Path) -> Path:
    return EXECUTED / Path(path).name


def execute(nb, workdir: Path):
    """Run every cell of the in-memory notebook ``nb`` in a fresh ``python3`` kernel with
    ``workdir`` as its working directory; outputs are filled in place. Raises nbclient's
    ``CellExecutionError`` / ``CellTimeoutError``."""
    import nbclient

    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def store(nb, nb_stamp: dict, path: Path) -> Path:
    """Write the executed ``nb`` of source ``path`` to ``build/notebooks/`` atomically, with
    the ``stamp`` that ``read`` returned (of the files as they were read, not as they are now)."""
    import nbformat

    nb.metadata[STAMP] = nb_stamp
    out = executed_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                    # mkstemp's 0600 -> a normal file's mode
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def fresh_copy(path: Path) -> Path | None:
    """The executed copy of ``path`` if it was made from the notebook and the library as they
    are now, else None."""
    import json

    out = executed_path(path)
    try:
        meta = json.loads(out.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return None
    return out if meta.get(STAMP) == stamp(Path(path).read_bytes()) else None


def ensure_executed(path: Path) -> tuple[Path, bool]:
    """The executed copy of ``path``, executing it first if there is no fresh one. Returns
    ``(copy, executed_now)``."""
    out = fresh_copy(path)
    if out is not None:
        return out, False
    nb, nb_stamp = read(path)
    with tempfile.TemporaryDirectory(prefix="npmnv3-nb-") as workdir:
        execute(nb, Path(workdir))
    return store(nb, nb_stamp, path), True
