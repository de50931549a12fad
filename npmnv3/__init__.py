"""npmnv3: MobileNetV3 (Large and Small) from scratch in NumPy and Numba.

Every layer is an explicit kernel with a forward and a backward pass (``npmnv3.kernels``), each in
a plain NumPy version that reads like the math and a fast version; torch and torchvision are the
reference the tests compare against, never a run-time dependency.
"""

from .kernels import threads as _threads

# Thread pools: no environment variable is set at import; the eval engine takes the cores only
# while it runs (BLAS single-threaded inside Numba's loops), see npmnv3/kernels/threads.py.
_threads.init()

from . import kernels  # noqa: E402
from .data.preprocess import load_image, preprocess  # noqa: E402
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
           "preprocess", "load_image",
           "gradcam", "save_overlay"]

from .io import weights  # noqa: E402
from .tools.classify import classify, load_classifier  # noqa: E402

__all__ += ["weights", "classify", "load_classifier"]

from .train.loop import ArrayDataset, ImageFolder, fit, load_checkpoint  # noqa: E402

__all__ += ["ArrayDataset", "ImageFolder", "fit", "load_checkpoint"]
