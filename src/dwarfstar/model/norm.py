"""RMSNorm, the only normalisation DeepSeek V4 uses (fp32, weight applied after)."""

from __future__ import annotations

import torch

from dwarfstar.model import fused_cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim; no weight for the unweighted variants."""
    if x.is_cuda and x.dtype == torch.float32 and x.shape[-1] <= 16384:  # one launch instead of five
        from dwarfstar.model import fused

        return fused.rms_norm(x, weight, eps)
    if fused_cpu.applies(x):  # one call instead of five
        return fused_cpu.rms_norm(x, weight, eps)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x if weight is None else x * weight
