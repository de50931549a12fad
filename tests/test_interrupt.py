"""Ctrl-C: every command exits with 130 and one line on stderr, no traceback, nothing
half-written.

Each test starts the command in a fresh interpreter in its own process group, waits until it is
working (a line on stdout), and sends SIGINT to the whole group, as a terminal's Ctrl-C does
(worker processes included). Where the real work would end before the signal could arrive, a
few lines of set-up make one step slow (a sleep inside it), and print the marker the test
waits for: the command itself runs unchanged.
"""

from __future__ import annotations

import http.server
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npmnv3
from npmnv3.data.preprocess import imagenet_preprocessing
from npmnv3.io.load import save_weights

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and process groups")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
WAIT = 120.0                    # seconds: generous for a loaded 2-core machine
RUN_CLI = "import sys\nfrom npmnv3.cli import main\nsys.exit(main(sys.argv[1:]))\n"
SLOW = "import time\n"          # prepended set-up code starts with this


def interrupt(argv, marker: str, *, setup: str = "", env=None):
    """Run ``npmnv3 argv`` (after ``setup`` code), SIGINT its process group once a stdout line
    contains ``marker``; returns (exit code, stdout lines, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", setup + RUN_CLI, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(env or {})}, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] +
                              [lines.put(None)], daemon=True)
    reader.start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=WAIT)
            if line is None:
                pytest.fail(f"npmnv3 {argv[0]} ended before {marker!r}: {seen} "
                            f"{proc.stderr.read()}")
            seen.append(line.rstrip("\n"))
            if marker in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        code = proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(WAIT)
    while (line := lines.get()) is not None:
        seen.append(line.rstrip("\n"))
    return code, seen, err


def assert_one_line(err: str, expected: str):
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines() == [expected], err


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=3, seed=0)
    path = tmp_path_factory.mktemp("w") / "model.npz"
    save_weights(path, model, classes=["a", "b", "c"], preprocessing=imagenet_preprocessing(None,
                                                                                          32))
    return path


def images(root: Path, n: int, classes=("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_classify_streams_results_and_stops_cleanly(tmp_path, tiny_npz):
    setup = (SLOW + "import npmnv3.tools.classify as c\n_p = c.Classifier.predict\n"
             "c.Classifier.predict = lambda self, x, k: (time.sleep(0.3), _p(self, x, k))[1]\n")
    root = images(tmp_path / "imgs", 40)
    code, out, err = interrupt(["classify", root, "--weights", tiny_npz, "--batch-size", "2"],
                               "png", setup=setup)
    assert code == 130
    assert_one_line(err, "npmnv3 classify: interrupted")
    assert out[0].endswith(".png") and "  0." in out[1]            # results came as they were
    assert 1 <= sum(ln.endswith(".png") for ln in out) < 40        # ready, not at the end


def test_convert_leaves_no_file(tmp_path):
    src = tmp_path / "small.npz"
    np.savez(src, **npmnv3.mobilenet_v3_small(width_mult=0.5).state_dict())
    setup = (SLOW + "import os\n_f = os.fsync\n"
             "def fsync(fd):\n    print('writing', flush=True)\n    time.sleep(60)\n"
             "os.fsync = fsync\n")
    out = tmp_path / "out.npz"
    code, _, err = interrupt(["convert", src, out], "writing", setup=setup)
    assert code == 130
    assert_one_line(err, "npmnv3 convert: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.npz"]     # no OUT, no temp


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Sends the first 64 KiB of a 10 MB file, then waits; ``/started`` answers "yes" once it
    has (the command's set-up code polls it to print the test's marker)."""

    def do_GET(self):
        if self.path.endswith("/started"):
            body = b"yes" if self.server.started.is_set() else b"no"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(10_000_000))
        self.end_headers()
        self.wfile.write(b"\0" * 65536)
        self.wfile.flush()
        self.server.started.set()
        self.server.release.wait(WAIT)

    def log_message(self, *args):
        pass


def test_weights_fetch_leaves_no_partial_download(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    srv.daemon_threads = True
    srv.started, srv.release = threading.Event(), threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    home = tmp_path / "home"
    env = {"NPMNV3_HOME": str(home), "TORCH_HOME": str(tmp_path / "torch"),
           "NPMNV3_WEIGHTS_URL": f"{url}/models", "no_proxy": "127.0.0.1"}
    setup = (SLOW + "import threading, urllib.request\n"
             "def _watch():\n"
             f"    while urllib.request.urlopen('{url}/started').read() != b'yes':\n"
             "        time.sleep(0.05)\n"
             "    print('downloading', flush=True)\n"
             "threading.Thread(target=_watch, daemon=True).start()\n")
    try:
        code, _, err = interrupt(["weights", "fetch", "small"], "downloading", setup=setup,
                                 env=env)
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
    assert code == 130
    assert_one_line(err, "npmnv3 weights: interrupted")
    assert not home.exists() or list(home.iterdir()) == []                 # no .partial left


def test_selfcheck_stops_after_the_rows_it_printed():
    code, out, err = interrupt(["selfcheck"], "ok ")
    assert code == 130
    assert_one_line(err, "npmnv3 selfcheck: interrupted")
    assert out[0].startswith("ok ")


def test_train_stops_early_resumably_and_names_the_run_folder(tmp_path, capsys):
    """Ctrl-C after an epoch: that epoch's checkpoint, model, best model and curves stay, the
    line says how to continue, and --resume does continue from it."""
    data = images(tmp_path / "data", 12, classes=("a", "b", "c"))
    out = tmp_path / "run"
    argv = ["train", "--model", "small", "--width-mult", "0.25", "--data", data, "--out", out,
            "--input-size", "32", "--batch-size", "4", "--epochs", "50", "--val-split", "0.25",
            "--no-progress"]
    code, lines, err = interrupt(argv, "epoch 1:")
    assert code == 130
    ck = out / "checkpoint.npz"
    epoch = int(err.split("after epoch ")[1].split(":")[0])
    h = npmnv3.load_checkpoint(ck)["meta"]["history"]
    assert h["epoch"][-1] == epoch
    best = max(range(epoch), key=lambda i: (h["val_acc"][i], -i))
    assert_one_line(err, f"npmnv3 train: interrupted after epoch {epoch}: {ck} holds it "
                         f"(best.npz: epoch {best + 1}, val acc {h['val_acc'][best]:.4f}); "
                         f"continue with npmnv3 train --resume {ck}")
    assert lines[-1].startswith(f"epoch {epoch}:")                       # printed as it ended
    assert sorted(p.name for p in out.iterdir()) == ["best.npz", "checkpoint.npz", "curves.png",
                                                     "model.npz"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from npmnv3.cli import main
    assert main(["train", "--resume", ck, "--epochs", epoch + 1, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"resuming after epoch {epoch} of {epoch + 1}" in text and f"epoch {epoch + 1}:" in text
    again = npmnv3.load_checkpoint(ck)["meta"]
    assert again["epoch"] == epoch + 1 and again["history"]["val_acc"][:epoch] == h["val_acc"]
    # Interrupted before an epoch ends: nothing written, and no --resume advice.
    setup = (SLOW + "import npmnv3.train.loop as L\n"
             "def _slow(*a):\n    print('first epoch started', flush=True)\n"
             "    time.sleep(60)\n"
             "L._train_epoch = _slow\n")
    fresh = tmp_path / "fresh"
    argv[argv.index(out)] = fresh
    argv[argv.index("--val-split") + 1] = "0"
    code, _, err = interrupt(argv, "first epoch started", setup=setup)   # not "... training
                                                                         # images": too early
    assert code == 130
    assert_one_line(err, f"npmnv3 train: interrupted before the first epoch ended: nothing was "
                         f"written to {fresh}")
    assert not fresh.exists() or list(fresh.iterdir()) == []


def test_evaluate_stops_its_workers(tmp_path, tiny_npz):
    data = images(tmp_path / "data", 40, classes=("a", "b", "c"))
    setup = (SLOW + "import npmnv3.nn.model as M\n_c = M.MobileNetV3.__call__\n"
             "def _slow(self, x, **kw):\n    print('batch', flush=True)\n    time.sleep(0.5)\n"
             "    return _c(self, x, **kw)\nM.MobileNetV3.__call__ = _slow\n")
    report = tmp_path / "report.json"
    code, _, err = interrupt(["evaluate", data, "--weights", tiny_npz, "--batch-size", "2",
                              "--workers", "2", "--report", report], "batch", setup=setup)
    assert code == 130
    assert_one_line(err, "npmnv3 evaluate: interrupted")
    assert not report.exists() and not list(tmp_path.glob(".report*"))
