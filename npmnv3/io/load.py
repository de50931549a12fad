"""Reading weights: the one loader behind every ``--weights`` and ``load_model``.

``read_weights(path)`` accepts

* an npmnv3 weights ``.npz`` (``npmnv3 convert``, ``npmnv3 train``'s ``model.npz``): the
  network, batch-norm eps, class names and preprocessing come from its metadata;
* a PyTorch ``.pth`` (zip or legacy; read by the torch-free ``load_pth``) or a plain ``.npz``
  of arrays (``np.savez(f, **state_dict)``) holding a torchvision, timm, mmpretrain or
  netspresso-trainer MobileNetV3 state_dict: other libraries' keys are recognised and renamed
  (``foreign.py``), the network is inferred from the shapes (``statedict.infer_config``) and
  the eps is that library's;

and returns a ``Weights``: the state_dict under torchvision's keys plus everything needed to use
it. Anything else (a training checkpoint, another model's weights, a file that is not a
checkpoint) is refused with one ``CheckpointError`` line saying what the file is and what to do.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..nn.config import MobileNetV3Config
from .foreign import BN_EPS, SOURCES, to_torchvision
from .npz import (
    CHECKPOINT_FORMAT,
    WEIGHTS_FORMAT,
    existing_file,
    has_meta,
    read_arrays,
    read_npz,
    write_npz,
)
from .pth import CheckpointError, load_pth
from .statedict import foreign_style, infer_config, int8_hint


@dataclass
class Weights:
    """A state_dict under torchvision's keys and what it needs: the network it fits, the
    batch-norm eps, the class names and the image preprocessing (None: not recorded, i.e.
    torchvision's ImageNet preset), and where it came from."""
    state_dict: dict[str, np.ndarray]
    config: MobileNetV3Config
    bn_eps: float
    source_format: str = "torchvision"        # the library whose weights these are
    path: Path | None = None
    classes: tuple[str, ...] | None = None
    preprocessing: dict | None = None
    meta: dict = field(default_factory=dict)  # the .npz metadata (empty for a .pth)

    def model(self, dtype=np.float32, **config_changes):
        """A model of ``config`` (with ``config_changes``, e.g. ``dilated=True``) holding these
        weights, in eval mode."""
        from ..nn.model import MobileNetV3
        model = MobileNetV3(self.config.replace(**config_changes), dtype=dtype,
                            bn_eps=self.bn_eps)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        return model.eval()


def _kind(path: Path) -> str:
    """"npmnv3" (an .npz with metadata), "npz" (plain arrays), "pth" (torch zip or legacy)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: a damaged zip archive ({e})") from None
        if has_meta(path):
            return "npmnv3"
        if any(n.endswith("/data.pkl") for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{path}: a zip archive that is neither a PyTorch checkpoint nor "
                              f"an .npz of arrays")
    if head[:1] == b"\x80":
        return "pth"
    raise CheckpointError(f"{path}: not a checkpoint: neither a PyTorch .pth (zip or pickle) "
                          f"nor an .npz" + (" (empty file)" if not head else ""))


def _rename(sd: dict, source, path: Path) -> tuple[dict, str]:
    """(torchvision state_dict, library): other libraries' keys renamed (recognised, or the
    library named by ``source``)."""
    if source not in (None, "torchvision", *SOURCES):
        raise ValueError(f"source must be one of {['torchvision', *SOURCES]} or None, got "
                         f"{source!r}")
    style = foreign_style(sd)
    if source == "torchvision" or (source is None and style is None):
        return sd, "torchvision"
    if source is not None and style is None and infer_config(sd) is not None:
        raise CheckpointError(f"{path}: the keys are torchvision's, not {source}'s: drop "
                              f"--from {source}")
    try:
        sd, info = to_torchvision(sd, source)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return sd, info["source"]


def _no_match(sd: dict, path: Path) -> CheckpointError:
    keys = ", ".join(list(sd)[:4]) + (" ..." if len(sd) > 4 else "")
    return CheckpointError(
        f"{path}: not a MobileNetV3 checkpoint: its {len(sd)} tensors ({keys}) match no "
        f"mobilenet_v3_large/small layout (width_mult 0.35-1.5, reduced_tail, any num_classes)")


def interpret_state_dict(sd: dict, path, *, source=None, config=None) -> tuple[dict, dict]:
    """(torchvision state_dict, meta) of a foreign-or-torchvision state_dict read from
    ``path``: keys renamed, the network inferred (``config``: a MobileNetV3Config or dict of
    builder arguments to use instead; what it does not give comes from the weights)."""
    path = Path(path)
    if int8_hint(sd):
        raise CheckpointError(f"{path}: {int8_hint(sd)}")
    sd, library = _rename(sd, source, path)
    found = infer_config(sd) if sd else None
    given = {} if config is None else (
        config.to_dict() if isinstance(config, MobileNetV3Config) else dict(config))
    given = {k: v for k, v in given.items() if v is not None}
    if found is None and "arch" not in given:
        raise _no_match(sd, path)
    if found is not None and given.get("arch", found.arch) == found.arch:
        cfg = MobileNetV3Config.from_dict({**found.to_dict(), **given}, str(path))
    else:
        cfg = MobileNetV3Config.from_dict(given, str(path))
    meta = {"format": WEIGHTS_FORMAT, "arch": cfg.to_dict(), "bn_eps": BN_EPS[library],
            "source_name": path.name, "source_format": library, "classes": None,
            "preprocessing": None}
    return sd, meta


def read_weights(path, *, source=None, config=None) -> Weights:
    """The ``Weights`` in ``path`` (see the module docstring for what is accepted).

    ``source`` names the library of a .pth's keys (default: recognised); ``config`` overrides
    builder arguments the file cannot tell (``dilated``) or that it gets wrong."""
    path = existing_file(path)
    kind = _kind(path)
    if kind == "npmnv3":
        try:
            arrays, meta = read_npz(path, formats=(WEIGHTS_FORMAT,))
        except CheckpointError as e:
            if f"an {CHECKPOINT_FORMAT} file" in str(e):
                raise CheckpointError(
                    f"{path}: a training checkpoint (weights, optimizer state, history): "
                    f"continue it with npmnv3 train --resume {path}; its weights alone are in "
                    f"model.npz next to it") from None
            raise
        cfg = MobileNetV3Config.from_dict(meta["arch"], f"{path}: arch")
        if config is not None:
            changes = config.to_dict() if isinstance(config, MobileNetV3Config) else config
            cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
        sd = arrays
    else:
        sd = load_pth(path) if kind == "pth" else read_arrays(path)
        sd, meta = interpret_state_dict(sd, path, source=source, config=config)
        cfg = MobileNetV3Config.from_dict(meta["arch"])
    classes = meta.get("classes")
    return Weights(sd, cfg, float(meta["bn_eps"]), meta.get("source_format", "torchvision"),
                   path, tuple(classes) if classes else None, meta.get("preprocessing"), meta)


def load_model(path, *, dtype=np.float32):
    """A model built for, and loaded with, the weights in ``path`` (``read_weights``: .npz or
    .pth, other libraries' too), with the batch-norm eps they need, in eval mode."""
    return read_weights(path).model(dtype)


def save_weights(path, model, *, classes=None, preprocessing=None, source_name="npmnv3",
                 source_format="npmnv3", extra=None) -> dict:
    """Write ``model``'s state_dict as an npmnv3 weights ``.npz`` (atomically) with its
    network, eps, class names and preprocessing; returns the meta written."""
    meta = {"format": WEIGHTS_FORMAT, "arch": model.config.to_dict(), "bn_eps": model.bn_eps,
            "source_name": source_name, "source_format": source_format,
            "classes": list(classes) if classes is not None else None,
            "preprocessing": preprocessing, "num_parameters": model.num_parameters(),
            **(extra or {})}
    return write_npz(path, model.state_dict(), meta)
