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
import re
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


def stamp(data: bytes, path: Path) -> dict:
    sol = solutions_path(path)
    return {"notebook_sha256": hashlib.sha256(data).hexdigest(),
            "solutions_sha256": hashlib.sha256(sol.read_bytes() if sol.exists() else b"")
            .hexdigest(), "npmnv3_sha256": library_digest()}


def read(path: Path):
    """``(notebook, stamp)`` of one read of ``path``: the stamp is of the bytes parsed."""
    import nbformat

    data = Path(path).read_bytes()
    return nbformat.reads(data.decode("utf-8"), as_version=4), stamp(data, path)


def executed_path(path: Path) -> Path:
    return EXECUTED / Path(path).name


EXERCISE_HEADING = re.compile(r"^#+\s*Exercise (\d+)\b")
SOLUTION_SECTION = re.compile(r"^# %% Exercise (\d+)\s*$", re.MULTILINE)


def solutions_path(path: Path) -> Path:
    """``solutions/<stem>.py`` next to the notebook: the solutions of its exercises."""
    return Path(path).parent / "solutions" / f"{Path(path).stem}.py"


def exercises(nb, path: Path) -> list[tuple[int, int, str]]:
    """``[(stub cell index, check cell index, solution source)]`` of a notebook's exercises
    (the convention of notebooks/README.md), validated against its solutions file."""
    stubs = [i for i, c in enumerate(nb.cells) if "exercise" in c.metadata.get("tags", [])]
    checks = [i for i, c in enumerate(nb.cells) if "check" in c.metadata.get("tags", [])]
    headings = [int(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
                for m in [EXERCISE_HEADING.match(c.source.lstrip())] if m]
    name = Path(path).name
    if headings != list(range(1, len(headings) + 1)) or len(headings) != len(stubs):
        raise ValueError(f"{name}: exercise headings {headings} do not number the "
                         f"{len(stubs)} cells tagged 'exercise' as 1, 2, ...")
    if len(checks) != len(stubs) or any(c != s + 1 for s, c in zip(stubs, checks)):
        raise ValueError(f"{name}: every cell tagged 'exercise' must be followed by its cell "
                         f"tagged 'check' (exercise cells {stubs}, check cells {checks})")
    sol = solutions_path(path)
    text = sol.read_text(encoding="utf-8") if sol.exists() else ""
    marks = list(SOLUTION_SECTION.finditer(text))
    if [int(m.group(1)) for m in marks] != list(range(1, len(stubs) + 1)):
        raise ValueError(f"{name}: {len(stubs)} exercises, but {sol} has "
                         f"sections {[int(m.group(1)) for m in marks]} ('# %% Exercise N')")
    bounds = [m.end() for m in marks], [m.start() for m in marks[1:]] + [len(text)]
    return [(s, c, text[a:b].strip() + "\n") for s, c, a, b in zip(stubs, checks, *bounds)]


def _client_class():
    import nbclient
    import nbformat

    class ExerciseClient(nbclient.NotebookClient):
        """Runs the notebook as the reader sees it; right after each exercise's check cell, in
        the same kernel and recording nothing, it runs the solution, the check again (which
        must print ``Exercise N: correct``) and the stub again (the kernel state as before)."""

        exercise_plan: dict = {}        # check cell index -> (number, stub source, solution)

        async def async_execute_cell(self, cell, cell_index, execution_count=None,
                                     store_history=True):
            cell = await super().async_execute_cell(cell, cell_index, execution_count,
                                                    store_history)
            plan = self.exercise_plan.get(cell_index) if store_history else None
            if plan is not None:
                n, stub, solution = plan
                scratch = []
                for what, src in (("solution", solution), ("check", cell.source),
                                  ("stub", stub)):
                    scratch.append(nbformat.v4.new_code_cell(src))
                    try:
                        await super().async_execute_cell(scratch[-1], cell_index,
                                                         store_history=False)
                    except nbclient.exceptions.CellExecutionError as e:
                        raise AssertionError(f"exercise {n}: running the {what} after its "
                                             f"solution failed:\n{e}") from None
                self.code_cells_executed -= len(scratch)       # they do not count,
                self.nb.cells[cell_index] = cell               # nor replace the check cell
                said = "".join(o.get("text", "") for o in scratch[1].outputs)
                if f"Exercise {n}: correct" not in said:
                    raise AssertionError(f"exercise {n}: with its solution the check cell "
                                         f"printed {said.strip()[-300:]!r}, not 'Exercise {n}: "
                                         f"correct'")
            return cell

    return ExerciseClient


def execute(nb, workdir: Path, path: Path):
    """Run every cell of the in-memory notebook ``nb`` (read from ``path``) in a fresh
    ``python3`` kernel with ``workdir`` as its working directory, each exercise's solution
    checked on the way (``exercises``); outputs are filled in place. Raises nbclient's
    ``CellExecutionError`` / ``CellTimeoutError``, or AssertionError for a failing solution."""
    client = _client_class()(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                             resources={"metadata": {"path": str(workdir)}})
    client.exercise_plan = {c: (n, nb.cells[s].source, sol)
                            for n, (s, c, sol) in enumerate(exercises(nb, path), start=1)}
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
    return out if meta.get(STAMP) == stamp(Path(path).read_bytes(), path) else None


def ensure_executed(path: Path) -> tuple[Path, bool]:
    """The executed copy of ``path``, executing it first if there is no fresh one. Returns
    ``(copy, executed_now)``."""
    out = fresh_copy(path)
    if out is not None:
        return out, False
    nb, nb_stamp = read(path)
    with tempfile.TemporaryDirectory(prefix="npmnv3-nb-") as workdir:
        execute(nb, Path(workdir), path)
    return store(nb, nb_stamp, path), True
