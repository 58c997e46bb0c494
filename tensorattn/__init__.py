"""tensorattn: tensor (higher-order) attention in JAX, exact and by the polynomial method."""

from tensorattn.kernels.api import higher_order_attention, tensor_attention
from tensorattn.kernels.blocked import BlockSizes
from tensorattn.kernels.polynomial import (
    PolynomialAccuracyError,
    PolynomialAccuracyWarning,
    polynomial_certificate,
)

__all__ = [
    "BlockSizes",
    "PolynomialAccuracyError",
    "PolynomialAccuracyWarning",
    "higher_order_attention",
    "polynomial_certificate",
    "tensor_attention",
]
__version__ = "0.1.0"
