"""The checkpoint registry and ``fetch``: download, hash check, torch hub cache, cleanup.

Network traffic goes only to a local ``http.server`` on 127.0.0.1 that each test starts in a
thread and shuts down. It serves a checkpoint torchvision wrote (``torch.save`` of a
mobilenet_v3_small state_dict with randomised batch-norm statistics), registered under a test
entry whose SHA-256 prefix is that file's. ``$NPMNV3_HOME`` and ``$TORCH_HOME`` point into
``tmp_path`` and the default base URL at a closed port, so nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import randomise, require_torchvision

from npmnv3 import weights as W
from npmnv3.cli import main
from npmnv3.data.preprocess import preprocess as npmnv3_preprocess
from npmnv3.io.convert import convert
from npmnv3.io.npz import META_KEY, load_npz

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0          # seconds: a test request to 127.0.0.1 never takes this long


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(bytes, sha256 hex, state_dict as numpy) of a torchvision-written small checkpoint."""
    torchvision = require_torchvision()
    import torch

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small()
    randomise(torch, model, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "random_small.pth"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return data, hashlib.sha256(data).hexdigest(), sd


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Weights dir, torch hub cache and default URL inside the test; no proxies."""
    monkeypatch.setenv("NPMNV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/models")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = TIMEOUT

    def do_GET(self):
        srv = self.server
        srv.hits.append(self.path)
        body = srv.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        extra = 1000 if srv.mode == "short" else 0      # promise more than is sent
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if srv.mode == "short" else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server in a thread: ``.files`` {name: bytes}, ``.hits`` paths requested,
    ``.mode`` "ok" or "short"; the default base URL points at it."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits, srv.mode = {}, [], "ok"
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/models"
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", srv.url)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


@pytest.fixture
def entry(checkpoint, monkeypatch):
    """A registry entry "test-small" for the test checkpoint, its prefix computed here."""
    _, sha, _ = checkpoint
    e = W.WeightsEntry("test-small", "small", "test", f"mobilenet_v3_small-{sha[:8]}.pth",
                       sha[:8], 0.0, 0.0, 2_542_856, 256)
    monkeypatch.setitem(W.REGISTRY, e.name, e)
    return e


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ----------------------------------------------------------------------------- registry


def test_registry_matches_torchvision_meta():
    assert set(W.REGISTRY) == {"large-v1", "large-v2", "small-v1", "large-qnnpack-v1"}
    assert W.get("large") is W.get("large-v2") and W.get("small") is W.get("small-v1")
    assert W.DEFAULTS == {"large": "large-v2", "small": "small-v1"}
    for e in W.REGISTRY.values():
        assert f"-{e.sha256_prefix}." in e.file_name          # torch hub's HASH_REGEX
        assert e.url().endswith("/" + e.file_name)
        assert e.crop_size == 224 and len(e.categories) == 1000
        assert e.num_params == {"large": 5_483_032, "small": 2_542_856}[e.arch]
    assert [e.resize_size for e in W.REGISTRY.values()] == [256, 232, 256, 256]
    assert W.get("large-v2").url(None).startswith("http://127.0.0.1:")   # env wins
    assert W.get("large-v2").url("https://x.org/m/") == \
        "https://x.org/m/mobilenet_v3_large-5c1a4163.pth"
    with pytest.raises(W.WeightsError, match="unknown weights 'huge'.*large-v1"):
        W.get("huge")


def test_categories_are_torchvisions():
    require_torchvision()
    from torchvision.models import MobileNet_V3_Small_Weights

    assert W.imagenet_categories() == tuple(MobileNet_V3_Small_Weights.DEFAULT.meta["categories"])


def test_directories(tmp_path, monkeypatch):
    assert W.weights_dir() == tmp_path / "home"
    monkeypatch.delenv("NPMNV3_HOME")
    assert W.weights_dir() == REPO / "weights"            # a source checkout
    assert W.torch_hub_dir() == tmp_path / "torch" / "hub" / "checkpoints"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.torch_hub_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"


# ----------------------------------------------------------------------------- fetch


def test_fetch_downloads_verifies_converts_and_reuses(server, entry, checkpoint, tmp_path,
                                                      capsys):
    data, sha, sd = checkpoint
    server.files[entry.file_name] = data
    assert main(["weights", "fetch", "test-small"]) == 0       # with the tqdm bar
    out = capsys.readouterr().out
    npz = tmp_path / "home" / entry.npz_name
    assert f"test-small: {npz} (downloaded {server.url}/{entry.file_name}" in out
    assert server.hits == [f"/models/{entry.file_name}"]
    assert leftovers(npz.parent) == sorted([entry.file_name, entry.npz_name])
    assert (npz.parent / entry.file_name).read_bytes() == data
    got, meta = load_npz(npz)
    assert meta["source_sha256"] == sha and meta["source_name"] == entry.file_name
    assert meta["arch"]["arch"] == "small"
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # Again: verified from its metadata, no request.
    assert W.fetch("test-small") == npz
    assert main(["weights", "path", "test-small"]) == 0
    assert main(["weights", "fetch", "test-small"]) == 0
    assert len(server.hits) == 1
    assert "already there" in capsys.readouterr().out


def test_base_url_argument_beats_the_environment(server, entry, checkpoint, monkeypatch):
    server.files[entry.file_name] = checkpoint[0]
    monkeypatch.setenv("NPMNV3_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/nothing")
    W.fetch("test-small", base_url=server.url + "/", timeout=TIMEOUT)
    assert server.hits == [f"/models/{entry.file_name}"]


def test_hash_mismatch_removes_the_download(server, entry, checkpoint, monkeypatch, tmp_path):
    wrong = "0" * 8 if entry.sha256_prefix != "0" * 8 else "1" * 8
    bad = replace(entry, sha256_prefix=wrong)
    monkeypatch.setitem(W.REGISTRY, entry.name, bad)
    server.files[entry.file_name] = checkpoint[0]
    with pytest.raises(W.DownloadError, match=f"sha256 mismatch .*expected {wrong}.*removed"):
        W.fetch("test-small", timeout=TIMEOUT)
    assert len(server.hits) == 1
    assert leftovers(tmp_path / "home") == []


def test_interrupted_transfer_leaves_nothing(server, entry, checkpoint, tmp_path):
    server.files[entry.file_name] = checkpoint[0]
    server.mode = "short"
    n = len(checkpoint[0])
    with pytest.raises(W.DownloadError, match=f"interrupted: got {n // 2:,} of {n + 1000:,} "
                                              "bytes; nothing was kept"):
        W.fetch("test-small", timeout=TIMEOUT)
    assert leftovers(tmp_path / "home") == []


def test_http_error_names_the_url(server, entry, tmp_path):
    with pytest.raises(W.DownloadError, match=f"cannot download {server.url}/{entry.file_name} "
                                              r"\(HTTP 404 .*also takes a local .pth or .npz"):
        W.fetch("test-small", timeout=TIMEOUT)
    assert leftovers(tmp_path / "home") == []


def test_server_down_one_message_no_traceback(tmp_path):
    url = os.environ["NPMNV3_WEIGHTS_URL"]                  # a closed port (fixture)
    with pytest.raises(W.DownloadError, match="Connection refused"):
        W.fetch("small-v1", timeout=TIMEOUT)
    image = REPO / "tests" / "data" / "coffee.jpg"
    for argv in (["weights", "fetch", "small"], ["classify", str(image), "--model", "small"]):
        res = subprocess.run([sys.executable, "-m", "npmnv3", *argv], capture_output=True,
                             text=True, timeout=120, env=os.environ.copy())
        assert res.returncode == 1, res
        assert "Traceback" not in res.stderr and res.stdout == ""
        assert res.stderr.count("\n") == 1, res.stderr                  # one line
        assert f"cannot download {url}/mobilenet_v3_small-047dcff4.pth" in res.stderr
        # Advice that fits offline: not "run npmnv3 weights fetch" (that is what failed).
        assert "weights fetch" not in res.stderr and "check the connection" in res.stderr
        assert "copy mobilenet_v3_small-047dcff4.pth" in res.stderr and "--weights" in res.stderr
    assert leftovers(tmp_path / "home") == []


@pytest.mark.parametrize("via", ["TORCH_HOME", "XDG_CACHE_HOME"])
def test_torch_hub_cache_is_used_without_download(server, entry, checkpoint, tmp_path,
                                                  monkeypatch, via):
    if via == "XDG_CACHE_HOME":
        monkeypatch.delenv("TORCH_HOME")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hub = (tmp_path / ("torch" if via == "TORCH_HOME" else "xdg/torch")) / "hub/checkpoints"
    hub.mkdir(parents=True)
    (hub / entry.file_name).write_bytes(checkpoint[0])
    npz = W.fetch("test-small", timeout=TIMEOUT)
    assert server.hits == []
    assert load_npz(npz)[1]["source_sha256"] == checkpoint[1]
    assert leftovers(tmp_path / "home") == [entry.npz_name]       # the hub file stays there
    assert (hub / entry.file_name).read_bytes() == checkpoint[0]


# ----------------------------------------------------------------------------- on every use


def flip_byte(path: Path, at: int):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_npz_is_detected_on_use_and_removed(server, entry, checkpoint, tmp_path):
    server.files[entry.file_name] = checkpoint[0]
    npz = W.fetch("test-small", timeout=TIMEOUT)
    (npz.parent / entry.file_name).unlink()                        # only the .npz is left
    with zipfile.ZipFile(npz) as z:                                 # a byte inside an array
        info = z.getinfo("classifier.3.weight.npy")
    flip_byte(npz, info.header_offset + 1000)
    with pytest.raises(W.WeightsError, match="corrupted.*the file was removed.*weights fetch "
                                             "test-small"):
        W.load_state_dict("test-small")
    assert leftovers(npz.parent) == []
    # Fetching again downloads and verifies a fresh copy.
    W.fetch("test-small", timeout=TIMEOUT)
    assert len(server.hits) == 2


def test_npz_from_another_source_is_detected_and_removed(entry, checkpoint, tmp_path, capsys):
    """A .npz whose recorded source hash is not the official one (its arrays are intact)."""
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "mine.pth"
    src.write_bytes(checkpoint[0])
    npz = home / entry.npz_name
    convert(src, npz)
    sd, meta = load_npz(npz)
    meta["source_sha256"] = "f" * 64
    np.savez(npz, **sd, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    assert main(["weights", "fetch", "test-small"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 mismatch" in err and "was removed" in err, err
    assert leftovers(home) == []


def test_corrupted_pth_is_detected_on_use_and_removed(server, entry, checkpoint, tmp_path):
    d = tmp_path / "home"
    d.mkdir(parents=True)
    pth = d / entry.file_name
    pth.write_bytes(checkpoint[0])
    flip_byte(pth, len(checkpoint[0]) // 2)
    with pytest.raises(W.WeightsError, match=f"sha256 mismatch \\(expected "
                                             f"{entry.sha256_prefix}.*was removed"):
        W.fetch("test-small", timeout=TIMEOUT)
    assert not pth.exists() and server.hits == []
    assert leftovers(tmp_path / "home") == []


def test_wrong_hash_in_torch_hub_cache_is_left_alone(server, entry, checkpoint, tmp_path,
                                                     capsys):
    """torch hub's cache is not npmnv3's: a bad copy there is ignored with a warning (one line
    in the CLI) and the file downloaded into npmnv3's directory; the hub file is untouched."""
    hub = tmp_path / "torch/hub/checkpoints"
    hub.mkdir(parents=True)
    bad = hub / entry.file_name
    bad.write_bytes(checkpoint[0])
    flip_byte(bad, len(checkpoint[0]) // 2)
    before = bad.read_bytes()
    server.files[entry.file_name] = checkpoint[0]
    with pytest.warns(UserWarning, match="ignoring torch hub's copy: .*sha256 mismatch"):
        npz = W.fetch("test-small", timeout=TIMEOUT)
    assert bad.read_bytes() == before and len(server.hits) == 1
    assert load_npz(npz)[1]["source_sha256"] == checkpoint[1]
    for name in leftovers(tmp_path / "home"):
        (tmp_path / "home" / name).unlink()
    assert main(["weights", "fetch", "test-small"]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"npmnv3 weights: warning: ignoring torch hub's copy: {bad}: "
                                    f"sha256 mismatch (expected {entry.sha256_prefix}..., got "
                                    f"{W.sha256_of(bad)[:16]}...); the file is not the "
                                    f"official test-small checkpoint"]
    assert "(downloaded " in out.out and bad.read_bytes() == before


def test_official_file_given_by_path_is_verified_but_kept(entry, checkpoint, tmp_path):
    """``--weights FILE`` named like an official checkpoint: checked, never deleted."""
    from npmnv3.tools.classify import load_classifier

    pth = tmp_path / entry.file_name
    pth.write_bytes(checkpoint[0])
    assert load_classifier(weights=pth).source == str(pth)
    npz = tmp_path / "mine.npz"                                 # converted from it: also checked
    convert(pth, npz)
    assert load_classifier(weights=npz).preprocessing == entry.preprocessing
    sd, meta = load_npz(npz)
    meta["source_sha256"] = "f" * 64
    np.savez(npz, **sd, **{META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    flip_byte(pth, 1000)
    for path in (pth, npz):
        with pytest.raises(W.WeightsError, match="sha256 mismatch.*not the official test-small"):
            load_classifier(weights=path)
        assert path.exists()


# ----------------------------------------------------------------------------- int8 weights


def test_quantized_entry_matches_torchvision_meta():
    require_torchvision()
    from torchvision.models.quantization import MobileNet_V3_Large_QuantizedWeights as QW

    tv, e = QW.IMAGENET1K_QNNPACK_V1, W.get("large-qnnpack-v1")
    assert e.quantized and W.QUANTIZED_DEFAULTS == {"large": e.name}
    assert e.url(W.DEFAULT_BASE_URL) == tv.url and f"-{e.sha256_prefix}." in e.file_name
    metrics = tv.meta["_metrics"]["ImageNet-1K"]
    assert (e.acc1, e.acc5, e.num_params) == (metrics["acc@1"], metrics["acc@5"],
                                              tv.meta["num_params"])
    t = tv.transforms()
    assert (e.resize_size, e.crop_size) == (t.resize_size[0], t.crop_size[0])


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory):
    """(bytes, sha256, converted torch model) of a QAT-prepared MobileNetV3-Small state_dict:
    the format of torchvision's published int8 weights (randomised BN, calibrated)."""
    require_torchvision()
    import torch

    from npmnv3.tools.qcompare import qat_prepared, quantized_engine
    with quantized_engine("qnnpack"):
        model = qat_prepared("small", width_mult=0.5, seed=1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(2, 3, 224, 224, generator=g))
        path = tmp_path_factory.mktemp("qat") / "qat_small.pth"
        torch.save(model.state_dict(), path)
        torch.ao.quantization.convert(model, inplace=True)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest(), model.eval()


@pytest.fixture
def qentry(qat_checkpoint, monkeypatch):
    _, sha, _ = qat_checkpoint
    e = W.WeightsEntry("test-qsmall", "small", "test", f"mobilenet_v3_small_qnnpack-{sha[:8]}.pth",
                       sha[:8], 0.0, 0.0, 1_000_000, 256, quantized=True, url_dir="quantized")
    monkeypatch.setitem(W.REGISTRY, e.name, e)
    return e


def test_quantized_weights_fetched_verified_and_classified(server, qentry, qat_checkpoint,
                                                           tmp_path, capsys):
    data, sha, torch_model = qat_checkpoint
    server.files[qentry.file_name] = data
    assert main(["weights", "fetch", "test-qsmall"]) == 0
    pth = tmp_path / "home" / qentry.file_name
    assert f"test-qsmall: {pth} (downloaded {server.url}/quantized/{qentry.file_name}" in \
        capsys.readouterr().out
    assert leftovers(pth.parent) == [qentry.file_name]           # kept as the .pth, no .npz
    image = REPO / "tests" / "data" / "coffee.jpg"
    assert main(["classify", str(image), "--quantized", "--weights", "test-qsmall", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    # torch's converted model on the same preprocessed image: the same logits, so the same top-5
    import torch

    from npmnv3.tools.classify import softmax
    from npmnv3.tools.qcompare import quantized_engine
    x = npmnv3_preprocess(image, **qentry.preprocessing)
    with quantized_engine("qnnpack"), torch.no_grad():
        probs = softmax(torch_model(torch.from_numpy(x[None])).numpy())[0]
    want = np.argsort(-probs, kind="stable")[:5]
    assert [t["index"] for t in top] == want.tolist()
    np.testing.assert_allclose([t["prob"] for t in top], probs[want], rtol=1e-12)
    # evaluate runs the same int8 model (WordNet-id folders: torchvision's class indices)
    import shutil
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        shutil.copy(image, tmp_path / "val" / wnid / "coffee.jpg")
    assert main(["evaluate", tmp_path / "val", "--weights", "test-qsmall", "--json",
                 "--per-image", "--workers", "0", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "quantized mobilenet_v3_small(width_mult=0.5)"
    assert [p["top"] for p in report["predictions"]] == [want.tolist()] * 2
    assert len(server.hits) == 1                                   # verified, not re-fetched
    flip_byte(pth, len(data) // 2)
    assert main(["classify", str(image), "--quantized", "--weights", "test-qsmall"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err and not pth.exists()


def test_quantized_list_and_refusals(capsys, tmp_path, checkpoint):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "large-qnnpack-v1" in out and "large int8" in out and "mobilenet_v3_large_qnnpack-" \
        "5bcacf28.pth" in out and "--quantized --model large: large-qnnpack-v1" in out
    from npmnv3.tools.classify import load_classifier
    with pytest.raises(ValueError, match="publishes no int8 weights for MobileNetV3-small"):
        load_classifier("small", quantized=True)
    with pytest.raises(ValueError, match="large-v2 are float weights"):
        load_classifier(weights="large-v2", quantized=True)
    float_pth = tmp_path / "float_small.pth"
    float_pth.write_bytes(checkpoint[0])
    with pytest.raises(ValueError, match="float MobileNetV3 state_dict"):
        load_classifier(weights=float_pth, quantized=True)
    import npmnv3
    from npmnv3.io.load import save_weights
    from npmnv3.tools.classify import resolve_weights
    npz = tmp_path / "model.npz"                       # npmnv3 train's output: float weights
    save_weights(npz, npmnv3.mobilenet_v3_small(width_mult=0.25, num_classes=2))
    with pytest.raises(ValueError, match=r"model.npz: an .npz of float weights, not int8 ones: "
                                         r"--quantized takes a quantized or QAT-prepared .pth"):
        load_classifier(weights=npz, quantized=True)
    # Every other --weights (compare, evaluate, train) says where int8 weights go, unfetched.
    with pytest.raises(ValueError, match="large-qnnpack-v1 are int8 weights for the quantized "
                                         "model: use them with npmnv3 classify --quantized"):
        resolve_weights("large-qnnpack-v1")


def test_int8_checkpoints_given_to_the_float_model_say_so(qat_checkpoint, tmp_path, capsys):
    qat = tmp_path / "qat_small.pth"
    qat.write_bytes(qat_checkpoint[0])
    image = REPO / "tests" / "data" / "coffee.jpg"
    assert main(["classify", str(image), "--weights", str(qat)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantization-aware-training (QAT) checkpoint" in err \
        and "--quantized" in err, err
