"""Rotary position embedding: interleaved pairs on the last ``rope_dim`` dims, optional YaRN.

Window-only layers use the plain base (10000). Compressed layers (ratio 4 or 128) use the
compress base (160000) with YaRN frequency interpolation and no magnitude factor.
"""

from __future__ import annotations

import math

import torch

from dwarfstar.model import fused_cpu
from dwarfstar.model.config import ModelConfig


def yarn_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair frequencies of the compressed layers' rope (YaRN, no mscale).

    A model without YaRN scaling (factor 1, or no original context) gets the plain
    frequencies of the compress base.
    """
    dim = config.rope_dim
    base = config.compress_rope_base
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_factor == 1.0 or config.rope_original_context <= 0:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(config.rope_original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: original frequency (high-frequency pairs), 0: interpolated by the factor
    return freqs / config.rope_factor * (1 - keep) + freqs * keep


def plain_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.rope_dim
    return config.rope_base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


class Rope:
    """Rotates the trailing ``rope_dim`` dims of vectors, pairs (2k, 2k+1), GPT-J style."""

    def __init__(self, freqs: torch.Tensor) -> None:
        self.freqs = freqs

    def to(self, device: torch.device | str) -> Rope:
        return Rope(self.freqs.to(device))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.freqs[None, :]
        return angles.cos(), angles.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` of shape (T, ..., D) at ``positions`` (T,); ``inverse`` rotates by -θ."""
        if x.is_cuda and x.dtype == torch.float32 and x.shape[0]:  # one launch instead of about ten
            from dwarfstar.model import fused

            return fused.rope(x, positions, self.freqs, inverse)
        if fused_cpu.applies(x):
            return fused_cpu.rope(x, positions, self.freqs, inverse)
        cos, sin = self.cos_sin(positions)
        if inverse:
            sin = -sin
        extra = x.dim() - 2  # broadcast over head axes between T and D
        cos = cos.view(cos.shape[0], *([1] * extra), cos.shape[1])
        sin = sin.view(sin.shape[0], *([1] * extra), sin.shape[1])
        rope_dim = 2 * self.freqs.shape[0]
        pairs = x[..., -rope_dim:].unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat((x[..., :-rope_dim], rotated), dim=-1)


def layer_rope(config: ModelConfig, ratio: int) -> Rope:
    """Window-only layers: plain rope. Compressed layers: compress base with YaRN."""
    return Rope(yarn_frequencies(config) if ratio else plain_frequencies(config))
