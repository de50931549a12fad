"""The command line: ``npmnv3 selfcheck`` and ``python -m npmnv3``."""

import subprocess
import sys

from npmnv3.cli import main
from npmnv3.tools.selfcheck import run_selfcheck


def test_selfcheck_passes_and_prints_every_kernel(capsys):
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    for kernel in ("conv2d", "depthwise", "batchnorm train", "batchnorm eval", "hardswish",
                   "squeeze-excite", "linear", "cross-entropy"):
        assert kernel in out
    assert "0 over tolerance" in out


def test_selfcheck_rows_are_real_checks():
    rows = run_selfcheck()
    assert len(rows) > 50
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    # A finite-difference error of exactly zero would mean nothing was compared.
    assert all(r.error > 0 for r in rows if r.check.startswith("finite"))


def test_python_dash_m_runs_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "npmnv3", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "selfcheck" in res.stdout
    res = subprocess.run([sys.executable, "-m", "npmnv3", "no-such-command"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr
