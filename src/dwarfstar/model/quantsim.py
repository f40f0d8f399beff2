"""Simulation of the official inference's quantisation-aware rounding.

DeepSeek trained V4 with QAT, and its inference code rounds the stored KV rows through FP8
(non-rope dims, blocks of 64, power-of-two scales) and the indexer's queries and keys through a
Hadamard rotation and FP4 (blocks of 32). Reproducing that keeps our outputs closest to the
official ones; references that do not simulate it are compared with the simulation off.
"""

from __future__ import annotations

from functools import cache

import torch

from dwarfstar.model import fused_cpu
from dwarfstar.quant.formats import E2M1_VALUES

FP8_MAX = 448.0
FP4_MAX = 6.0


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The power-of-two ("ue8m0") scale 2^ceil(log2(amax / top)), from the exponent bits.

    Like the official kernel, the ratio is ``amax`` times the float32 reciprocal of ``top`` (a
    Python scalar: torch rounds it to ``amax``'s float32, with no tensor copied from the host,
    which a CUDA graph capture would refuse).
    ``frexp`` gives ratio = m·2^e with m in [0.5, 1): the ceiling is e, or e - 1 when the
    ratio is exactly a power of two (m = 0.5); no float log2 rounding is involved.
    """
    mantissa, exponent = torch.frexp(amax * (1.0 / top))
    return torch.ldexp(torch.ones_like(amax), exponent - (mantissa == 0.5).to(exponent.dtype))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    pad = (-x.shape[-1]) % block
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return padded.unflatten(-1, (-1, block)), pad


def fp8_round(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round each block of ``block`` values through E4M3 with a shared power-of-two scale."""
    blocks, pad = _blocks(x, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
    scale = _pow2_scale(amax, FP8_MAX)
    scaled = (blocks / scale).clamp(-FP8_MAX, FP8_MAX)
    out = (scaled.to(torch.float8_e4m3fn).to(torch.float32) * scale).flatten(-2)
    return out[..., : x.shape[-1]] if pad else out


@cache
def _fp4_values(device: torch.device) -> torch.Tensor:
    """The non-negative E2M1 codes' values, on ``device`` (made once per device)."""
    return torch.tensor(E2M1_VALUES[:8], device=device)


def _e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (0, .5, 1, 1.5, 2, 3, 4, 6 with sign), ties to the even code."""
    values = _fp4_values(x.device)
    mag = x.abs()
    hi = torch.bucketize(mag, values).clamp(max=len(values) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return torch.where(take_hi, values[hi], values[lo]) * torch.sign(x)


def fp4_round(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round each block of ``block`` values through E2M1 with a shared power-of-two scale."""
    blocks, pad = _blocks(x, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = _pow2_scale(amax, FP4_MAX)
    out = (_e2m1((blocks / scale).clamp(-FP4_MAX, FP4_MAX)) * scale).flatten(-2)
    return out[..., : x.shape[-1]] if pad else out


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) over the last dim (a power of 2)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two width, got {n}")
    out = x
    stride = 1
    while stride < n:  # log2(n) butterfly stages, each a whole-tensor operation
        pairs = out.unflatten(-1, (n // (2 * stride), 2, stride))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        stride *= 2
    return out * n**-0.5


def kv_round(kv: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """FP8-round the non-rope part of KV rows, leaving the rope dims exact."""
    if fused_cpu.applies(kv):
        return fused_cpu.kv_round(kv, nope_dim)
    return torch.cat((fp8_round(kv[..., :nope_dim]), kv[..., nope_dim:]), dim=-1)


def indexer_round(x: torch.Tensor) -> torch.Tensor:
    """Hadamard-rotate and FP4-round indexer queries and keys."""
    n = x.shape[-1]
    if fused_cpu.applies(x) and n & (n - 1) == 0:
        return fused_cpu.indexer_round(x)
    return fp4_round(hadamard(x))
