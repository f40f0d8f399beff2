"""The test-model factory (tests/models.py) itself: random everywhere, reproducible, well scaled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import (
    CSA,
    HCA,
    SLIDING,
    official_state_dict,
    random_hf_model,
    release_tensors,
    release_values,
    tiny_hf_config,
)
from transformers import DeepseekV4ForCausalLM

from dwarfstar.tokenizer import deepseek_tokenizer_json

CONFIG = tiny_hf_config()


@pytest.fixture(scope="module")
def model() -> DeepseekV4ForCausalLM:
    return random_hf_model(CONFIG, seed=0)


def test_default_schedule_covers_every_layer_kind() -> None:
    assert CONFIG.layer_types == [SLIDING, CSA, HCA, CSA]
    assert CONFIG.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe"]
    assert CONFIG.rope_parameters["compress"]["rope_type"] == "yarn"
    assert CONFIG.vocab_size == 129280 and CONFIG.qk_rope_head_dim == 16
    longer = tiny_hf_config(num_hidden_layers=6, head_dim=128)
    assert longer.layer_types == [SLIDING, CSA, HCA, CSA, HCA, CSA] and longer.head_dim == 128
    assert longer.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"]


def test_every_tensor_is_random(model: DeepseekV4ForCausalLM) -> None:
    state = model.state_dict()
    constant = [name for name, t in state.items() if t.numel() > 1 and bool((t == t.flatten()[0]).all())]
    assert not constant
    # the ones transformers leaves constant are there, and vary
    for part in ("sinks", "position_bias", "e_score_correction_bias", "attn_hc.base", "hc_head.hc_scale"):
        assert any(part in name for name in state), part
    assert (state["model.layers.2.ffn_hc.scale"] > 0).all()


def test_hash_table_holds_distinct_experts_per_token(model: DeepseekV4ForCausalLM) -> None:
    for layer in (0, 1):
        table = model.state_dict()[f"model.layers.{layer}.mlp.gate.tid2eid"]
        assert table.shape == (129280, 2)
        assert table.min() >= 0 and table.max() < 8
        assert (table[:, 0] != table[:, 1]).all()
        assert len(torch.unique(table[:, 0])) == 8  # every expert is used


def test_same_seed_same_model(model: DeepseekV4ForCausalLM) -> None:
    again, other = random_hf_model(CONFIG, seed=0).state_dict(), random_hf_model(CONFIG, seed=1).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[name]), name
        assert not torch.equal(tensor, other[name]), name


def test_logits_are_well_conditioned(model: DeepseekV4ForCausalLM) -> None:
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 3.0
    assert logits.abs().max().item() < 30.0


def test_saved_checkpoint_loads_back_identically(hf_checkpoint_factory, model: DeepseekV4ForCausalLM) -> None:
    path: Path = hf_checkpoint_factory("mixed", CONFIG)
    loaded = DeepseekV4ForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
    assert (path / "tokenizer.json").read_bytes() == deepseek_tokenizer_json().read_bytes()


def test_release_tensors_are_stored_as_the_release_stores_them(model: DeepseekV4ForCausalLM) -> None:
    stored = release_tensors(CONFIG, seed=0)
    assert stored["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert stored["layers.1.attn.wq_b.scale"].shape == (2, 1)  # 256 x 32 in 128 x 128 tiles
    assert stored["layers.1.ffn.experts.3.w2.weight"].dtype == torch.int8
    assert stored["layers.1.ffn.experts.3.w2.weight"].shape == (64, 16)  # two FP4 codes per byte
    assert stored["layers.1.ffn.experts.3.w2.scale"].shape == (64, 1)  # one scale per 32 columns
    assert stored["embed.weight"].dtype == torch.bfloat16
    assert stored["layers.0.hc_attn_fn"].dtype == torch.float32
    assert stored["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    # dequantized, they stay close to the float model (e4m3: 3 mantissa bits, e2m1: 1)
    values, exact = release_values(stored), official_state_dict(model)
    for name, tolerance in (("layers.1.attn.wq_b.weight", 0.07), ("layers.1.ffn.experts.3.w2.weight", 0.3)):
        error = (values[name] - exact[name]).norm() / exact[name].norm()
        assert 0 < error < tolerance, name
