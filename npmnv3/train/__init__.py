"""Training: optimizers, the fit loop with its checkpoints, and ``npmnv3 train``."""

from .loop import ArrayDataset, ImageFolder, evaluate, fit, load_checkpoint, load_folders, main

__all__ = ["ArrayDataset", "ImageFolder", "evaluate", "fit", "load_checkpoint", "load_folders",
           "main"]
