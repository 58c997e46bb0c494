"""tensorattn: tensor (higher-order) attention in JAX, exact and by the polynomial method."""

from tensorattn.kernels.api import higher_order_attention, tensor_attention
from tensorattn.kernels.configs import (
    BlockedConfig,
    KernelConfig,
    MosaicGPUConfig,
    PallasConfig,
    PolynomialConfig,
    ReferenceConfig,
)
from tensorattn.kernels.polynomial import (
    PolynomialAccuracyError,
    PolynomialAccuracyWarning,
    polynomial_certificate,
)
from tensorattn.kernels.spine import Unsupported

__all__ = [
    "BlockedConfig",
    "KernelConfig",
    "MosaicGPUConfig",
    "PallasConfig",
    "PolynomialAccuracyError",
    "PolynomialAccuracyWarning",
    "PolynomialConfig",
    "ReferenceConfig",
    "Unsupported",
    "higher_order_attention",
    "polynomial_certificate",
    "tensor_attention",
]
__version__ = "0.1.0"
