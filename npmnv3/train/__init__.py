"""Training: optimizers, the fit loop with its checkpoints, and ``npmnv3 train``."""

from .checkpoint import load_checkpoint
from .loop import ArrayDataset, ImageFolder, evaluate, fit, load_folders

__all__ = ["ArrayDataset", "ImageFolder", "evaluate", "fit", "load_checkpoint", "load_folders"]
