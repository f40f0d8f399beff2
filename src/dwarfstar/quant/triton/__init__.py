"""Triton kernels for CUDA tensors, registered behind the kernel seam of `dwarfstar.quant`.

`register()` adds ("cuda", kind) entries to LINEAR_KERNELS / EXPERT_KERNELS for the formats
in KINDS. The entries are thin wrappers that import Triton (`.kernels`) on their first call, so
`dwarfstar` never needs Triton on a machine without a CUDA tensor (a CPU box, a Mac).
DWARFSTAR_KERNELS=reference keeps the reference path here too.
"""

from __future__ import annotations

import os

import torch
from gguf import GGMLQuantizationType

from dwarfstar.quant.ops import EXPERT_KERNELS, LINEAR_KERNELS
from dwarfstar.quant.tensor import QTensor

Q = GGMLQuantizationType

KINDS = (Q.F16, Q.BF16, Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS)
"""The formats with a Triton kernel: ds4's published mixes (q2, q4, q8) and the float matrices."""


def _kernels():
    from dwarfstar.quant.triton import kernels

    return kernels


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    return _kernels().linear(x, w)


def expert_linear(x: torch.Tensor, w: QTensor, ids: torch.Tensor) -> torch.Tensor:
    return _kernels().expert_linear(x, w, ids)


def register() -> None:
    if os.environ.get("DWARFSTAR_KERNELS") == "reference":
        return
    for kind in KINDS:
        LINEAR_KERNELS["cuda", kind] = linear
        EXPERT_KERNELS["cuda", kind] = expert_linear
