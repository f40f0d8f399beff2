"""GGML block formats: dequantization, quantized matrix products, quantizers.

This is the only layer that knows how the file lays weights out. The model sees QTensor and
calls `linear` / `expert_linear` / `take_rows`; each format's matrix product sits behind one
entry of LINEAR_KERNELS.
"""

from .formats import SUPPORTED_KINDS
from .ops import LINEAR_KERNELS, dequantize, expert_linear, linear, take_rows
from .quantize import quantize, random_blocks
from .tensor import QTensor, bytes_per_row

__all__ = [
    "LINEAR_KERNELS",
    "SUPPORTED_KINDS",
    "QTensor",
    "bytes_per_row",
    "dequantize",
    "expert_linear",
    "linear",
    "quantize",
    "random_blocks",
    "take_rows",
]
