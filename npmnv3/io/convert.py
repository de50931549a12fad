"""torchvision ``.pth`` -> ``.npz`` with metadata, and loading either back into a model.

``convert(src, dst)`` reads ``src`` with the torch-free ``load_pth``, finds the torchvision
builder arguments whose layout the checkpoint matches (``statedict.infer_arch``, or the ``arch``
given), proves the state_dict fits by loading it strictly into that model, and writes ``dst``
atomically (a temporary file in ``dst``'s directory, read back and checked, then ``os.replace``).

The ``.npz`` holds every state_dict array under its torchvision key, in the file's order and
dtype (so ``load_npz`` returns exactly what ``load_pth`` read), plus ``META_KEY``: a uint8 array
of UTF-8 JSON with the format version, the builder arguments, the source's name, size and
SHA-256, the npmnv3 version, ``source_format`` and ``bn_eps``. Everything is readable with
``np.load(allow_pickle=False)``.

Checkpoints of timm, mmpretrain and netspresso-trainer (``npmnv3.foreign``) are renamed to
torchvision's keys first (recognised from their keys, or named with ``source=``); the ``.npz``
then holds torchvision keys, ``source_format`` names the library and ``bn_eps`` the BatchNorm
eps its weights need (torchvision 1e-3, timm 1e-5), which ``load_model`` builds the model with.
Files written before these two entries existed read as torchvision with eps 1e-3.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np

from .foreign import BN_EPS, SOURCES, to_torchvision
from .pth import CheckpointError, load_pth
from .statedict import foreign_style, infer_arch

META_KEY = "__npmnv3_meta__"
FORMAT = "npmnv3-weights"
FORMAT_VERSION = 1
ARCH_DEFAULTS = {"arch": None, "width_mult": 1.0, "reduced_tail": False, "dilated": None,
                 "num_classes": 1000}            # dilated None: unknown (weights do not tell)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _existing_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def check_arch(arch, where: str = "arch") -> dict:
    """Validate builder arguments and fill the defaults: {arch, width_mult, reduced_tail,
    dilated, num_classes}; a value of None means "the default"."""
    if not isinstance(arch, dict):
        raise ValueError(f"{where} must be a dict of builder arguments, got {type(arch).__name__}")
    unknown = set(arch) - set(ARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown builder argument(s) {sorted(unknown)}; expected "
                         f"{list(ARCH_DEFAULTS)}")
    out = {**ARCH_DEFAULTS, **{k: v for k, v in arch.items() if v is not None}}
    if out["arch"] not in ("large", "small"):
        raise ValueError(f"{where}: arch must be 'large' or 'small', got {out['arch']!r}")
    w, n = out["width_mult"], out["num_classes"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
        raise ValueError(f"{where}: width_mult must be a positive number, got {w!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: num_classes must be a positive integer, got {n!r}")
    for k in ("reduced_tail", "dilated"):
        if out[k] is not None and not isinstance(out[k], bool):
            raise ValueError(f"{where}: {k} must be true or false, got {out[k]!r}")
    out["width_mult"] = float(w)
    return out


def check_bn_eps(eps, where: str = "bn_eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{where} must be a number in (0, 1), got {eps!r}")
    return float(eps)


def build_model(arch: dict, dtype=np.float32, seed=None, bn_eps=None):
    """The npmnv3 model for builder arguments ``arch`` (``dilated=None`` builds undilated);
    ``bn_eps`` (default torchvision's 1e-3) is the BatchNorm eps of both forward paths."""
    from ..nn.model import mobilenet_v3_large, mobilenet_v3_small
    a = check_arch(arch)
    builder = {"large": mobilenet_v3_large, "small": mobilenet_v3_small}[a["arch"]]
    model = builder(width_mult=a["width_mult"], reduced_tail=bool(a["reduced_tail"]),
                    dilated=bool(a["dilated"]), num_classes=a["num_classes"], dtype=dtype,
                    seed=seed)
    if bn_eps is not None:
        model.bn_eps = check_bn_eps(bn_eps)
        model.changed()                     # the folded weights hold eps
    return model


def _rename(sd: dict, source, src: Path) -> tuple[dict, str, float]:
    """``(torchvision state_dict, source format, its BN eps)``: foreign keys (recognised, or
    ``source`` given) are renamed by ``foreign.to_torchvision``."""
    if source not in (None, "torchvision", *SOURCES):
        raise ValueError(f"source must be one of {['torchvision', *SOURCES]} or None, got "
                         f"{source!r}")
    if source == "torchvision" or (source is None and foreign_style(sd) is None):
        return sd, "torchvision", BN_EPS["torchvision"]
    try:
        sd, info = to_torchvision(sd, source)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return sd, info["source"], info["bn_eps"]


def _no_match(sd: dict, src: Path) -> CheckpointError:
    keys = ", ".join(list(sd)[:4]) + (" ..." if len(sd) > 4 else "")
    style = foreign_style(sd)
    hint = f"; the keys look like a {style} checkpoint" if style else ""
    return CheckpointError(
        f"{src}: not a torchvision MobileNetV3 checkpoint: its {len(sd)} tensors ({keys}) "
        f"match no mobilenet_v3_large/small layout (any width_mult in "
        f"{{0.35, 0.5, 0.75, 1.0, 1.25, 1.5}}, reduced_tail, num_classes){hint}")


def _resolve_arch(sd: dict, arch, src: Path) -> dict:
    """``arch`` (None, "large"/"small" or a partial dict) on top of what the weights show."""
    found = infer_arch(sd) if sd else None
    if isinstance(arch, str):
        arch = {"arch": arch}
    if arch is not None and not isinstance(arch, dict):
        raise ValueError(f"arch must be None, 'large', 'small' or a dict, got {arch!r}")
    arch = {k: v for k, v in (arch or {}).items() if v is not None}
    if found is None and "arch" not in arch:
        raise _no_match(sd, src)
    same = found is not None and arch.get("arch", found["arch"]) == found["arch"]
    try:                            # what is given wins; the rest comes from the weights
        return check_arch({**found, **arch} if same else arch)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def _validate(sd: dict, arch: dict, src: Path):
    """Load ``sd`` strictly into the model ``arch`` describes (raises naming every problem)."""
    model = build_model(arch)
    try:
        model.load_state_dict(sd, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return model


def load_npz(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(state_dict, meta)`` from a ``.npz`` written by ``convert`` (no pickle allowed)."""
    path = _existing_file(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds a single {type(z).__name__}, not an archive")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") \
            from None
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CheckpointError(f"{path}: no {META_KEY} entry: not written by npmnv3 convert")
    try:
        meta = json.loads(np.asarray(raw, dtype=np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {META_KEY} entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {META_KEY} does not describe an {FORMAT} file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format version {version!r}: this npmnv3 reads "
                              f"version {FORMAT_VERSION}; convert the .pth again")
    meta.setdefault("source_format", "torchvision")     # written before these entries existed
    meta.setdefault("bn_eps", BN_EPS["torchvision"])
    try:
        meta["arch"] = check_arch(meta.get("arch"), f"{path}: {META_KEY} arch")
        meta["bn_eps"] = check_bn_eps(meta["bn_eps"], f"{path}: {META_KEY} bn_eps")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return arrays, meta


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


def write_npz_atomic(dst: Path, arrays: dict) -> None:
    """Write to a fresh temporary file next to ``dst``, read it back, then ``os.replace``.
    On any error the temporary file is removed and ``dst`` is left untouched."""
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)    # umask applies
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def convert(src, dst, *, arch=None, source=None, bn_eps=None) -> dict:
    """Convert the checkpoint ``src`` (.pth) to ``dst`` (.npz); returns the meta.

    ``arch``: None (inferred from the tensor shapes), "large"/"small", or a dict of builder
    arguments (``width_mult``, ``reduced_tail``, ``dilated``, ``num_classes``); keys not given
    are taken from the weights. ``dilated`` changes no shape, so it is recorded only if given.
    ``source``: None (torchvision keys, or another library's recognised from its keys),
    "torchvision", "timm", "mmpretrain" or "netspresso-trainer"; other libraries' keys are
    renamed to torchvision's (``npmnv3.foreign``). The meta records ``source_format`` and
    ``bn_eps``: ``bn_eps`` if given (e.g. 1e-5 for netspresso-trainer checkpoints from before
    2024-05), else the eps of the source library.
    Raises ``CheckpointError`` (a ValueError) if ``src`` is not a loadable checkpoint or fits
    no MobileNetV3 variant; ``dst`` is then neither created nor changed.
    """
    bn_eps = None if bn_eps is None else check_bn_eps(bn_eps)
    src, dst = _existing_file(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination is the source file")
    if dst.is_dir():
        raise ValueError(f"{dst}: is a directory; give the .npz file name")
    if not dst.parent.is_dir():
        raise ValueError(f"{dst}: directory {dst.parent} does not exist")
    if _is_npmnv3_npz(src):
        raise CheckpointError(f"{src}: already an npmnv3 .npz (load it with load_npz)")
    sha = _sha256(src)
    sd, source_format, eps = _rename(load_pth(src), source, src)
    a = _resolve_arch(sd, arch, src)
    model = _validate(sd, a, src)
    if _sha256(src) != sha:
        raise CheckpointError(f"{src}: the file changed while it was being converted")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": a,
            "source_name": src.name, "source_sha256": sha, "source_bytes": src.stat().st_size,
            "num_parameters": model.num_parameters(), "source_format": source_format,
            "bn_eps": eps if bn_eps is None else bn_eps}
    return write_npz_with_meta(dst, sd, meta)


def write_npz_with_meta(dst, arrays: dict, meta: dict) -> dict:
    """Write ``arrays`` plus ``meta`` (JSON, as the uint8 array ``META_KEY``, with
    ``npmnv3_version`` added) to ``dst`` atomically; returns the meta written. NumPy scalars in
    ``meta`` are stored as JSON numbers."""
    from .. import __version__

    meta = {**meta, "npmnv3_version": __version__}
    text = json.dumps(meta, sort_keys=True,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
    blob = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    out = {k: np.asarray(v, order="C") for k, v in arrays.items()}   # keeps 0-d arrays 0-d
    write_npz_atomic(Path(dst), {**out, META_KEY: blob})
    return meta


def _is_npmnv3_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return f"{META_KEY}.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def load_weights(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(state_dict, arch)`` from a ``.npz`` of ``convert`` (arch from its metadata) or a
    ``.pth`` (arch inferred from the shapes)."""
    path = _existing_file(path)
    if _is_npmnv3_npz(path) or path.suffix.lower() == ".npz":
        sd, meta = load_npz(path)          # for a bad .npz: raises the reason
        return sd, meta["arch"]
    sd = load_pth(path)
    return sd, _resolve_arch(sd, None, path)


def read_weights(path) -> tuple[dict[str, np.ndarray], dict, dict]:
    """``(state_dict, arch, info)`` from a ``.npz`` of ``convert`` or a ``.pth`` (torchvision's
    or, renamed, another library's); ``info``: ``source_format`` and ``bn_eps`` (the eps to
    build the model with)."""
    path = _existing_file(path)
    if _is_npmnv3_npz(path) or path.suffix.lower() == ".npz":
        sd, meta = load_npz(path)
        return sd, meta["arch"], {"source_format": meta["source_format"],
                                  "bn_eps": meta["bn_eps"]}
    sd, source_format, eps = _rename(load_pth(path), None, path)
    return sd, _resolve_arch(sd, None, path), {"source_format": source_format, "bn_eps": eps}


def load_model(path, *, dtype=np.float32):
    """A model built for, and loaded with, the weights in ``path`` (.npz or .pth, another
    library's too), with the BatchNorm eps they need, in eval mode (``.train()`` to
    fine-tune)."""
    sd, arch, info = read_weights(path)
    model = build_model(arch, dtype=dtype, bn_eps=info["bn_eps"])
    try:
        model.load_state_dict(sd, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval()
