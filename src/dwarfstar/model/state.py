"""Decode state: exactly what a session must keep to continue a sequence.

Per layer: the raw sliding window (the last ``window - 1`` K=V rows: the next query sees those
plus itself), and for compressed layers the compressed rows so far and the compressor
frontier (the projections of the current incomplete window, and for ratio 4 the first half
of the last complete window, which the next row still pools). Ratio-4 layers hold the same
for the indexer's narrower compressor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from dwarfstar.model.config import ModelConfig


def _empty(width: int) -> torch.Tensor:
    return torch.zeros(0, width)


@dataclass
class CompressorState:
    """Emitted rows plus the frontier of a gated-pooling compressor."""

    rows: torch.Tensor  # (n_rows, d): pooled, normed, rotated rows, one per complete window
    pending_kv: torch.Tensor  # (< ratio, c·d): projections of the current window's tokens
    pending_gate: torch.Tensor  # (< ratio, c·d): their gate logits, position bias included
    previous_kv: torch.Tensor | None = None  # (ratio, d): ratio 4: last complete window's first half
    previous_gate: torch.Tensor | None = None

    @classmethod
    def empty(cls, ratio: int, d: int) -> CompressorState:
        width = (2 if ratio == 4 else 1) * d
        return cls(rows=_empty(d), pending_kv=_empty(width), pending_gate=_empty(width))

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.rows, self.pending_kv, self.pending_gate, self.previous_kv, self.previous_gate]
        return [t for t in parts if t is not None]


@dataclass
class LayerState:
    raw: torch.Tensor  # (≤ window - 1, head_dim): the most recent K=V rows, oldest first
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = [self.raw]
        for part in (self.compressor, self.indexer):
            if part is not None:
                out += part.tensors()
        return out


@dataclass
class Session:
    """The decode state of one sequence: ``n_tokens`` processed so far, and each layer's state."""

    config: ModelConfig
    layers: list[LayerState] = field(default_factory=list)
    n_tokens: int = 0

    @classmethod
    def new(cls, config: ModelConfig) -> Session:
        layers = []
        for i in range(config.n_layer):
            ratio = config.ratio(i)
            layers.append(
                LayerState(
                    raw=_empty(config.head_dim),
                    compressor=CompressorState.empty(ratio, config.head_dim) if ratio else None,
                    indexer=CompressorState.empty(4, config.index_head_dim) if ratio == 4 else None,
                )
            )
        return cls(config=config, layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def snapshot(self) -> Session:
        """An independent copy: continuing either one leaves the other unchanged."""
        return Session(config=self.config, layers=copy.deepcopy(self.layers), n_tokens=self.n_tokens)

    def restore(self, snapshot: Session) -> None:
        """Return this session to ``snapshot``'s state (the snapshot stays usable)."""
        copied = snapshot.snapshot()
        self.layers, self.n_tokens = copied.layers, copied.n_tokens
