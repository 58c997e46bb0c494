"""tensorattn: tensor (higher-order) attention in JAX, exact and by the polynomial method."""

from tensorattn.kernels.api import higher_order_attention, tensor_attention
from tensorattn.kernels.blocked import BlockSizes

__all__ = ["BlockSizes", "higher_order_attention", "tensor_attention"]
__version__ = "0.1.0"
