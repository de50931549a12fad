"""The notebooks in notebooks/ run top to bottom, in time, and stay small.

Every ``notebooks/*.ipynb`` is executed in a fresh Jupyter kernel with nbclient, from an
in-memory copy and in a temporary working directory (nothing is written into notebooks/). The
executed copy of each notebook that runs without error is kept in ``build/notebooks/``
(git-ignored; ``docs/executed_notebooks.py``), where the documentation build renders it instead
of executing the notebook a second time. A notebook fails on any cell error (each notebook ends
by asserting its own claims), on a cell running longer than ``CELL_TIMEOUT``, or when the whole
run, kernel start included, takes longer than ``BUDGET`` seconds of wall time. Each file must
also be at most ``MAX_BYTES`` on disk.

nbclient/nbformat/ipykernel (and torch/torchvision for the notebooks that compare with them) come
with ``pip install -e '.[test]'``. Without them these tests skip, except with ``CI=true``, where a
missing one is a failure (the pattern of ``tests/support.py``). A notebook that imports torch
still runs without it (it prints why it compares nothing), so outside CI it is executed anyway.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import time
from pathlib import Path

import executed_notebooks as nbx
import pytest

NOTEBOOKS = nbx.NOTEBOOKS
PATHS = nbx.sources()
EXPECTED = ("01_building_blocks", "02_inverted_residual", "03_the_network",
            "04_compare_with_torchvision", "05_training", "06_pretrained_inference",
            "07_from_textbook_to_engine", "08_int8_quantization")
CELL_TIMEOUT = nbx.CELL_TIMEOUT     # seconds per cell (nbclient's timeout)
BUDGET = 120.0              # seconds of wall time per notebook, kernel start included
MAX_BYTES = 1_000_000       # per file on disk: commit with outputs cleared or small
# A teaching re-implementation must carry another name (five_line_depthwise, ...) and be
# asserted equal to the library's; these names are the library's own operations.
LIBRARY_DEF = re.compile(r"^def (conv2d|depthwise|pointwise|batch_?norm|hard_?swish|"
                         r"hard_?sigmoid|relu6?|se|squeeze_excit\w*|linear|avgpool|dropout|"
                         r"cross_entropy)(_\w*)?\s*\(", re.MULTILINE)


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _require(module: str, what: str = "the notebooks"):
    """Import ``module``: skip the test without it, but fail with CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} is needed to execute {what} (pip install -e '.[test]')"
        if _in_ci():
            pytest.fail(msg + "; it is required when CI=true")
        pytest.skip(msg)


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def _uses_torch(path: Path) -> bool:
    return any(re.search(r"^\s*import torch\b", src, re.MULTILINE) for src in _code_cells(path))


def _slowest_cells(nb, n: int = 3) -> str:
    """The n slowest cells of an executed notebook, from nbclient's timing metadata."""
    times = []
    for i, cell in enumerate(nb.cells):
        t = cell.get("metadata", {}).get("execution", {})
        start, end = t.get("iopub.execute_input"), t.get("shell.execute_reply")
        if start and end:
            seconds = (datetime.datetime.fromisoformat(end.replace("Z", "+00:00"))
                       - datetime.datetime.fromisoformat(start.replace("Z", "+00:00")))
            times.append((seconds.total_seconds(), i))
    return ", ".join(f"cell {i}: {s:.1f} s" for s, i in sorted(times, reverse=True)[:n])


def test_every_expected_notebook_is_there():
    names = {p.stem for p in PATHS}
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing notebooks in {NOTEBOOKS}: {missing}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_small(path):
    size = path.stat().st_size
    assert size <= MAX_BYTES, (f"{path.name} is {size:,} bytes > {MAX_BYTES:,}: clear its "
                               f"outputs before committing (e.g. nbformat, jupyter nbconvert "
                               f"--clear-output)")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_follows_the_rules(path):
    """Imports npmnv3, never redefines a library operation under its name, ends with asserts."""
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code cells"
    assert re.search(r"^(import npmnv3|from npmnv3)", cells[0], re.MULTILINE), (
        f"{path.name}: the first code cell must import npmnv3")
    for i, src in enumerate(cells):
        m = LIBRARY_DEF.search(src)
        assert m is None, (f"{path.name}, code cell {i}: '{m.group(0)}' re-implements a library "
                           f"operation under its own name; call npmnv3's, or name a teaching "
                           f"version differently and assert it equals the library's")
    assert re.search(r"^\s*assert\b", cells[-1], re.MULTILINE), (
        f"{path.name}: the last code cell must assert the notebook's claims")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs_within_budget(path, tmp_path):
    _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    if _uses_torch(path) and _in_ci():
        _require("torch", f"{path.name} as a comparison with the reference")
        _require("torchvision", f"{path.name} as a comparison with the reference")
    nb, stamp = nbx.read(path)                         # an in-memory copy; the file is untouched
    start = time.perf_counter()
    try:
        nbx.execute(nb, tmp_path, path)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed after {time.perf_counter() - start:.1f} s:\n{e}",
                    pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT} s:\n{e}", pytrace=False)
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    if not errors:
        nbx.store(nb, stamp, path)                     # the docs build renders it: run only once
    assert elapsed <= BUDGET, (f"{path.name} took {elapsed:.1f} s > its budget of {BUDGET:.0f} s "
                               f"(slowest: {_slowest_cells(nb)})")
    assert not errors, f"{path.name}: error outputs {errors}"


def _exercise_notebook(tmp_path, solution: str | None):
    """A two-cell-per-exercise notebook in the convention, with its solutions file."""
    nbformat = _require("nbformat")
    v4 = nbformat.v4
    cells = [v4.new_code_cell("import npmnv3"),
             v4.new_markdown_cell("## Exercise 1: square a number"),
             v4.new_code_cell("def my_square(x):\n    raise NotImplementedError  # YOUR CODE"),
             v4.new_code_cell("try:\n    got = my_square(3)\nexcept NotImplementedError:\n"
                              "    print('Exercise 1: not done yet')\nelse:\n"
                              "    assert got == 9, got\n    print('Exercise 1: correct')"),
             v4.new_code_cell("after = 1\nassert after == 1")]
    cells[2].metadata["tags"] = ["exercise"]
    cells[3].metadata["tags"] = ["check"]
    path = tmp_path / "99_demo.ipynb"
    nbformat.write(v4.new_notebook(cells=cells), path)
    if solution is not None:
        (tmp_path / "solutions").mkdir()
        (tmp_path / "solutions" / "99_demo.py").write_text(
            f"# %% Exercise 1\n{solution}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["right", "wrong", "missing"])
def test_exercise_solutions_are_run_and_checked(tmp_path, case):
    """The reader's run shows 'not done yet'; the solution runs right after the check, in the
    same kernel, and must make it print 'correct'; a wrong or missing solution fails."""
    _require("nbclient")
    _require("ipykernel")
    solution = {"right": "def my_square(x):\n    return x * x",
                "wrong": "def my_square(x):\n    return x + x", "missing": None}[case]
    path = _exercise_notebook(tmp_path, solution)
    nb, _ = nbx.read(path)
    if case == "missing":
        with pytest.raises(ValueError, match=r"1 exercises, but .*99_demo\.py has sections \[\]"):
            nbx.execute(nb, tmp_path, path)
        return
    if case == "wrong":
        with pytest.raises(AssertionError, match="exercise 1: running the check after its "
                                                 "solution failed(.|\n)*assert got == 9"):
            nbx.execute(nb, tmp_path, path)
        return
    nbx.execute(nb, tmp_path, path)
    shown = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert shown.strip() == "Exercise 1: not done yet"          # what the reader (and docs) see
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == [1, 2, 3, 4], counts                        # the scratch runs do not count
