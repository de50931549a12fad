"""``npmnv3 convert``: a PyTorch checkpoint of a MobileNetV3 -> an npmnv3 ``.npz``, torch-free.

``convert(src, dst)`` reads ``src`` with the one loader (``load.read_weights``: a torchvision,
timm, mmpretrain or netspresso-trainer ``.pth``, or a plain ``.npz`` of such a state_dict),
proves the weights fit by loading them strictly into the model they describe, and writes
``dst`` (``npz.write_npz``: atomic, read back and checked) holding every array under its
torchvision key, in the file's order and dtype, plus the metadata of ``npz.py``: the network,
the batch-norm eps the weights need (torchvision 1e-3, timm 1e-5), the source file's name, size
and SHA-256 and its library, and, if given, the class names and preprocessing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .load import read_weights
from .npz import CHECKPOINT_FORMAT, existing_file, has_meta, read_meta, write_npz
from .pth import CheckpointError


def sha256_of(path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_bn_eps(eps, where: str = "bn_eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{where} must be a number in (0, 1), got {eps!r}")
    return float(eps)


def convert(src, dst, *, arch=None, source=None, bn_eps=None, classes=None,
            preprocessing=None, overwrite=True) -> dict:
    """Convert the checkpoint ``src`` to the npmnv3 ``.npz`` ``dst``; returns the meta written.

    ``arch``: None (inferred from the tensor shapes), "large"/"small", or a dict of builder
    arguments / a ``MobileNetV3Config`` (``width_mult``, ``reduced_tail``, ``dilated``,
    ``num_classes``); what it does not give comes from the weights (``dilated`` changes no
    shape, so it is recorded only if given). ``source``: None (torchvision keys, or another
    library's recognised from its keys), "torchvision", "timm", "mmpretrain" or
    "netspresso-trainer". ``bn_eps``: record this eps instead of the library's (e.g. 1e-5 for
    netspresso-trainer checkpoints from before 2024-05). ``overwrite=False`` refuses an existing
    ``dst``. Raises ``CheckpointError`` (a ValueError) if ``src`` is not a loadable checkpoint
    or fits no MobileNetV3 variant; ``dst`` is then neither created nor changed.
    """
    bn_eps = None if bn_eps is None else check_bn_eps(bn_eps)
    src, dst = existing_file(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination is the source file")
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst}: exists already (--overwrite to replace it)")
    if has_meta(src) and read_meta(src).get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{src}: already an npmnv3 .npz: nothing to convert")
    if isinstance(arch, str):
        arch = {"arch": arch}
    sha = sha256_of(src)
    weights = read_weights(src, source=source, config=arch)
    model = weights.model()                         # proves the weights fit, naming problems
    if sha256_of(src) != sha:
        raise CheckpointError(f"{src}: the file changed while it was being converted")
    meta = {**weights.meta, "source_sha256": sha, "source_bytes": src.stat().st_size,
            "num_parameters": model.num_parameters(),
            "bn_eps": weights.bn_eps if bn_eps is None else bn_eps,
            "classes": list(classes) if classes is not None else None,
            "preprocessing": preprocessing}
    return write_npz(dst, weights.state_dict, meta)


