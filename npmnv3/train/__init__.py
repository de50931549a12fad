"""Training: optimizers, the fit loop with its checkpoints, and ``npmnv3 train``.

The names below load on first use, so that ``npmnv3 --help`` (which imports ``train.cli`` for
its parser) does not load the kernels.
"""

import importlib as _importlib

_API = {"ArrayDataset": "loop", "ImageFolder": "loop", "evaluate": "loop", "fit": "loop",
        "load_folders": "loop", "load_checkpoint": "checkpoint"}
__all__ = list(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'npmnv3.train' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
