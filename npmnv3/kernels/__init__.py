"""The kernels: every operation of MobileNetV3 as an explicit forward/backward pair.

Each ``*_forward`` returns ``(out, cache)`` (batch norm also returns its new running statistics)
and each ``*_backward(dout, cache)`` returns the gradients of every array argument, in the
forward's argument order. Every kernel has a plain NumPy version (``*_naive``) that reads like
the formula and a fast version (``*_fast``: BLAS through NumPy, Numba loops); the public name
takes ``impl="fast"`` (default) or ``impl="naive"``.

The int8 kernels (``quantize``, ``qconv``, ``qelementwise``) are inference-only: integer
arithmetic equal to torch's qnnpack engine, each again in a naive and a fast version.
"""

from .activations import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
    hardsigmoid_backward,
    hardsigmoid_forward,
    hardswish_backward,
    hardswish_forward,
    relu6_backward,
    relu6_forward,
    relu_backward,
    relu_forward,
)
from .batchnorm import (
    BatchNormStats,
    batchnorm_act_backward,
    batchnorm_act_forward,
    batchnorm_backward,
    batchnorm_forward,
)
from .conv2d import conv2d_backward, conv2d_forward, pointwise_backward, pointwise_forward
from .depthwise import depthwise_backward, depthwise_forward
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .pool import avgpool_backward, avgpool_forward
from .qconv import qconv2d, qlinear
from .qelementwise import (
    HARDSIGMOID_SCALE,
    HARDSIGMOID_ZERO_POINT,
    qadaptive_avgpool2d,
    qadd,
    qhardsigmoid,
    qhardswish,
    qmul,
)
from .quantize import (
    dequantize,
    quantize_bias,
    quantize_per_channel,
    quantize_per_tensor,
    requantize,
)
from .se import se_backward, se_forward

__all__ = [
    "ACTIVATIONS", "BatchNormStats",
    "activation_backward", "activation_forward",
    "avgpool_backward", "avgpool_forward",
    "batchnorm_act_backward", "batchnorm_act_forward",
    "batchnorm_backward", "batchnorm_forward",
    "conv2d_backward", "conv2d_forward",
    "cross_entropy_backward", "cross_entropy_forward",
    "depthwise_backward", "depthwise_forward",
    "dropout_backward", "dropout_forward",
    "hardsigmoid_backward", "hardsigmoid_forward",
    "hardswish_backward", "hardswish_forward",
    "linear_backward", "linear_forward",
    "pointwise_backward", "pointwise_forward",
    "relu6_backward", "relu6_forward",
    "relu_backward", "relu_forward",
    "se_backward", "se_forward",
    # int8 (quint8 activations, qint8 weights): torch's qnnpack arithmetic
    "HARDSIGMOID_SCALE", "HARDSIGMOID_ZERO_POINT", "dequantize", "qadaptive_avgpool2d", "qadd",
    "qconv2d", "qhardsigmoid", "qhardswish", "qlinear", "qmul", "quantize_bias",
    "quantize_per_channel", "quantize_per_tensor", "requantize",
]
