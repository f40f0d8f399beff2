"""GGML block formats: dequantization, quantized matrix products, quantizers.

This is the only layer that knows how the file lays weights out. The model sees QTensor and
calls three entry points, whatever the device and format:

- `linear(x, w)`: x @ W.T;
- `expert_linear(x, w, expert_ids)`: each row through its experts of a stacked (experts, rows,
  cols) weight, in one call (a token's routed experts, the grouped output projection);
- `take_rows(w, index)`: embedding rows.

The kernel seam: the matrix products dispatch on (device type, format) through the registries
LINEAR_KERNELS and EXPERT_KERNELS, e.g. ("cpu", Q.IQ2_XXS) -> a compiled kernel, later
("cuda", Q.IQ2_XXS) -> a Triton kernel. A pair with no entry takes the reference path
(`reference_linear`, `reference_expert_linear`): pure torch, dequantizing bands of rows with the
decoders in `formats`, so every format with a decoder works on every device without
registering anything. Importing this package registers the compiled CPU kernels (`quant.cpu`)
when they are built, and the Triton kernels for CUDA tensors (`quant.triton`, imported on
first use); DWARFSTAR_KERNELS=reference keeps the reference path. See docs/model.md,
"Kernels".
"""

from . import cpu
from . import triton as triton_kernels
from .formats import SUPPORTED_KINDS
from .ops import (
    EXPERT_KERNELS,
    LINEAR_KERNELS,
    dequantize,
    expert_linear,
    linear,
    reference_expert_linear,
    reference_linear,
    take_rows,
)
from .quantize import quantize
from .tensor import QTensor, bytes_per_row

cpu.register()
triton_kernels.register()

__all__ = [
    "EXPERT_KERNELS",
    "LINEAR_KERNELS",
    "SUPPORTED_KINDS",
    "QTensor",
    "bytes_per_row",
    "dequantize",
    "expert_linear",
    "linear",
    "quantize",
    "reference_expert_linear",
    "reference_linear",
    "take_rows",
]
