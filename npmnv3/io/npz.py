"""npmnv3's ``.npz`` files: the one reader and writer, with their JSON metadata.

An npmnv3 ``.npz`` is an ordinary NumPy archive (readable with ``np.load(allow_pickle=False)``)
holding arrays under their torchvision state_dict keys, plus ``META_KEY``: a uint8 array of
UTF-8 JSON. Two formats share it:

``npmnv3-weights`` (``npmnv3 convert``, ``npmnv3 train``'s ``model.npz``, the weights registry)
    ``arch``: the network (``MobileNetV3Config.to_dict()``); ``bn_eps``: the batch-norm eps the
    weights need (torchvision 1e-3, timm 1e-5); ``source_name``, ``source_sha256``,
    ``source_bytes``: the file they came from; ``source_format``: its library; ``classes``: the
    class names (or null); ``preprocessing``: how images were prepared for these weights
    (``resize_size``, ``crop_size``, ``mean``, ``std``; or null: torchvision's ImageNet preset);
    ``num_parameters``, ``npmnv3_version``.
``npmnv3-train-checkpoint`` (``npmnv3 train``'s ``checkpoint.npz``)
    the same entries, plus what resuming needs (``train/loop.py``); arrays are stored under
    ``model/<key>`` and ``optimizer/<name>/<key>``.

Version 1 files (before ``preprocessing``, ``classes`` and ``arch.dropout``) read as version 2
with those entries empty. Writes are atomic: a temporary file next to the destination, read
back and compared, then renamed over it; on any error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np

from .pth import CheckpointError

META_KEY = "__npmnv3_meta__"
WEIGHTS_FORMAT = "npmnv3-weights"
CHECKPOINT_FORMAT = "npmnv3-train-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def existing_file(path) -> Path:
    """``path`` as a Path if it names a regular file, else ``CheckpointError`` saying why."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def has_meta(path) -> bool:
    """True if ``path`` is a zip archive with an npmnv3 metadata entry (read without loading)."""
    try:
        with zipfile.ZipFile(path) as z:
            return f"{META_KEY}.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_meta(path) -> dict:
    """The metadata of an npmnv3 ``.npz`` alone (the arrays are not read); {} if it has none
    or it cannot be read (``read_npz`` then says why)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z[META_KEY].tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_arrays(path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickles allowed), by name, in the file's order."""
    path = existing_file(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds a single {type(z).__name__}, not an archive")
        with z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def read_npz(path, formats=(WEIGHTS_FORMAT, CHECKPOINT_FORMAT)) -> tuple[dict, dict]:
    """``(arrays, meta)`` of an npmnv3 ``.npz`` of one of ``formats``; the meta's version is
    checked and version 1 is brought up to date. ``CheckpointError`` names what is wrong."""
    path = existing_file(path)
    arrays = read_arrays(path)
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CheckpointError(f"{path}: no {META_KEY} entry: not written by npmnv3")
    try:
        meta = json.loads(np.asarray(raw, dtype=np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {META_KEY} entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (WEIGHTS_FORMAT,
                                                                 CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: {META_KEY} does not describe an npmnv3 file")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: unknown format version {version!r}: this npmnv3 reads "
                              f"versions {list(READABLE_VERSIONS)}; convert the .pth again")
    if meta["format"] not in formats:
        raise CheckpointError(f"{path}: an {meta['format']} file, expected "
                              f"{' or '.join(formats)}")
    meta.setdefault("source_format", "torchvision")     # version 1 files
    meta.setdefault("bn_eps", 1e-3)
    meta.setdefault("classes", None)
    meta.setdefault("preprocessing", None)
    meta["format_version"] = FORMAT_VERSION
    return arrays, meta


def load_npz(path) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of an npmnv3 weights ``.npz`` (``npmnv3 convert``'s output)."""
    return read_npz(path, formats=(WEIGHTS_FORMAT,))


def write_npz(dst, arrays: dict, meta: dict) -> dict:
    """Write ``arrays`` plus ``meta`` (as JSON, with ``format_version`` and ``npmnv3_version``
    added) to ``dst`` atomically; returns the meta written. NumPy scalars in ``meta`` become
    JSON numbers."""
    from .. import __version__

    meta = {**meta, "format_version": FORMAT_VERSION, "npmnv3_version": __version__}
    text = json.dumps(meta, sort_keys=True,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
    blob = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    out = {k: np.asarray(v, order="C") for k, v in arrays.items()}   # keeps 0-d arrays 0-d
    _write_atomic(Path(dst), {**out, META_KEY: blob})
    return meta


def _write_atomic(dst: Path, arrays: dict) -> None:
    """Write to a fresh temporary file next to ``dst``, read it back, then ``os.replace``.
    On any error (Ctrl-C included) the temporary file is removed and ``dst`` is untouched."""
    if dst.is_dir():
        raise ValueError(f"{dst}: is a directory; give a file name")
    if not dst.parent.is_dir():
        raise ValueError(f"{dst}: directory {dst.parent} does not exist")
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)    # umask applies
    except OSError as e:
        raise OSError(f"{dst}: cannot write here ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with np.load(tmp, allow_pickle=False) as z:                        # read back
            if z.files != list(arrays) or not all(
                    z[k].dtype == v.dtype and z[k].shape == v.shape
                    and z[k].tobytes() == v.tobytes() for k, v in arrays.items()):
                raise CheckpointError(f"{dst}: the written file does not read back equal")
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{dst}: writing failed ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
