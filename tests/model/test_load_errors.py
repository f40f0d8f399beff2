"""A bad GGUF, bad metadata or bad input fails with a message that names the problem."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.gguf.names import key
from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter
from dwarfstar.model import model as model_module
from dwarfstar.model.config import ConfigError, ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.model.weights import WeightsError
from dwarfstar.synthetic.models import random_values, tensor_specs, uniform_policy, write_random_model

SMALL = ModelConfig(
    n_layer=3,
    dim=64,
    n_head=2,
    head_dim=64,
    value_dim=64,
    rope_dim=32,
    q_lora_rank=32,
    o_lora_rank=32,
    o_groups=2,
    n_expert=4,
    n_expert_used=2,
    expert_ff=32,
    n_hash_layer=1,
    index_n_head=4,
    index_head_dim=32,
    index_topk=2,
    compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("load") / "good.gguf"
    write_random_model(path, SMALL, uniform_policy(T.Q8_0))
    return path, GGUFFile(path).metadata


def rewrite(path, metadata, specs, config=SMALL):
    """A file with the good file's metadata and the given (possibly altered) tensor specs."""
    rng = np.random.default_rng(0)
    with GGUFFileWriter(path, metadata, specs) as writer:
        for spec in specs:
            writer.write_tensor(spec.name, random_values(spec, config, rng))
    return path


def test_good_file_loads_and_runs(good):
    model = Model.load(good[0])
    logits = model.prefill([0, 1, 2], model.new_session())
    assert logits.shape == (3, SMALL.vocab_size) and bool(logits.isfinite().all())


def test_missing_tensor_is_named(good, tmp_path):
    specs = [s for s in tensor_specs(SMALL, uniform_policy(T.Q8_0)) if s.name != "blk.1.attn_q_a.weight"]
    path = rewrite(tmp_path / "missing.gguf", good[1], specs)
    with pytest.raises(WeightsError, match=r"missing tensor 'blk\.1\.attn_q_a\.weight'"):
        Model.load(path)


def test_wrong_shape_is_named_with_both_shapes(good, tmp_path):
    specs = tensor_specs(SMALL, uniform_policy(T.Q8_0))
    specs = [dataclasses.replace(s, shape=(32, 96)) if s.name == "blk.2.attn_kv.weight" else s for s in specs]
    path = rewrite(tmp_path / "shape.gguf", good[1], specs)
    with pytest.raises(
        WeightsError, match=r"'blk\.2\.attn_kv\.weight' has shape \[96, 32\].*expected \[64, 64\]"
    ):
        Model.load(path)


def test_wrong_type_is_named(good, tmp_path):
    specs = tensor_specs(SMALL, uniform_policy(T.Q8_0))
    specs = [dataclasses.replace(s, kind=T.Q8_0) if s.name == "blk.0.attn_norm.weight" else s for s in specs]
    path = rewrite(tmp_path / "type.gguf", good[1], specs)
    with pytest.raises(WeightsError, match=r"'blk\.0\.attn_norm\.weight' has type Q8_0"):
        Model.load(path)


def test_unknown_tensor_is_named(good, tmp_path):
    specs = tensor_specs(SMALL, uniform_policy(T.Q8_0))
    extra = dataclasses.replace(specs[-1], name="blk.1.attn_mystery.weight")
    path = rewrite(tmp_path / "unknown.gguf", good[1], [*specs, extra])
    with pytest.raises(
        WeightsError, match=r"1 tensor\(s\) that are no part of .*'blk\.1\.attn_mystery\.weight'"
    ):
        Model.load(path)


def test_wrong_architecture_is_named(good, tmp_path):
    metadata = {**good[1], "general.architecture": "llama"}
    path = rewrite(tmp_path / "arch.gguf", metadata, tensor_specs(SMALL, uniform_policy(T.Q8_0)))
    with pytest.raises(
        ConfigError, match=r"arch\.gguf: general\.architecture is 'llama', expected 'deepseek4'"
    ):
        Model.load(path)


def test_missing_metadata_key_is_named(good, tmp_path):
    metadata = {k: v for k, v in good[1].items() if k != key("attention.indexer.top_k")}
    path = rewrite(tmp_path / "key.gguf", metadata, tensor_specs(SMALL, uniform_policy(T.Q8_0)))
    with pytest.raises(ConfigError, match=r"missing metadata keys: deepseek4\.attention\.indexer\.top_k"):
        Model.load(path)


def test_truncated_file_names_the_tensor(good, tmp_path):
    data = good[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"truncated|extends past"):
        Model.load(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError):
        Model.load(path)


def test_a_file_claiming_flash_must_carry_flash_constants():
    metadata = {"general.architecture": "deepseek4", **ModelConfig().to_metadata()}
    assert ModelConfig.from_metadata(metadata).is_flash
    for short, bad in (("expert_count", 128), ("rope.freq_base", 50000.0), ("attention.indexer.top_k", 256)):
        with pytest.raises(ConfigError, match=key(short).replace(".", r"\.")):
            ModelConfig.from_metadata({**metadata, key(short): bad})
    ratios = list(metadata[key("attention.compress_ratios")])
    ratios[5] = 4
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_metadata({**metadata, key("attention.compress_ratios"): ratios})


def test_flash_shapes_are_validated():
    """Every Flash tensor shape is checked at bind (GGUF ne order, as ds4 lists them)."""
    from dwarfstar.gguf.names import global_shapes, layer_shapes

    flash = ModelConfig()
    assert global_shapes(flash)["output.weight"][::-1] == (4096, 129280)
    layer2 = {k: v[::-1] for k, v in layer_shapes(flash, 2).items()}
    assert layer2["attn_q_b.weight"] == (1024, 32768)
    assert layer2["attn_output_a.weight"] == (4096, 8192)
    assert layer2["attn_compressor_ape.weight"] == (1024, 4)
    assert layer2["indexer.attn_q_b.weight"] == (1024, 8192)
    assert layer2["ffn_gate_exps.weight"] == (4096, 2048, 256)
    assert layer2["ffn_down_exps.weight"] == (2048, 4096, 256)
    assert layer2["ffn_gate_tid2eid.weight"] == (6, 129280)
    assert {k: v[::-1] for k, v in layer_shapes(flash, 3).items()}["attn_compressor_ape.weight"] == (
        512,
        128,
    )


def test_cli_reports_a_bad_file_without_traceback(good, tmp_path):
    specs = [s for s in tensor_specs(SMALL, uniform_policy(T.Q8_0)) if s.name != "output.weight"]
    path = rewrite(tmp_path / "nohead.gguf", good[1], specs)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([0, 1]))
    cmd = [sys.executable, "-m", "dwarfstar.cli.main", "logits", "-m", str(path), "--tokens", str(ids)]
    result = subprocess.run([*cmd, "--out", str(tmp_path / "o.npy")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing tensor 'output.weight'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.npy").exists()


def test_hash_table_with_expert_ids_out_of_range_is_named(good, tmp_path):
    from dwarfstar.gguf.reader import GGUFFile as File
    from dwarfstar.model.weights import _Binder

    tensors = dict(File(good[0]).tensors)
    info = tensors["blk.0.ffn_gate_tid2eid.weight"]
    broken = np.array(info.data)
    broken[3, 1] = SMALL.n_expert
    tensors["blk.0.ffn_gate_tid2eid.weight"] = dataclasses.replace(info, data=broken)
    with pytest.raises(
        WeightsError, match=r"'blk\.0\.ffn_gate_tid2eid\.weight' holds expert ids outside \[0, 4\)"
    ):
        _Binder(tensors, "x.gguf", SMALL.n_expert).dense(
            "blk.0.ffn_gate_tid2eid.weight", (SMALL.vocab_size, SMALL.n_expert_used)
        )


@pytest.mark.parametrize(
    ("short", "value", "message"),
    [
        ("attention.compress_ratios", 4, "must be an array"),
        ("attention.compress_ratios", [0, 8, 128], r"unsupported ratios \[8\]"),
        ("swiglu_clamp_exp", ["a", "b", "c"], "not a valid float"),
        ("block_count", "three", "not a valid int"),
    ],
)
def test_malformed_metadata_is_named(good, short, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_metadata({**good[1], key(short): value})


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([0, -1], r"token ids out of range \[0, 129280\): \[-1\]"),
        ([999999, 5], r"token ids out of range \[0, 129280\): \[999999\]"),
        ([], "no tokens to process"),
        (torch.zeros(0, dtype=torch.long), "no tokens to process"),
        (torch.tensor([1.0, 2.0]), "token ids must be integers, got a tensor of torch.float32"),
        (torch.tensor([True]), "token ids must be integers, got a tensor of torch.bool"),
    ],
)
def test_forward_refuses_bad_token_ids(good, tokens, message):
    model = Model.load(good[0])
    session = model.new_session()
    with pytest.raises(ValueError, match=message):
        model.forward(tokens, session)
    assert session.n_tokens == 0  # nothing was processed


def test_prefill_refuses_to_gather_unbounded_logits(good, monkeypatch):
    model = Model.load(good[0])
    monkeypatch.setattr(model_module, "MAX_PREFILL_LOGITS", 3 * SMALL.vocab_size)
    assert model.prefill([0, 1, 2], model.new_session()).shape == (3, SMALL.vocab_size)
    with pytest.raises(ValueError, match=r"4 x 129280 values exceed 387840; iterate prefill_chunks"):
        model.prefill([0, 1, 2, 3], model.new_session())


FLASH = {"general.architecture": "deepseek4", **SMALL.to_metadata()}


@pytest.mark.parametrize(
    ("short", "value", "message"),
    [
        ("rope.dimension_count", 80, r"dimension_count is 80; it must be even .* to 32, the narrower of"),
        ("rope.dimension_count", 31, "rope.dimension_count is 31; it must be even"),
        ("attention.sliding_window", 0, "attention.sliding_window is 0; it must be at least 1"),
        ("attention.indexer.top_k", 0, "attention.indexer.top_k is 0; it must be at least 1"),
        ("hyper_connection.sinkhorn_iterations", 0, "sinkhorn_iterations is 0; it must be at least 1"),
        ("attention.layer_norm_rms_epsilon", 0.0, "rms_epsilon is 0.0; it must be a finite number above 0"),
        ("hyper_connection.epsilon", float("nan"), "epsilon is nan; it must be a finite number above 0"),
        ("rope.freq_base", -1.0, "freq_base is -1.0; it must be a finite number above 0"),
        ("expert_used_count", 5, r"expert_used_count is 5; it must be at most deepseek4\.expert_count \(4\)"),
        ("hash_layer_count", 4, r"hash_layer_count is 4; it must be between 0 and deepseek4\.block_count"),
        ("attention.indexer.key_length", 48, "key_length is 48; it must be a power of two"),
        ("block_count", True, "block_count = True is not a valid int"),
        ("embedding_length", "64", "embedding_length = '64' is not a valid int"),
        ("expert_weights_norm", 1, "expert_weights_norm = 1 is not a valid bool"),
        ("swiglu_clamp_exp", [10.0, 0.0, 10.0], "swiglu_clamp_exp holds 0.0; every entry must be"),
    ],
)
def test_metadata_out_of_range_is_refused_with_its_key(short, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_metadata({**FLASH, key(short): value})


# Independent statement of the ranges the forward pass needs, by metadata key.
def _acceptable(short: str, value: object, config: ModelConfig) -> bool:
    floats = {
        "hyper_connection.epsilon",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
        "rope.scaling.factor",
        "rope.scaling.yarn_beta_fast",
        "rope.scaling.yarn_beta_slow",
        "attention.compress_rope_freq_base",
        "expert_weights_scale",
    }
    if short in floats:
        return math.isfinite(value) and value > 0
    if short == "rope.dimension_count":
        return value % 2 == 0 and 2 <= value <= min(config.head_dim, config.index_head_dim)
    if short == "rope.scaling.original_context_length":
        return value >= 0
    if short == "hash_layer_count":
        return 0 <= value <= config.n_layer
    if short == "expert_used_count":
        return 1 <= value <= config.n_expert
    if short == "attention.indexer.key_length":
        return value >= 1 and int(value) & (int(value) - 1) == 0 and value >= config.rope_dim
    return value >= 1


# Keys with checks of their own (one shared K=V head, heads split into groups), left out here.
STRUCTURAL = {
    "attention.head_count_kv",
    "attention.value_length",
    "attention.key_length",
    "attention.head_count",
    "attention.output_group_count",
    "block_count",
}
NUMERIC_KEYS = [
    full.removeprefix(key(""))
    for full, value in SMALL.to_metadata().items()
    if type(value) in (int, float) and full.removeprefix(key("")) not in STRUCTURAL
]


@settings(max_examples=300, deadline=None)
@given(
    short=st.sampled_from(NUMERIC_KEYS),
    value=st.one_of(
        st.integers(-3, 300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, 1, 2, 16, 64, 2**40]),
    ),
)
def test_any_metadata_value_loads_only_within_range(short, value):
    """Every value either loads (and is then in range) or is refused with a message naming its key."""
    metadata = {**FLASH, key(short): value}
    try:
        config = ModelConfig.from_metadata(metadata)
    except ConfigError as err:
        assert key(short) in str(err)
        return
    assert _acceptable(short, value, config), f"{key(short)} = {value!r} loaded"
