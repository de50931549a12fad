"""Parameters, buffers and gradients keyed by torchvision's names: what the classifier
(``model.MobileNetV3``) and the segmentation models (``segmentation.SegmentationModel``) share.

A class using ``ParameterStore`` has ``layout`` (rows ``(key, shape, kind)``, kind "param" or
"buffer", in torchvision's ``state_dict`` order), ``params`` and ``buffers`` (key -> array) and
``grads`` (key -> accumulated gradient).
"""

from __future__ import annotations

import numpy as np


class ParameterStore:
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, torchvision's keys in torchvision's order."""
        return {k: (self.buffers[k] if kind == "buffer" else self.params[k]).copy()
                for k, _, kind in self.layout}

    def named_parameters(self):
        for key, _, kind in self.layout:
            if kind == "param":
                yield key, self.params[key]

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p in self.named_parameters()))

    def zero_grad(self):
        """Forget accumulated gradients (``named_grads`` then yields zeros)."""
        self.grads = {}

    def named_grads(self):
        """(name, gradient) for every parameter, torchvision's names; zeros if none yet."""
        for key, p in self.named_parameters():
            yield key, self.grads.get(key, np.zeros_like(p))

    def _accumulate(self, grads: dict):
        """Add a block's ``{key: gradient}`` to ``grads`` (torch's accumulation semantics)."""
        for key, g in grads.items():
            self.grads[key] = self.grads[key] + g if key in self.grads else g
