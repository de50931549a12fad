"""npmnv3: MobileNetV3 (Large and Small) from scratch in NumPy and Numba.

Every layer is an explicit kernel with a forward and a backward pass (``npmnv3.kernels``), each in
a plain NumPy version that reads like the math and a fast version; torch and torchvision are the
reference the tests compare against, never a run-time dependency.
"""

from . import kernels
from .gradcheck import numerical_gradient, rel_error

__version__ = "0.1.0"

__all__ = ["kernels", "numerical_gradient", "rel_error", "__version__"]
