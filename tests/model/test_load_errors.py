"""A bad GGUF fails at load with a message that names the problem; nothing half-loads."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from dwarfstar.gguf.names import key
from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter
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
