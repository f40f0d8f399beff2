"""The GGUF contract of DeepSeek V4 Flash: metadata keys and tensor names, in one table.

The converter, the synthetic-model writer and the model binding all read these tables, so a
name is spelled exactly once. Names follow antirez's ds4 and llama.cpp's
``deepseek4`` architecture (they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

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
SWIGLU_CLAMP_KEY = "swiglu_clamp_exp"  # one float per layer

# Global tensors: GGUF name -> official checkpoint name.
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head.weight",
    "output_hc_fn.weight": "hc_head_fn",
    "output_hc_base.weight": "hc_head_base",
    "output_hc_scale.weight": "hc_head_scale",
}


@dataclass(frozen=True)
class LayerTensor:
    """One per-layer tensor: its GGUF suffix, its official name, and when it exists.

    ``when`` is one of: ``all``, ``compressed`` (ratio 4 or 128), ``indexer`` (ratio 4),
    ``hash`` (hash-routed layers), ``scored`` (layers routed by score, with selection bias).
    """

    gguf: str
    official: str
    when: str = "all"


LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor("hc_attn_fn.weight", "hc_attn_fn"),
    LayerTensor("hc_attn_base.weight", "hc_attn_base"),
    LayerTensor("hc_attn_scale.weight", "hc_attn_scale"),
    LayerTensor("hc_ffn_fn.weight", "hc_ffn_fn"),
    LayerTensor("hc_ffn_base.weight", "hc_ffn_base"),
    LayerTensor("hc_ffn_scale.weight", "hc_ffn_scale"),
    LayerTensor("attn_norm.weight", "attn_norm.weight"),
    LayerTensor("attn_q_a.weight", "attn.wq_a.weight"),
    LayerTensor("attn_q_a_norm.weight", "attn.q_norm.weight"),
    LayerTensor("attn_q_b.weight", "attn.wq_b.weight"),
    LayerTensor("attn_kv.weight", "attn.wkv.weight"),
    LayerTensor("attn_kv_a_norm.weight", "attn.kv_norm.weight"),
    LayerTensor("attn_sinks.weight", "attn.attn_sink"),
    LayerTensor("attn_output_a.weight", "attn.wo_a.weight"),
    LayerTensor("attn_output_b.weight", "attn.wo_b.weight"),
    LayerTensor("attn_compressor_ape.weight", "attn.compressor.ape", "compressed"),
    LayerTensor("attn_compressor_kv.weight", "attn.compressor.wkv.weight", "compressed"),
    LayerTensor("attn_compressor_gate.weight", "attn.compressor.wgate.weight", "compressed"),
    LayerTensor("attn_compressor_norm.weight", "attn.compressor.norm.weight", "compressed"),
    LayerTensor("indexer.attn_q_b.weight", "attn.indexer.wq_b.weight", "indexer"),
    LayerTensor("indexer.proj.weight", "attn.indexer.weights_proj.weight", "indexer"),
    LayerTensor("indexer_compressor_ape.weight", "attn.indexer.compressor.ape", "indexer"),
    LayerTensor("indexer_compressor_kv.weight", "attn.indexer.compressor.wkv.weight", "indexer"),
    LayerTensor("indexer_compressor_gate.weight", "attn.indexer.compressor.wgate.weight", "indexer"),
    LayerTensor("indexer_compressor_norm.weight", "attn.indexer.compressor.norm.weight", "indexer"),
    LayerTensor("ffn_norm.weight", "ffn_norm.weight"),
    LayerTensor("ffn_gate_inp.weight", "ffn.gate.weight"),
    LayerTensor("exp_probs_b.bias", "ffn.gate.bias", "scored"),
    LayerTensor("ffn_gate_tid2eid.weight", "ffn.gate.tid2eid", "hash"),
    LayerTensor("ffn_gate_exps.weight", "ffn.experts.{e}.w1.weight"),
    LayerTensor("ffn_up_exps.weight", "ffn.experts.{e}.w3.weight"),
    LayerTensor("ffn_down_exps.weight", "ffn.experts.{e}.w2.weight"),
    LayerTensor("ffn_gate_shexp.weight", "ffn.shared_experts.w1.weight"),
    LayerTensor("ffn_up_shexp.weight", "ffn.shared_experts.w3.weight"),
    LayerTensor("ffn_down_shexp.weight", "ffn.shared_experts.w2.weight"),
)

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def layer_prefix(layer: int) -> str:
    return f"blk.{layer}."


def layer_tensor_present(t: LayerTensor, ratio: int, hash_routed: bool) -> bool:
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
