"""Random-weight GGUF models of the real architecture: the demo model and benchmark models.

The tensors follow the same name and shape tables as a converted checkpoint, with the real
tokenizer embedded, so everything downstream (loading, validation, llama.cpp) treats them as
it treats a real file. Values are random but well scaled, so activations stay finite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from dwarfstar.convert.converter import gguf_metadata, stored_kind
from dwarfstar.convert.hf_config import FP8_BLOCK, CheckpointConfig
from dwarfstar.gguf.names import global_shapes, layer_prefix, layer_shapes, tensor_role
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec
from dwarfstar.model.config import ModelConfig
from dwarfstar.quant.quantize import QUANTIZABLE_KINDS, quantize
from dwarfstar.synthetic.blocks import random_blocks
from dwarfstar.tokenizer import deepseek_tokenizer_json, gguf_tokenizer_metadata

KindPolicy = Callable[[str, tuple[int, ...]], T]

DEMO_CONFIG = ModelConfig(
    n_layer=4,
    dim=256,
    n_head=4,
    head_dim=128,
    value_dim=128,
    rope_dim=64,
    q_lora_rank=128,
    o_lora_rank=64,
    o_groups=2,
    n_expert=16,
    n_expert_used=4,
    expert_ff=128,
    n_hash_layer=1,
    index_n_head=16,
    index_head_dim=64,
    index_topk=8,
    compress_ratios=(0, 4, 128, 4),
    swiglu_limit=(10.0,) * 4,
)
DEMO_PROMPT = "DwarfStar runs DeepSeek V4 Flash: one model, done completely."


def uniform_policy(matrix_kind: T) -> KindPolicy:
    """Every matrix in ``matrix_kind``; vectors F32 and the hash table I32, as the converter does."""
    return lambda name, shape: stored_kind(name, shape, matrix_kind)


def tensor_specs(config: ModelConfig, policy: KindPolicy) -> list[TensorSpec]:
    """Every tensor a model of ``config`` carries, in file order."""
    specs = [TensorSpec(name, policy(name, shape), shape) for name, shape in global_shapes(config).items()]
    for layer in range(config.n_layer):
        for suffix, shape in layer_shapes(config, layer).items():
            name = layer_prefix(layer) + suffix
            specs.append(TensorSpec(name, policy(name, shape), shape))
    return specs


def random_values(spec: TensorSpec, config: ModelConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Stored bytes for one tensor, one matrix at a time for stacked experts."""
    shape = spec.shape
    role = tensor_role(spec.name, len(shape))
    if role == "table":  # the hash routing table: distinct experts per token
        table = np.argsort(rng.random((shape[0], config.n_expert)), axis=1)[:, : shape[1]]
        yield table.astype(np.int32)
        return
    if role == "vector":
        base = 1.0 if spec.name.endswith("norm.weight") else 0.0
        yield _encode((base + 0.1 * rng.standard_normal(shape)).astype(np.float32), spec.kind, rng)
        return
    for matrix_shape in [shape] if len(shape) == 2 else [shape[1:]] * shape[0]:
        values = rng.standard_normal(matrix_shape, dtype=np.float32) / np.sqrt(matrix_shape[-1])
        yield _encode(values, spec.kind, rng)


def _encode(values: np.ndarray, kind: T, rng: np.random.Generator) -> np.ndarray:
    """``values`` in ``kind``; formats we have no quantizer for get random valid blocks of the same
    root mean square instead."""
    if kind in QUANTIZABLE_KINDS:
        return quantize(values, kind)
    return random_blocks(kind, values.shape, rng, std=float(np.sqrt(np.mean(np.square(values)))))


def write_random_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    policy: KindPolicy,
    seed: int = 0,
    progress: bool = False,
    tokenizer_json: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a random-weight GGUF of ``config`` with the real DeepSeek V4 tokenizer, or the one of
    ``tokenizer_json`` (a model with a small vocabulary needs a small tokenizer)."""
    out = Path(path)
    rng = np.random.default_rng(seed)
    source = deepseek_tokenizer_json() if tokenizer_json is None else tokenizer_json
    tokenizer = gguf_tokenizer_metadata(source, vocab_size=config.vocab_size)
    metadata = gguf_metadata(
        CheckpointConfig(config, 1 << 20, FP8_BLOCK), "random " + out.stem, T.F32, tokenizer
    )
    specs = tensor_specs(config, policy)
    partial = out.with_name(out.name + ".part")
    try:
        with GGUFFileWriter(partial, metadata, specs) as writer:
            for spec in tqdm(specs, desc=out.name, unit="tensor", disable=not progress):
                writer.write_tensor(spec.name, random_values(spec, config, rng))
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out
