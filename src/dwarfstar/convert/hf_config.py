"""A checkpoint's ``config.json`` -> ModelConfig.

Two spellings exist: transformers' (``layer_types`` + ``compress_rates``, ``mlp_layer_types``,
``rope_parameters`` with ``main`` and ``compress`` entries) and the one DeepSeek's release ships
(``compress_ratios`` with one entry per layer plus the MTP block, ``num_hash_layers``,
``qk_rope_head_dim``, ``rope_scaling``). Both are read. Absent fields take Flash's values,
except rope scaling: a config without ``rope_scaling`` (or a ``rope_parameters`` of type
``default``) means plain rope, no YaRN (factor 1, original context 0), as transformers reads it.
A config with Flash's dimensions must carry Flash's settings, since the loader demands them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dwarfstar.model.config import ConfigError, ModelConfig

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
FP8_BLOCK = (128, 128)


class CheckpointConfigError(ValueError):
    """config.json does not describe a DeepSeek V4 model we can convert."""


@dataclass(frozen=True)
class CheckpointConfig:
    """What the converter needs from config.json."""

    model: ModelConfig
    context_length: int
    fp8_block: tuple[int, int]  # rows, cols of one FP8 scale block


def read_checkpoint_config(path: Path) -> CheckpointConfig:
    """Parse ``path`` (a config.json); errors name the file and the field."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointConfigError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointConfigError(f"{path}: expected a JSON object")
    try:
        config = checkpoint_config(raw)
    except (CheckpointConfigError, ConfigError) as err:
        raise CheckpointConfigError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointConfigError(f"{path}: malformed field ({err!r})") from None
    if config.model.is_flash:  # the loader refuses a Flash-shaped file without Flash's constants
        try:
            config.model.validate_flash()
        except ConfigError as err:
            raise CheckpointConfigError(
                f"{path}: has DeepSeek V4 Flash's dimensions but not its settings ({err})"
            ) from None
    return config


def checkpoint_config(raw: dict) -> CheckpointConfig:
    """The config of a parsed config.json."""
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "deepseek_v4" and "DeepseekV4ForCausalLM" not in architectures:
        found = raw.get("model_type") or ", ".join(architectures) or "nothing"
        raise CheckpointConfigError(
            f"not a DeepSeek V4 checkpoint: model_type is {found!r}, expected 'deepseek_v4'"
        )
    scoring = raw.get("scoring_func", "sqrtsoftplus")
    if scoring != "sqrtsoftplus":
        raise CheckpointConfigError(f"scoring_func is {scoring!r}; DeepSeek V4 routes with 'sqrtsoftplus'")

    flash = ModelConfig()
    n_layer = int(raw.get("num_hidden_layers", flash.n_layer))
    head_dim = int(raw.get("head_dim", flash.head_dim))
    main_rope, compress_rope = _rope_parameters(raw)
    factor, original_context, beta_fast, beta_slow = _yarn(compress_rope)
    model = ModelConfig(
        n_layer=n_layer,
        dim=int(raw.get("hidden_size", flash.dim)),
        vocab_size=int(raw.get("vocab_size", flash.vocab_size)),
        n_head=int(raw.get("num_attention_heads", flash.n_head)),
        n_head_kv=int(raw.get("num_key_value_heads", flash.n_head_kv)),
        head_dim=head_dim,
        value_dim=head_dim,
        rope_dim=_rope_dim(raw, main_rope, head_dim),
        q_lora_rank=int(raw.get("q_lora_rank", flash.q_lora_rank)),
        o_lora_rank=int(raw.get("o_lora_rank", flash.o_lora_rank)),
        o_groups=int(raw.get("o_groups", flash.o_groups)),
        n_expert=int(raw.get("n_routed_experts", flash.n_expert)),
        n_expert_used=int(raw.get("num_experts_per_tok", flash.n_expert_used)),
        expert_ff=int(raw.get("moe_intermediate_size", flash.expert_ff)),
        n_shared_expert=int(raw.get("n_shared_experts", flash.n_shared_expert)),
        n_hash_layer=_hash_layer_count(raw, n_layer),
        window=int(raw.get("sliding_window", flash.window)),
        index_n_head=int(raw.get("index_n_heads", flash.index_n_head)),
        index_head_dim=int(raw.get("index_head_dim", flash.index_head_dim)),
        index_topk=int(raw.get("index_topk", flash.index_topk)),
        hc_mult=int(raw.get("hc_mult", flash.hc_mult)),
        hc_sinkhorn_iters=int(raw.get("hc_sinkhorn_iters", flash.hc_sinkhorn_iters)),
        hc_eps=float(raw.get("hc_eps", flash.hc_eps)),
        rope_original_context=original_context,
        rope_base=float(main_rope.get("rope_theta", raw.get("rope_theta", flash.rope_base))),
        rope_factor=factor,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        compress_rope_base=float(
            compress_rope.get("rope_theta", raw.get("compress_rope_theta", flash.compress_rope_base))
        ),
        routed_scale=float(raw.get("routed_scaling_factor", flash.routed_scale)),
        norm_topk=bool(raw.get("norm_topk_prob", flash.norm_topk)),
        rms_eps=float(raw.get("rms_norm_eps", flash.rms_eps)),
        compress_ratios=_compress_ratios(raw, n_layer),
        swiglu_limit=(float(raw.get("swiglu_limit", 10.0)),) * n_layer,
    )
    block = (raw.get("quantization_config") or {}).get("weight_block_size", FP8_BLOCK)
    return CheckpointConfig(
        model=model,
        context_length=int(raw.get("max_position_embeddings", 1048576)),
        fp8_block=(int(block[0]), int(block[1])),
    )


def _rope_parameters(raw: dict) -> tuple[dict, dict]:
    """(main, compress) rope settings; the release's top-level ``rope_scaling`` is the compress one."""
    params = raw.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        return params["main"], params["compress"]
    return {}, raw.get("rope_scaling") or params


def _yarn(compress: dict) -> tuple[float, int, float, float]:
    """factor, original context, beta_fast, beta_slow of the compressed layers' YaRN (factor 1: none)."""
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind == "default":
        return 1.0, 0, 32.0, 1.0
    if kind != "yarn":
        raise CheckpointConfigError(f"rope type {kind!r} is not supported (DeepSeek V4 uses 'yarn')")
    return (
        float(compress["factor"]),
        int(compress["original_max_position_embeddings"]),
        float(compress.get("beta_fast", 32.0)),
        float(compress.get("beta_slow", 1.0)),
    )


def _rope_dim(raw: dict, main_rope: dict, head_dim: int) -> int:
    if "qk_rope_head_dim" in raw:
        return int(raw["qk_rope_head_dim"])
    factor = main_rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    return round(head_dim * factor) if factor is not None else ModelConfig().rope_dim


def _compress_ratios(raw: dict, n_layer: int) -> tuple[int, ...]:
    """One ratio per layer (0: sliding window only); the release's list also covers the MTP block."""
    if raw.get("layer_types") is not None:
        rates = {**DEFAULT_COMPRESS_RATES, **(raw.get("compress_rates") or {})}
        ratios = []
        for i, layer_type in enumerate(raw["layer_types"][:n_layer]):
            if layer_type not in LAYER_TYPES:
                raise CheckpointConfigError(
                    f"layer_types[{i}] is {layer_type!r}, not a DeepSeek V4 layer type"
                )
            ratios.append(0 if layer_type == "sliding_attention" else int(rates[layer_type]))
    elif raw.get("compress_ratios") is not None:
        ratios = [int(r) for r in raw["compress_ratios"][:n_layer]]
    else:
        return ModelConfig().compress_ratios[:n_layer]
    if len(ratios) < n_layer:
        raise CheckpointConfigError(f"{len(ratios)} layer types given for {n_layer} layers")
    return tuple(ratios)


def _hash_layer_count(raw: dict, n_layer: int) -> int:
    """Hash-routed layers must be the first ones (the GGUF stores only their count)."""
    types = raw.get("mlp_layer_types")
    if types is None:
        return int(raw.get("num_hash_layers", ModelConfig().n_hash_layer))
    count = next((i for i, t in enumerate(types[:n_layer]) if t != "hash_moe"), min(len(types), n_layer))
    if "hash_moe" in types[count:n_layer]:
        raise CheckpointConfigError("mlp_layer_types: hash_moe layers must all come before the moe layers")
    return count
