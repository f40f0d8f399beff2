"""Decode state: exactly what a session must keep to continue a sequence.

Per layer: the raw sliding window (the last ``window - 1`` K=V rows: the next query sees those
plus itself), and for compressed layers the compressed rows so far and the compressor
frontier (the projections of the current incomplete window, and for ratio 4 the first half
of the last complete window, which the next row still pools). Ratio-4 layers hold the same
for the indexer's narrower compressor.

The rows and the window live in ``RowBuffer``s: preallocated storage that grows by doubling,
so appending a token costs amortised O(1) instead of a copy of everything held. Rows are
append-only and the frontier tensors are replaced, never written in place, so a snapshot is
cheap: it shares the buffers' storage up to its own length and the frontier tensors by
reference (``Session.snapshot``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from dwarfstar.model.config import ModelConfig


class _Storage:
    """A block of rows shared by the buffers that view it (a session and its snapshots)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.views: weakref.WeakSet[RowBuffer] = weakref.WeakSet()


class RowBuffer:
    """Rows of one width appended at the end (and, for a sliding window, dropped at the front).

    The rows live in a preallocated block that grows by doubling; ``share()`` gives another
    buffer over the same block and range, which costs nothing. A buffer writes in place only
    past every other buffer on its block (copy-on-write otherwise), so appending to one never
    changes what another holds.
    """

    MIN_CAPACITY = 16

    def __init__(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self._attach(_Storage(torch.empty(0, width, device=device, dtype=dtype)), 0, 0)
        self.rows_copied = 0  # rows moved to a new block so far: bounded by a constant per append

    def _attach(self, storage: _Storage, start: int, end: int) -> None:
        self._storage, self._start, self._end = storage, start, end
        storage.views.add(self)

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return self._storage.data.shape[0]

    def view(self) -> torch.Tensor:
        """The rows held, oldest first: a view, valid (and unchanged) after later appends."""
        return self._storage.data[self._start : self._end]

    def share(self) -> RowBuffer:
        """Another buffer holding the same rows, without copying them."""
        other = RowBuffer.__new__(RowBuffer)
        other._attach(self._storage, self._start, self._end)
        other.rows_copied = 0
        return other

    def append(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        shared_past_end = any(v is not self and v._end > self._end for v in self._storage.views)
        if shared_past_end or self._end + n > self.capacity:
            self._move(max(self.MIN_CAPACITY, 2 * (len(self) + n)))
        self._storage.data[self._end : self._end + n] = rows
        self._end += n

    def keep_last(self, n: int) -> None:
        """Drop all but the last ``n`` rows; storage far larger than that is given back."""
        self._start = max(self._start, self._end - n)
        if self.capacity > 4 * max(n, self.MIN_CAPACITY):
            self._move(2 * max(n, self.MIN_CAPACITY))

    def _move(self, capacity: int) -> None:
        """Copy the rows held into a new block of ``capacity`` rows (others keep the old one)."""
        old = self._storage.data
        data = old.new_empty((capacity, old.shape[1]))
        data[: len(self)] = old[self._start : self._end]
        self.rows_copied += len(self)
        self._storage.views.discard(self)
        self._attach(_Storage(data), 0, len(self))

    @classmethod
    def adopt(cls, rows: torch.Tensor) -> RowBuffer:
        """A buffer over ``rows`` themselves, not copied (a memory-mapped file's pages, say):
        they are never written, the first append moves them to a block of its own."""
        buffer = cls.__new__(cls)
        buffer._attach(_Storage(rows), 0, rows.shape[0])
        buffer.rows_copied = 0
        return buffer

    @classmethod
    def of(cls, rows: torch.Tensor) -> RowBuffer:
        """A buffer holding a copy of ``rows``."""
        buffer = cls(rows.shape[1], rows.device, rows.dtype)
        buffer.append(rows)
        return buffer


@dataclass
class CompressorState:
    """Emitted rows plus the frontier of a gated-pooling compressor.

    The frontier tensors are small (under two windows of projections) and are replaced by each
    chunk, never modified in place.
    """

    row_buffer: RowBuffer  # pooled, normed, rotated rows, one per complete window
    pending_kv: torch.Tensor  # (< ratio, c·d): projections of the current window's tokens
    pending_gate: torch.Tensor  # (< ratio, c·d): their gate logits, position bias included
    previous_kv: torch.Tensor | None = None  # (ratio, d): ratio 4: last complete window's first half
    previous_gate: torch.Tensor | None = None

    @classmethod
    def empty(cls, ratio: int, d: int, device: torch.device | str = "cpu") -> CompressorState:
        width = (2 if ratio == 4 else 1) * d
        pending = torch.zeros(0, width, device=device)
        return cls(row_buffer=RowBuffer(d, device), pending_kv=pending, pending_gate=pending)

    @property
    def rows(self) -> torch.Tensor:
        """(n_rows, d): the compressed rows so far."""
        return self.row_buffer.view()

    def append_rows(self, rows: torch.Tensor) -> None:
        self.row_buffer.append(rows)

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.rows, self.pending_kv, self.pending_gate, self.previous_kv, self.previous_gate]
        return [t for t in parts if t is not None]

    def snapshot(self) -> CompressorState:
        return CompressorState(
            self.row_buffer.share(), self.pending_kv, self.pending_gate, self.previous_kv, self.previous_gate
        )


@dataclass
class LayerState:
    window: RowBuffer  # the most recent K=V rows (at most window - 1 between chunks), oldest first
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    @property
    def raw(self) -> torch.Tensor:
        """(≤ window - 1, head_dim): the raw K=V rows of the sliding window."""
        return self.window.view()

    def tensors(self) -> list[torch.Tensor]:
        out = [self.raw]
        for part in (self.compressor, self.indexer):
            if part is not None:
                out += part.tensors()
        return out

    def snapshot(self) -> LayerState:
        return LayerState(
            self.window.share(),
            None if self.compressor is None else self.compressor.snapshot(),
            None if self.indexer is None else self.indexer.snapshot(),
        )


@dataclass
class Session:
    """The decode state of one sequence: ``n_tokens`` processed so far, and each layer's state."""

    config: ModelConfig
    layers: list[LayerState] = field(default_factory=list)
    n_tokens: int = 0

    @classmethod
    def new(cls, config: ModelConfig, device: torch.device | str = "cpu") -> Session:
        layers = []
        for i in range(config.n_layer):
            ratio = config.ratio(i)
            layers.append(
                LayerState(
                    window=RowBuffer(config.head_dim, device),
                    compressor=CompressorState.empty(ratio, config.head_dim, device) if ratio else None,
                    indexer=CompressorState.empty(4, config.index_head_dim, device) if ratio == 4 else None,
                )
            )
        return cls(config=config, layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes of decode state held (not counting the buffers' spare capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def snapshot(self) -> Session:
        """An independent copy: continuing either one leaves the other unchanged.

        It shares storage with this session (no rows are copied); the first of the two to
        write where the other's rows lie copies them first.
        """
        return Session(
            config=self.config, layers=[layer.snapshot() for layer in self.layers], n_tokens=self.n_tokens
        )

    def restore(self, snapshot: Session) -> None:
        """Return this session to ``snapshot``'s state (the snapshot stays usable)."""
        self.layers, self.n_tokens = snapshot.snapshot().layers, snapshot.n_tokens
