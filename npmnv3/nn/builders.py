"""The model builders: torchvision's ``mobilenet_v3_large`` / ``mobilenet_v3_small`` and a
MobileNetV3 from a netspresso-trainer ``stage_params`` description."""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from .arch import load_stage_params, stage_params_rows
from .config import MobileNetV3Config
from .model import MobileNetV3

_BUILD_KEYS = ("num_classes", "width_mult", "reduced_tail", "dilated", "dropout", "dtype",
               "seed")


def _build(arch, *, dtype=np.float32, seed=None, **kwargs):
    unknown = set(kwargs) - set(_BUILD_KEYS)
    if unknown:
        raise TypeError(f"mobilenet_v3_{arch}() got unknown keyword argument(s) "
                        f"{sorted(unknown)}; accepted: {list(_BUILD_KEYS)}")
    return MobileNetV3(MobileNetV3Config(arch, **kwargs), dtype=dtype, seed=seed)


def mobilenet_v3_large(**kwargs) -> MobileNetV3:
    """torchvision's ``mobilenet_v3_large`` (same keyword arguments: ``num_classes``,
    ``width_mult``, ``reduced_tail``, ``dilated``, ``dropout``; an unknown keyword is an error).
    Extra: ``dtype`` (float32/float64), ``seed`` for the initialisation."""
    return _build("large", **kwargs)


def mobilenet_v3_small(**kwargs) -> MobileNetV3:
    """torchvision's ``mobilenet_v3_small``; see ``mobilenet_v3_large``."""
    return _build("small", **kwargs)


def mobilenet_v3_from_config(config, *, last_channel: int | None = None, num_classes=1000,
                             dropout=0.2, dtype=np.float32, seed=None) -> MobileNetV3:
    """A MobileNetV3 from a netspresso-trainer style ``stage_params`` description.

    ``config`` is a YAML/JSON file path, or the ``stage_params`` list itself (stages of parallel
    lists: in_channels, kernel_sizes, expanded_channels, out_channels, use_se, act_type,
    stride, optional dilation). ``last_channel`` (the classifier's hidden width) comes from the
    argument, else from the file (``last_channel`` or netspresso's head
    ``intermediate_channels``). ``npmnv3/nn/configs/mobilenet_v3_{large,small}.yaml`` build
    exactly the presets. Invalid configs raise ValueError naming the stage and field.
    """
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        stage_params, file_last = load_stage_params(config)
        last_channel = last_channel if last_channel is not None else file_last
    else:
        stage_params = config
    rows = stage_params_rows(stage_params)
    if last_channel is None:
        raise ValueError("last_channel (the classifier's hidden width, 1280 for Large, 1024 for "
                         "Small) is not in the config: pass last_channel=...")
    if isinstance(last_channel, bool) or not isinstance(last_channel, int) or last_channel < 1:
        raise ValueError(f"last_channel must be a positive integer, got {last_channel!r}")
    cfg = MobileNetV3Config("custom", num_classes=num_classes, dropout=dropout, rows=rows,
                            last_channel=last_channel)
    return MobileNetV3(cfg, dtype=dtype, seed=seed)


def config_path(arch: str) -> str:
    """Path of the packaged stage_params YAML of a preset ("large" or "small")."""
    if arch not in ("large", "small"):
        raise ValueError(f"unknown preset {arch!r}; expected 'large' or 'small'")
    return str(files("npmnv3.nn") / "configs" / f"mobilenet_v3_{arch}.yaml")
