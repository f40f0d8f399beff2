"""The GGUF contract of DeepSeek V4 Flash: metadata keys, tensor names and shapes, in one table.

The converter, the synthetic-model writer and the model binding all read these tables, so a
name and its shape are spelled exactly once. Names follow antirez's ds4 and llama.cpp's
``deepseek4`` architecture (they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

ARCH = "deepseek4"


def key(name: str) -> str:
    """The full metadata key of an architecture-scoped name, e.g. ``block_count``."""
    return f"{ARCH}.{name}"


# Metadata: (short key, value of the real Flash model). The config reads every one of them;
# a file whose dimensions equal Flash's is validated against these values exactly.
FLASH_METADATA: dict[str, object] = {
    "block_count": 43,
    "embedding_length": 4096,
    "vocab_size": 129280,
    "attention.head_count": 64,
    "attention.head_count_kv": 1,
    "attention.key_length": 512,
    "attention.value_length": 512,
    "rope.dimension_count": 64,
    "attention.q_lora_rank": 1024,
    "attention.output_lora_rank": 1024,
    "attention.output_group_count": 8,
    "expert_count": 256,
    "expert_used_count": 6,
    "expert_feed_forward_length": 2048,
    "expert_shared_count": 1,
    "hash_layer_count": 3,
    "attention.sliding_window": 128,
    "attention.indexer.head_count": 64,
    "attention.indexer.key_length": 128,
    "attention.indexer.top_k": 512,
    "hyper_connection.count": 4,
    "hyper_connection.sinkhorn_iterations": 20,
    "hyper_connection.epsilon": 1e-6,
    "rope.scaling.original_context_length": 65536,
    "rope.freq_base": 10000.0,
    "rope.scaling.factor": 16.0,
    "rope.scaling.yarn_beta_fast": 32.0,
    "rope.scaling.yarn_beta_slow": 1.0,
    "attention.compress_rope_freq_base": 160000.0,
    "expert_weights_scale": 1.5,
    "expert_weights_norm": True,
    "attention.layer_norm_rms_epsilon": 1e-6,
}

COMPRESS_RATIOS_KEY = "attention.compress_ratios"  # one int per layer: 0, 4 or 128
SWIGLU_CLAMP_KEY = "swiglu_clamp_exp"  # one float per layer (llama.cpp also accepts one for all)
# llama.cpp's converter counts the multi-token-prediction (MTP) blocks in block_count, after the
# main layers: blk.N.* with the layer tensors plus blk.N.nextn.* (eh_proj, enorm, hnorm, ...).
MTP_LAYERS_KEY = "nextn_predict_layers"
MTP_PROBE_SUFFIX = "nextn.eh_proj.weight"  # llama.cpp counts no MTP block when this is absent


class TensorDims(Protocol):
    """The model dimensions tensor shapes depend on (``dwarfstar.model.config.ModelConfig``)."""

    n_layer: int
    dim: int
    vocab_size: int
    n_head: int
    head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    n_shared_expert: int
    index_n_head: int
    index_head_dim: int
    hc_mult: int

    def ratio(self, layer: int) -> int: ...

    def hash_routed(self, layer: int) -> bool: ...


# Torch-order shape of a tensor, from the dimensions and the layer's compress ratio.
Shape = Callable[[TensorDims, int], tuple[int, ...]]


@dataclass(frozen=True)
class TensorName:
    """One tensor: its GGUF name (a suffix after ``blk.N.`` for layer tensors), its official
    checkpoint name, its torch-order shape and, for layer tensors, when a layer carries it.

    ``when`` is one of: ``all``, ``compressed`` (ratio 4 or 128), ``indexer`` (ratio 4),
    ``hash`` (hash-routed layers), ``scored`` (layers routed by score, with selection bias).
    """

    gguf: str
    official: str
    shape: Shape
    when: str = "all"


def _mix(c: TensorDims) -> int:
    """Rows of a hyper-connection mixer: pre and post weights plus the hc x hc combination."""
    return (2 + c.hc_mult) * c.hc_mult


def _compressed_width(c: TensorDims, ratio: int) -> int:
    """Ratio-4 compressors pool two overlapping halves, so they carry two rows' worth of values."""
    return (2 if ratio == 4 else 1) * c.head_dim


GLOBAL_TENSORS: tuple[TensorName, ...] = (
    TensorName("token_embd.weight", "embed.weight", lambda c, r: (c.vocab_size, c.dim)),
    TensorName("output_norm.weight", "norm.weight", lambda c, r: (c.dim,)),
    TensorName("output.weight", "head.weight", lambda c, r: (c.vocab_size, c.dim)),
    TensorName("output_hc_fn.weight", "hc_head_fn", lambda c, r: (c.hc_mult, c.hc_mult * c.dim)),
    TensorName("output_hc_base.weight", "hc_head_base", lambda c, r: (c.hc_mult,)),
    TensorName("output_hc_scale.weight", "hc_head_scale", lambda c, r: (1,)),
)

LAYER_TENSORS: tuple[TensorName, ...] = (
    TensorName("hc_attn_fn.weight", "hc_attn_fn", lambda c, r: (_mix(c), c.hc_mult * c.dim)),
    TensorName("hc_attn_base.weight", "hc_attn_base", lambda c, r: (_mix(c),)),
    TensorName("hc_attn_scale.weight", "hc_attn_scale", lambda c, r: (3,)),
    TensorName("hc_ffn_fn.weight", "hc_ffn_fn", lambda c, r: (_mix(c), c.hc_mult * c.dim)),
    TensorName("hc_ffn_base.weight", "hc_ffn_base", lambda c, r: (_mix(c),)),
    TensorName("hc_ffn_scale.weight", "hc_ffn_scale", lambda c, r: (3,)),
    TensorName("attn_norm.weight", "attn_norm.weight", lambda c, r: (c.dim,)),
    TensorName("attn_q_a.weight", "attn.wq_a.weight", lambda c, r: (c.q_lora_rank, c.dim)),
    TensorName("attn_q_a_norm.weight", "attn.q_norm.weight", lambda c, r: (c.q_lora_rank,)),
    TensorName("attn_q_b.weight", "attn.wq_b.weight", lambda c, r: (c.n_head * c.head_dim, c.q_lora_rank)),
    TensorName("attn_kv.weight", "attn.wkv.weight", lambda c, r: (c.head_dim, c.dim)),
    TensorName("attn_kv_a_norm.weight", "attn.kv_norm.weight", lambda c, r: (c.head_dim,)),
    TensorName("attn_sinks.weight", "attn.attn_sink", lambda c, r: (c.n_head,)),
    TensorName(
        "attn_output_a.weight",
        "attn.wo_a.weight",
        lambda c, r: (c.o_groups * c.o_lora_rank, c.n_head * c.head_dim // c.o_groups),
    ),
    TensorName("attn_output_b.weight", "attn.wo_b.weight", lambda c, r: (c.dim, c.o_groups * c.o_lora_rank)),
    TensorName(
        "attn_compressor_ape.weight",
        "attn.compressor.ape",
        lambda c, r: (r, _compressed_width(c, r)),
        "compressed",
    ),
    TensorName(
        "attn_compressor_kv.weight",
        "attn.compressor.wkv.weight",
        lambda c, r: (_compressed_width(c, r), c.dim),
        "compressed",
    ),
    TensorName(
        "attn_compressor_gate.weight",
        "attn.compressor.wgate.weight",
        lambda c, r: (_compressed_width(c, r), c.dim),
        "compressed",
    ),
    TensorName(
        "attn_compressor_norm.weight", "attn.compressor.norm.weight", lambda c, r: (c.head_dim,), "compressed"
    ),
    TensorName(
        "indexer.attn_q_b.weight",
        "attn.indexer.wq_b.weight",
        lambda c, r: (c.index_n_head * c.index_head_dim, c.q_lora_rank),
        "indexer",
    ),
    TensorName(
        "indexer.proj.weight",
        "attn.indexer.weights_proj.weight",
        lambda c, r: (c.index_n_head, c.dim),
        "indexer",
    ),
    TensorName(
        "indexer_compressor_ape.weight",
        "attn.indexer.compressor.ape",
        lambda c, r: (4, 2 * c.index_head_dim),
        "indexer",
    ),
    TensorName(
        "indexer_compressor_kv.weight",
        "attn.indexer.compressor.wkv.weight",
        lambda c, r: (2 * c.index_head_dim, c.dim),
        "indexer",
    ),
    TensorName(
        "indexer_compressor_gate.weight",
        "attn.indexer.compressor.wgate.weight",
        lambda c, r: (2 * c.index_head_dim, c.dim),
        "indexer",
    ),
    TensorName(
        "indexer_compressor_norm.weight",
        "attn.indexer.compressor.norm.weight",
        lambda c, r: (c.index_head_dim,),
        "indexer",
    ),
    TensorName("ffn_norm.weight", "ffn_norm.weight", lambda c, r: (c.dim,)),
    TensorName("ffn_gate_inp.weight", "ffn.gate.weight", lambda c, r: (c.n_expert, c.dim)),
    TensorName("exp_probs_b.bias", "ffn.gate.bias", lambda c, r: (c.n_expert,), "scored"),
    TensorName(
        "ffn_gate_tid2eid.weight", "ffn.gate.tid2eid", lambda c, r: (c.vocab_size, c.n_expert_used), "hash"
    ),
    TensorName(
        "ffn_gate_exps.weight", "ffn.experts.{e}.w1.weight", lambda c, r: (c.n_expert, c.expert_ff, c.dim)
    ),
    TensorName(
        "ffn_up_exps.weight", "ffn.experts.{e}.w3.weight", lambda c, r: (c.n_expert, c.expert_ff, c.dim)
    ),
    TensorName(
        "ffn_down_exps.weight", "ffn.experts.{e}.w2.weight", lambda c, r: (c.n_expert, c.dim, c.expert_ff)
    ),
    TensorName(
        "ffn_gate_shexp.weight",
        "ffn.shared_experts.w1.weight",
        lambda c, r: (c.expert_ff * c.n_shared_expert, c.dim),
    ),
    TensorName(
        "ffn_up_shexp.weight",
        "ffn.shared_experts.w3.weight",
        lambda c, r: (c.expert_ff * c.n_shared_expert, c.dim),
    ),
    TensorName(
        "ffn_down_shexp.weight",
        "ffn.shared_experts.w2.weight",
        lambda c, r: (c.dim, c.expert_ff * c.n_shared_expert),
    ),
)

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def global_shapes(dims: TensorDims) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of the global tensors, by GGUF name, in file order."""
    return {t.gguf: t.shape(dims, 0) for t in GLOBAL_TENSORS}


def layer_shapes(dims: TensorDims, layer: int) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of the tensors layer ``layer`` carries, by GGUF suffix, in file order."""
    ratio, hashed = dims.ratio(layer), dims.hash_routed(layer)
    return {t.gguf: t.shape(dims, ratio) for t in LAYER_TENSORS if layer_tensor_present(t, ratio, hashed)}


def layer_prefix(layer: int) -> str:
    return f"blk.{layer}."


def is_mtp_tensor(gguf_name: str, n_layer: int, n_mtp_layer: int) -> bool:
    """Whether a tensor belongs to a multi-token-prediction block: llama.cpp's ``blk.N.*`` for the
    ``n_mtp_layer`` blocks after the ``n_layer`` main layers, or ds4's ``mtp.0.*`` (its separate
    MTP file)."""
    if gguf_name.startswith("mtp."):
        return True
    parts = gguf_name.split(".", 2)
    return parts[0] == "blk" and parts[1].isdigit() and n_layer <= int(parts[1]) < n_layer + n_mtp_layer


def layer_tensor_present(t: TensorName, ratio: int, hash_routed: bool) -> bool:
    """Whether a layer with this compress ratio and routing carries tensor ``t``."""
    return {
        "all": True,
        "compressed": ratio > 0,
        "indexer": ratio == 4,
        "hash": hash_routed,
        "scored": not hash_routed,
    }[t.when]


def tensor_role(gguf_name: str, ndim: int) -> str:
    """How a tensor is stored: ``table`` (the int32 hash table), ``vector`` (norms, biases,
    sinks, hyper-connection scales and bases, the compressors' position biases: kept in float)
    or ``matrix`` (projections and stacked experts: any weight format)."""
    if gguf_name.endswith("tid2eid.weight"):
        return "table"
    if ndim == 1 or "_ape." in gguf_name:
        return "vector"
    return "matrix"
