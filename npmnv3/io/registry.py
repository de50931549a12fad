"""The official torchvision MobileNetV3 checkpoints: registry, download, hash check, cache.

``fetch(name)`` returns the path of the converted ``.npz`` for a registry name (``large-v2``,
``small``, ...). It reuses, in this order: the ``.npz`` already in ``weights_dir()``; the ``.pth``
already there; the ``.pth`` in torch hub's cache (``$TORCH_HOME/hub/checkpoints``), read in place
and never downloaded again; and only then downloads the ``.pth`` (as
``torch.hub.load_state_dict_from_url`` would, ``torch/hub.py``).

Unlike torchvision, which checks the SHA-256 prefix in the file name only right after a download,
the hash of an official file is checked on every use: a ``.pth`` by hashing it, a ``.npz`` by
the ``source_sha256`` that ``convert`` recorded (each array is also CRC-checked as it is read).
A file in npmnv3's own directory that fails is removed, and the error says so; a file in torch
hub's cache that fails is left alone (it is not npmnv3's) and ignored, with a warning. A
download goes to ``<file>.partial`` and is renamed into place only once it is complete and its
hash matches; on any failure nothing is left.

Where files live: ``$NPMNV3_HOME`` if set, else ``weights/`` of a source checkout, else
``~/.cache/npmnv3``. The base URL is ``$NPMNV3_WEIGHTS_URL`` or the ``base_url`` argument
(tests point it at a local server), default torchvision's ``https://download.pytorch.org/models``.

The int8 weights (``large-qnnpack-v1``: torchvision's QAT checkpoint for its quantized model)
are not converted to ``.npz``: ``fetch`` returns the verified ``.pth`` and
``npmnv3.nn.qat.from_qat_state_dict`` turns it into the int8 model when it is used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..data.preprocess import imagenet_preprocessing
from .convert import convert, sha256_of
from .npz import read_npz
from .pth import CheckpointError

__all__ = ["REGISTRY", "ALIASES", "DEFAULTS", "QUANTIZED_DEFAULTS", "WeightsEntry",
           "WeightsError", "DownloadError", "get", "names", "imagenet_categories",
           "imagenet_wnids", "weights_dir", "torch_hub_dir", "fetch", "load_state_dict",
           "verify_file", "entry_for_file", "status"]

DEFAULT_BASE_URL = "https://download.pytorch.org/models"
DEFAULT_TIMEOUT = 30.0      # seconds without a byte from the server before giving up
_CHUNK = 1 << 16


class WeightsError(ValueError):
    """A weights file is missing, has the wrong hash, or cannot be used."""


class DownloadError(WeightsError):
    """The download failed (server unreachable, HTTP error, interrupted transfer)."""


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (torchvision's ``_IMAGENET_CATEGORIES``)."""
    text = (resources.files("npmnv3.data") / "imagenet_classes.txt").read_text("utf-8")
    names = tuple(text.splitlines())
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} lines, expected 1000"
    return names


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids of ImageNet-1k (``n01440764``, ...) in class-index order: the
    folder names of ImageNet's train/ and val/ trees, whose sorted order is the class index
    torchvision's weights use (list from pytorch/vision ``gallery/assets/
    imagenet_class_index.json``)."""
    text = (resources.files("npmnv3.data") / "imagenet_wnids.txt").read_text("utf-8")
    wnids = tuple(text.split())
    assert len(wnids) == 1000, f"imagenet_wnids.txt has {len(wnids)} ids, expected 1000"
    return wnids


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint, as torchvision's ``MobileNet_V3_*_Weights`` describe it."""
    name: str               # registry name, e.g. "large-v2"
    arch: str               # "large" | "small"
    enum: str               # torchvision's name for the same weights
    file_name: str          # basename of the URL; "-<sha256 prefix>." as torch hub expects
    sha256_prefix: str
    acc1: float             # ImageNet-1k val, torchvision's meta
    acc5: float
    num_params: int
    resize_size: int        # preprocessing: shorter side -> resize_size, center crop crop_size
    crop_size: int = 224
    quantized: bool = False  # int8: a QAT-prepared state_dict, kept as the .pth (nn/qat.py)
    url_dir: str = ""        # sub-directory of the base URL ("quantized" for the int8 files)

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get("NPMNV3_WEIGHTS_URL") or DEFAULT_BASE_URL
        sub = f"{self.url_dir}/" if self.url_dir else ""
        return f"{base.rstrip('/')}/{sub}{self.file_name}"

    @property
    def preprocessing(self) -> dict:
        """torchvision's ``ImageClassification(crop_size, resize_size)`` for these weights."""
        return imagenet_preprocessing(self.resize_size, self.crop_size)

    @property
    def npz_name(self) -> str:
        return Path(self.file_name).stem + ".npz"

    @property
    def categories(self) -> tuple[str, ...]:
        return imagenet_categories()


# torchvision models/mobilenetv3.py: MobileNet_V3_Large_Weights, MobileNet_V3_Small_Weights.
REGISTRY: dict[str, WeightsEntry] = {e.name: e for e in [
    WeightsEntry("large-v1", "large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
                 "mobilenet_v3_large-8738ca79.pth", "8738ca79", 74.042, 91.340, 5_483_032, 256),
    WeightsEntry("large-v2", "large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
                 "mobilenet_v3_large-5c1a4163.pth", "5c1a4163", 75.274, 92.566, 5_483_032, 232),
    WeightsEntry("small-v1", "small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
                 "mobilenet_v3_small-047dcff4.pth", "047dcff4", 67.668, 87.402, 2_542_856, 256),
    # torchvision models/quantization/mobilenetv3.py: MobileNet_V3_Large_QuantizedWeights
    # (QAT for qnnpack; ImageClassification(crop_size=224): resize 256)
    WeightsEntry("large-qnnpack-v1", "large",
                 "MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1",
                 "mobilenet_v3_large_qnnpack-5bcacf28.pth", "5bcacf28", 73.004, 90.858,
                 5_483_032, 256, quantized=True, url_dir="quantized"),
]}
ALIASES = {"large": "large-v2", "small": "small-v1"}
DEFAULTS = {"large": "large-v2", "small": "small-v1"}    # torchvision's DEFAULT per model
QUANTIZED_DEFAULTS = {"large": "large-qnnpack-v1"}   # torchvision ships no int8 Small weights


def names() -> list[str]:
    return list(REGISTRY) + list(ALIASES)


def get(name: str) -> WeightsEntry:
    """The registry entry for a name or alias (``large`` -> ``large-v2``)."""
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(names())}")
    return entry


def entry_for_file(file_name: str) -> WeightsEntry | None:
    """The entry whose official file is called ``file_name`` (.pth, or its .npz), if any."""
    for e in REGISTRY.values():
        if file_name in (e.file_name, e.npz_name):
            return e
    return None


def weights_dir() -> Path:
    """``$NPMNV3_HOME``, else ``weights/`` of a source checkout, else ``~/.cache/npmnv3``."""
    if os.environ.get("NPMNV3_HOME"):
        return Path(os.environ["NPMNV3_HOME"]).expanduser()
    root = Path(__file__).resolve().parents[2]          # npmnv3/io/registry.py -> checkout
    try:
        ours = 'name = "npmnv3"' in (root / "pyproject.toml").read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        ours = False
    if ours and (root / "weights").is_dir():
        return root / "weights"
    return Path.home() / ".cache" / "npmnv3"


def torch_hub_dir() -> Path:
    """torch hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints``; TORCH_HOME defaults to
    ``$XDG_CACHE_HOME/torch``, XDG_CACHE_HOME to ``~/.cache`` (torch/hub.py). A directory set
    with ``torch.hub.set_dir`` in a torch session is not visible from here."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(xdg, "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _bad_file(path: Path, why: str, name: str, remove: bool) -> WeightsError:
    if remove:
        path.unlink(missing_ok=True)
        return WeightsError(f"{path}: {why}; the file was removed, run `npmnv3 weights fetch "
                            f"{name}` to download it again")
    return WeightsError(f"{path}: {why}; the file is not the official {name} checkpoint")


def verify_file(path, entry: WeightsEntry, *, remove: bool = False):
    """Check ``path`` (an official .pth or its .npz) against ``entry``'s SHA-256 prefix.

    Returns ``(state_dict, meta)`` for a .npz (read once, every array CRC-checked), None for a
    .pth. Raises ``WeightsError`` on a mismatch, after deleting the file if ``remove``.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        digest = sha256_of(path)
        if not digest.startswith(entry.sha256_prefix):
            raise _bad_file(path, f"sha256 mismatch (expected {entry.sha256_prefix}..., got "
                                  f"{digest[:16]}...)", entry.name, remove)
        return None
    try:
        sd, meta = read_npz(path)
    except CheckpointError as e:
        raise _bad_file(path, f"corrupted ({e})", entry.name, remove) from None
    recorded = str(meta.get("source_sha256", ""))
    if not recorded.startswith(entry.sha256_prefix):
        raise _bad_file(path, f"sha256 mismatch: converted from a file with sha256 "
                              f"{recorded[:16] or '(none)'}..., expected {entry.sha256_prefix}...",
                        entry.name, remove)
    return sd, meta


def _download(url: str, dest: Path, entry, *, timeout: float, progress: bool,
              local: str = ".pth or .npz"):
    """Stream ``url`` into ``dest.partial`` while hashing it; rename to ``dest`` if complete and
    the hash matches. On any failure the partial file is removed and DownloadError raised.
    ``local``: the files the offline advice says ``--weights`` takes instead."""
    from tqdm.auto import tqdm

    partial = dest.with_name(dest.name + ".partial")
    offline = (f"cannot download {url} ({{}}): check the connection (or NPMNV3_WEIGHTS_URL) and "
               f"try again, or copy {entry.file_name} from a machine that has it (torch hub "
               f"keeps it in {torch_hub_dir()}) into {dest.parent}; a command with --weights "
               f"also takes a local {local} file")
    req = urllib.request.Request(url, headers={"User-Agent": "npmnv3"})
    h, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(partial, "wb") as f:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=entry.file_name, disable=None if progress else True,
                      file=sys.stderr) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise DownloadError(f"download of {url} interrupted: got {done:,} of {total:,} "
                                f"bytes; nothing was kept, try again")
        digest = h.hexdigest()
        if not digest.startswith(entry.sha256_prefix):
            raise DownloadError(f"{url}: sha256 mismatch (expected {entry.sha256_prefix}..., got "
                                f"{digest[:16]}...); the downloaded file was removed")
        os.replace(partial, dest)
    except urllib.error.HTTPError as e:
        raise DownloadError(offline.format(f"HTTP {e.code} {e.reason}")) from None
    except urllib.error.URLError as e:
        raise DownloadError(offline.format(getattr(e.reason, "strerror", None) or e.reason)) \
            from None
    except (http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DownloadError(f"download of {url} interrupted ({type(e).__name__}: {e}); "
                            f"nothing was kept, try again") from None
    finally:
        partial.unlink(missing_ok=True)


def _hub_file(entry: WeightsEntry) -> Path | None:
    """torch hub's copy of ``entry``'s file if it is there and has the right hash. A copy with
    the wrong hash is torch's (or the user's) file, not npmnv3's: it is left alone, with a
    warning, and never deleted."""
    hub = torch_hub_dir() / entry.file_name
    if not hub.is_file():
        return None
    try:
        verify_file(hub, entry, remove=False)
    except WeightsError as e:
        warnings.warn(f"ignoring torch hub's copy: {e}", stacklevel=3)
        return None
    return hub


def _fetch(name: str, base_url, timeout: float, progress: bool):
    """(npz path, state_dict, meta, origin) for a registry name, fetching and converting if
    needed; origin is where the weights came from: "npz", "pth", "torch hub cache" or
    "download"."""
    entry = get(name)
    d = weights_dir()
    npz, pth = d / entry.npz_name, d / entry.file_name
    if npz.is_file() and not entry.quantized:
        return (npz, *verify_file(npz, entry, remove=True), "npz")
    d.mkdir(parents=True, exist_ok=True)
    if pth.is_file():
        src, origin = pth, "pth"
        verify_file(src, entry, remove=True)            # our own file: removed if it is bad
    elif (hub := _hub_file(entry)) is not None:
        src, origin = hub, "torch hub cache"
    else:
        _download(entry.url(base_url), pth, entry, timeout=timeout, progress=progress)
        src, origin = pth, "download"
    if entry.quantized:            # int8 QAT weights: used as the .pth (npmnv3.nn.qat converts)
        return src, None, None, origin
    convert(src, npz, arch=entry.arch, preprocessing=entry.preprocessing)
    return (npz, *verify_file(npz, entry, remove=True), origin)


def fetch(name: str, *, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT,
          progress: bool = False, with_origin: bool = False):
    """Path of the verified ``.npz`` for registry name ``name``, downloading the ``.pth`` and
    converting it if it is not there yet (see the module docstring for the order); for a
    quantized entry, the verified ``.pth`` itself (it is checked on every use). ``progress``
    shows a tqdm bar on stderr while downloading. ``with_origin``: return ``(path, origin)``,
    origin "npz" (was there), "pth" (converted from, or for int8 weights used as, the .pth
    there), "torch hub cache" or "download". Raises ``WeightsError``/``DownloadError``."""
    path, _, _, origin = _fetch(name, base_url, timeout, progress)
    return (path, origin) if with_origin else path


def load_state_dict(name: str, *, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                    progress: bool = False):
    """``(state_dict, meta)`` of the verified weights ``name`` (fetched if needed); a quantized
    entry's is the QAT state_dict of its .pth, meta ``{}``."""
    path, sd, meta, _ = _fetch(name, base_url, timeout, progress)
    if get(name).quantized:
        from .pth import load_pth
        return load_pth(path), {}
    return sd, meta


def status(entry: WeightsEntry) -> str:
    """Where the weights are now: "npz", "pth", "torch hub cache" or "" (not on disk)."""
    d = weights_dir()
    for where, path in (("npz", d / entry.npz_name), ("pth", d / entry.file_name),
                        ("torch hub cache", torch_hub_dir() / entry.file_name)):
        if path.is_file():
            return where
    return ""
