"""``npmnv3.optim``: the public name of the optimizers and schedules (``npmnv3.train.optim``)."""

from .train.optim import SGD, ExponentialLR, Optimizer, RMSprop, StepLR, rmsprop_torchvision

__all__ = ["SGD", "ExponentialLR", "Optimizer", "RMSprop", "StepLR", "rmsprop_torchvision"]
