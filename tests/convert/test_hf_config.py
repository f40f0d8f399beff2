"""config.json -> ModelConfig, in the release's spelling and in transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import CSA, FLASH_YARN, HCA, SLIDING
from transformers import DeepseekV4Config

from dwarfstar.convert import ConvertError, convert_checkpoint
from dwarfstar.convert.hf_config import CheckpointConfigError, checkpoint_config, read_checkpoint_config
from dwarfstar.model.config import ModelConfig

# DeepSeek-V4-Flash's published config.json (the fields the model needs).
FLASH_RELEASE = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "head_dim": 512,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "sliding_window": 128,
    "compress_rope_theta": 160000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "o_lora_rank": 1024,
    "o_groups": 8,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "num_hash_layers": 3,
    "hc_mult": 4,
    "hc_eps": 1e-6,
    "hc_sinkhorn_iters": 20,
    "swiglu_limit": 10.0,
    "routed_scaling_factor": 1.5,
    "norm_topk_prob": True,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def test_flash_release_config_is_flash() -> None:
    config = checkpoint_config(FLASH_RELEASE)
    assert config.model == ModelConfig()
    config.model.validate_flash()
    assert config.context_length == 1048576 and config.fp8_block == (128, 128)


def test_flash_in_transformers_spelling_is_flash() -> None:
    layer_types = [SLIDING, SLIDING] + [CSA, HCA] * 20 + [CSA]
    transformers = DeepseekV4Config(
        layer_types=layer_types,
        rope_parameters=dict(FLASH_YARN),
    )
    assert checkpoint_config(transformers.to_dict()).model == ModelConfig()


def test_no_yarn_means_factor_one() -> None:
    raw = {**FLASH_RELEASE, "rope_scaling": None}
    assert checkpoint_config(raw).model.rope_factor == 1.0


def test_rope_dim_from_the_partial_rotary_factor() -> None:
    raw = {k: v for k, v in FLASH_RELEASE.items() if k != "qk_rope_head_dim"}
    assert checkpoint_config({**raw, "partial_rotary_factor": 0.25}).model.rope_dim == 128


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scoring_func": "softmax"}, "scoring_func is 'softmax'"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope type 'linear' is not supported"),
        ({"compress_ratios": [0, 0, 4]}, "3 layer types given for 43 layers"),
        ({"layer_types": ["full_attention"] * 43}, r"layer_types\[0\] is 'full_attention'"),
        ({"num_attention_heads": 60}, "head count 60 is not a multiple of 8 groups"),
    ],
)
def test_configs_we_cannot_convert(change: dict, message: str) -> None:
    with pytest.raises((CheckpointConfigError, ValueError), match=message):
        checkpoint_config({**FLASH_RELEASE, **change})


def test_a_flash_shaped_config_file_must_carry_flash_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(FLASH_RELEASE))
    assert read_checkpoint_config(path).model == ModelConfig()
    path.write_text(json.dumps({**FLASH_RELEASE, "rope_scaling": None}))  # plain rope: not Flash's
    message = (
        r"config\.json: has DeepSeek V4 Flash's dimensions but not its settings "
        r"\(deepseek4\.rope\.scaling\.\S+ is \S+; DeepSeek V4 Flash has \S+\)"
    )
    with pytest.raises(CheckpointConfigError, match=message):
        read_checkpoint_config(path)
    # the converter refuses it before it reads any tensor (there are none here)
    with pytest.raises(ConvertError, match=message):
        convert_checkpoint(tmp_path, tmp_path / "flash.gguf", "q8_0")
    assert not list(tmp_path.glob("flash.gguf*"))


def test_the_same_change_is_fine_for_another_shape(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FLASH_RELEASE, "num_hidden_layers": 42, "rope_scaling": None}))
    assert read_checkpoint_config(path).model.rope_factor == 1.0
