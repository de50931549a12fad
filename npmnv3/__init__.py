"""npmnv3: MobileNetV3 (Large and Small) from scratch in NumPy and Numba.

Every layer is an explicit kernel with a forward and a backward pass (``npmnv3.kernels``), each in
a plain NumPy version that reads like the math and a fast version; torch and torchvision are the
reference the tests compare against, never a run-time dependency.
"""

import importlib as _importlib

# Thread pools: nothing is set at import (no environment variable): the kernels run BLAS
# single-threaded inside their calls and leave the cores to Numba's loops, whatever library was
# imported first (npmnv3/kernels/threads.py).

__version__ = "0.1.0"

# The public API, loaded on first use (``import npmnv3`` stays fast; the kernels and their
# Numba functions load only when something needs them). name -> (module, attribute or None).
_API = {
    "kernels": ("npmnv3.kernels", None),
    "optim": ("npmnv3.optim", None),
    "train": ("npmnv3.train", None),
    "weights": ("npmnv3.io.registry", None),
    "MobileNetV3": ("npmnv3.nn.model", "MobileNetV3"),
    "MobileNetV3Config": ("npmnv3.nn.config", "MobileNetV3Config"),
    "no_grad": ("npmnv3.nn.model", "no_grad"),
    "mobilenet_v3_large": ("npmnv3.nn.builders", "mobilenet_v3_large"),
    "mobilenet_v3_small": ("npmnv3.nn.builders", "mobilenet_v3_small"),
    "mobilenet_v3_from_config": ("npmnv3.nn.builders", "mobilenet_v3_from_config"),
    "config_path": ("npmnv3.nn.builders", "config_path"),
    "CheckpointError": ("npmnv3.io.pth", "CheckpointError"),
    "load_pth": ("npmnv3.io.pth", "load_pth"),
    "QTensor": ("npmnv3.io.pth", "QTensor"),
    "load_npz": ("npmnv3.io.npz", "load_npz"),
    "read_weights": ("npmnv3.io.load", "read_weights"),
    "load_model": ("npmnv3.io.load", "load_model"),
    "save_weights": ("npmnv3.io.load", "save_weights"),
    "convert": ("npmnv3.io.convert", "convert"),
    "load_image": ("npmnv3.data.preprocess", "load_image"),
    "preprocess": ("npmnv3.data.preprocess", "preprocess"),
    "preprocess_segmentation": ("npmnv3.data.preprocess", "preprocess_segmentation"),
    "SegmentationModel": ("npmnv3.nn.segmentation", "SegmentationModel"),
    "lraspp_mobilenet_v3_large": ("npmnv3.nn.segmentation", "lraspp_mobilenet_v3_large"),
    "deeplabv3_mobilenet_v3_large": ("npmnv3.nn.segmentation", "deeplabv3_mobilenet_v3_large"),
    "crop_pixels": ("npmnv3.data.preprocess", "crop_pixels"),
    "ImageFolder": ("npmnv3.data.folders", "ImageFolder"),
    "ArrayDataset": ("npmnv3.data.folders", "ArrayDataset"),
    "fit": ("npmnv3.train.loop", "fit"),
    "load_checkpoint": ("npmnv3.train.loop", "load_checkpoint"),
    "summary": ("npmnv3.tools.summary", "summary"),
    "compare_with_torchvision": ("npmnv3.tools.compare", "compare_with_torchvision"),
    "gradcam": ("npmnv3.tools.gradcam", "gradcam"),
    "save_overlay": ("npmnv3.tools.gradcam", "save_overlay"),
    "classify": ("npmnv3.tools.classify", "classify"),
    "load_classifier": ("npmnv3.tools.classify", "load_classifier"),
    "evaluate_folder": ("npmnv3.tools.evaluate", "evaluate_folder"),
    "numerical_gradient": ("npmnv3.tools.gradcheck", "numerical_gradient"),
    "rel_error": ("npmnv3.tools.gradcheck", "rel_error"),
    "QuantizedMobileNetV3": ("npmnv3.nn.quantized", "QuantizedMobileNetV3"),
    "quantized_mobilenet_v3_large": ("npmnv3.nn.quantized", "quantized_mobilenet_v3_large"),
    "quantized_mobilenet_v3_small": ("npmnv3.nn.quantized", "quantized_mobilenet_v3_small"),
    "quantize": ("npmnv3.nn.ptq", "quantize"),
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'npmnv3' has no attribute {name!r}")
    module, attr = _API[name]
    value = _importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value                         # later lookups skip this function
    return value


def __dir__():
    return sorted(__all__)
