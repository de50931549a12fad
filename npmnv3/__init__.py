"""npmnv3: MobileNetV3 (Large and Small) from scratch in NumPy and Numba.

Every layer is an explicit kernel with a forward and a backward pass (``npmnv3.kernels``), each in
a plain NumPy version that reads like the math and a fast version; torch and torchvision are the
reference the tests compare against, never a run-time dependency.
"""

import os as _os
import sys as _sys

# Thread pools: NumPy's OpenBLAS and Numba's OpenMP pool take turns on the same cores. OpenBLAS
# workers spin for a long time after each matrix multiply (by default ~2^28 cycles), so the next
# Numba parallel loop waits for the OS scheduler: ~8 ms per switch on 2 cores
# (benchmarks/README.md). OPENBLAS_THREAD_TIMEOUT=4 makes them sleep right away; OpenBLAS reads
# it once, when NumPy is first imported. If NumPy was imported before npmnv3 without it, Numba's
# pool is made to wait passively instead (~50 us per parallel loop, but no 8 ms stalls).
# A value the user has set is always kept.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
elif "OPENBLAS_THREAD_TIMEOUT" not in _os.environ:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import kernels  # noqa: E402
from .data.preprocess import load_image, preprocess, preprocess_segmentation  # noqa: E402
from .io.convert import convert, load_model, load_npz  # noqa: E402
from .io.pth import CheckpointError, load_pth  # noqa: E402
from .nn.model import (  # noqa: E402
    MobileNetV3,
    config_path,
    mobilenet_v3_from_config,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from .tools.compare import compare_with_torchvision  # noqa: E402
from .tools.gradcam import gradcam, save_overlay  # noqa: E402
from .tools.gradcheck import numerical_gradient, rel_error  # noqa: E402
from .tools.summary import summary  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CheckpointError", "MobileNetV3", "config_path", "kernels", "load_pth",
           "mobilenet_v3_from_config", "mobilenet_v3_large", "mobilenet_v3_small",
           "numerical_gradient", "rel_error", "__version__",
           "summary", "convert", "load_npz", "load_model", "compare_with_torchvision",
           "preprocess", "preprocess_segmentation", "load_image",
           "gradcam", "save_overlay"]

from .io import weights  # noqa: E402
from .tools.classify import classify, load_classifier  # noqa: E402

__all__ += ["weights", "classify", "load_classifier"]

from .nn.segmentation import (  # noqa: E402
    SegmentationModel,
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
)

__all__ += ["SegmentationModel", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]

from .train.loop import ArrayDataset, ImageFolder, fit, load_checkpoint  # noqa: E402

__all__ += ["ArrayDataset", "ImageFolder", "fit", "load_checkpoint"]
