"""The eval engine: MobileNetV3 inference derived from the reference blocks in four steps.

1. ``plan.py``   folding: batch norm into the convolutions' weights and biases (eval mode);
                 layout: channels-last, one flat weight array, one table row per step.
2. ``run.py``    fusion: each inverted residual runs band by band (expand -> depthwise with
                 bias + activation + SE squeeze -> projection with bias + residual), and
                 threading: whole images per thread, or row bands per thread at batch 1.
3. ``net.py``    ``FoldedNet``: the object the model talks to (``model.folded()``).
4. ``profile.py`` time per step and per op kind next to MACs (the benchmark's profile).

The loops themselves are the public kernels of ``npmnv3.kernels.nhwc``; results equal the
reference path (``MobileNetV3.forward_intermediates``) to float rounding, checked against
torchvision stage by stage in ``tests/test_engine.py``.
"""

from .net import FoldedNet, Workspace
from .plan import Plan

__all__ = ["FoldedNet", "Plan", "Workspace"]
