"""Reading a checkpoint's safetensors lazily, tensor by tensor, under DeepSeek's official names.

Three spellings of the same tensors are accepted and brought to the official one
(``layers.3.attn.wq_a.weight``):

* DeepSeek's release: official names, FP8 (e4m3) weights with 128x128 e8m0 block scales and
  FP4 (e2m1, two per byte, low nibble first) experts with 1x32 e8m0 scales, each scale in a
  companion ``.scale`` tensor;
* transformers' module names (``model.layers.3.self_attn.q_a_proj.weight``), with experts stacked
  as ``mlp.experts.gate_up_proj`` (E, 2·ff, dim: w1 then w3) and ``down_proj`` (E, dim, ff);
* what transformers' ``save_pretrained`` writes: official names behind ``model.``, a few
  leaves in module spelling, and the attention kv_norm as ``attn.norm``.

Only the tensor asked for is read (one expert of a stacked tensor, when asked for one), and
quantized weights come back dequantized to float32, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from dwarfstar.quant.formats import E2M1_VALUES

# transformers' module spelling -> official, applied in order (after dropping a leading "model.").
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.position_bias$", ".ape"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.attn\.norm\.", ".attn.kv_norm."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    # Scales of quantized weights: ``.scale`` beside the weight (``X.weight`` -> ``X.scale``).
    (r"\.weight_scale_inv$", ".scale"),
    (r"_proj_scale_inv$", "_proj.scale"),
)
_COMPILED = tuple((re.compile(pattern), repl) for pattern, repl in _RENAMES)

FP4_BLOCK = (1, 32)


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, duplicated or stored in a form we cannot read."""


def official_name(name: str) -> str:
    """The official DeepSeek name of a checkpoint tensor, in any of the accepted spellings."""
    name = name.removeprefix("model.")
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    return name


def scale_name(weight: str) -> str:
    """Where a quantized weight's block scales live, by official name."""
    return weight.removesuffix(".weight") + ".scale"


class Checkpoint:
    """The safetensors files of a directory, indexed by official name; a context manager."""

    def __init__(self, directory: Path, fp8_block: tuple[int, int] = (128, 128)) -> None:
        self.directory = directory
        self.fp8_block = fp8_block
        self._stack = ExitStack()
        self._files: dict[Path, object] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no .safetensors files")
        try:
            for path in files:
                self._index(path)
        except BaseException:
            self._stack.close()  # no ``with`` block will close the files opened so far
            raise

    def _index(self, path: Path) -> None:
        keys = self._open(path).keys()  # a safetensors handle is not iterable
        for key in keys:
            name = official_name(key)
            if name in self._where:
                other = self._where[name][1]
                raise CheckpointError(f"{self.directory}: {key!r} and {other!r} are both {name!r}")
            self._where[name] = (path, key)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape of a tensor (an FP4 weight has twice the columns it stores)."""
        shape = tuple(self._slice(name).get_shape())
        if self._is_fp4(name):
            shape = (*shape[:-1], 2 * shape[-1])
        return shape

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its ``index``-th slice along the first axis), dequantized to float32.

        Integer tensors (the hash routing table) come back as int64.
        """
        stored = self._get(name, index)
        if not stored.dtype.is_floating_point and not self._is_fp4(name):
            return stored.to(torch.int64)
        scale = scale_name(name)
        if scale not in self:
            if stored.dtype == torch.float8_e4m3fn:
                raise CheckpointError(f"{self.directory}: FP8 tensor {name!r} has no {scale!r} beside it")
            return stored.to(torch.float32)
        scales = self._get(scale, index).to(torch.float32)
        if stored.dtype == torch.float8_e4m3fn:
            return _apply_block_scales(stored.to(torch.float32), scales, self.fp8_block)
        if stored.dtype in (torch.int8, torch.uint8):
            return _apply_block_scales(_unpack_fp4(stored), scales, FP4_BLOCK)
        raise CheckpointError(f"{self.directory}: tensor {name!r} of type {stored.dtype} has block scales")

    def _is_fp4(self, name: str) -> bool:
        return self._slice(name).get_dtype() in ("I8", "U8") and scale_name(name) in self

    def _open(self, path: Path) -> object:
        if path not in self._files:
            try:
                self._files[path] = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return self._files[path]

    def _location(self, name: str) -> tuple[object, str]:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in the checkpoint")
        path, key = self._where[name]
        return self._open(path), key

    def _slice(self, name: str):  # safetensors does not export its slice type
        handle, key = self._location(name)
        with self._reading(name):
            return handle.get_slice(key)

    def _get(self, name: str, index: int | None) -> torch.Tensor:
        handle, key = self._location(name)
        with self._reading(name):
            return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]

    @contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """Errors from safetensors or torch while reading ``name`` (a dtype they do not know, a
        damaged shard) -> CheckpointError naming the file and the tensor."""
        try:
            yield
        except Exception as err:  # safetensors raises its own error type, torch a RuntimeError
            path, key = self._where[name]
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({err})") from None


def _unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes of two e2m1 codes -> (..., 2n) float32; the low nibble is the even column."""
    codes = packed.view(torch.uint8).to(torch.int64)
    pairs = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    return torch.tensor(E2M1_VALUES, dtype=torch.float32)[pairs]


def _apply_block_scales(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Multiply each (block rows x block cols) tile of ``values`` by its scale (edge tiles are cut)."""
    rows, cols = values.shape[-2:]
    expanded = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block[1], dim=-1)[..., :cols]
    if expanded.shape != values.shape:
        raise CheckpointError(
            f"block scales of shape {tuple(scales.shape)} do not cover shape {tuple(values.shape)}"
        )
    return values * expanded
