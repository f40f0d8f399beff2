"""Checkpoints the converter refuses, each with a message naming the file, field or tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import release_config, release_tensors, tiny_hf_config, write_tokenizer
from safetensors.torch import save_file

from dwarfstar.convert import ConvertError, convert_checkpoint

CONFIG = tiny_hf_config(vocab_size=320)  # a small vocabulary keeps these fast


@pytest.fixture(scope="module")
def release() -> dict[str, torch.Tensor]:
    return release_tensors(CONFIG, seed=2)


@pytest.fixture
def tensors(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fresh dict for each test to change (the tensors themselves are shared: clone to modify)."""
    return dict(release)


def checkpoint(directory: Path, tensors: dict[str, torch.Tensor], **config_changes: object) -> Path:
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({**release_config(CONFIG), **config_changes}))
    write_tokenizer(directory, CONFIG.vocab_size)
    return directory


def convert(directory: Path, type: str = "f32") -> Path:
    return convert_checkpoint(directory, directory.parent / "out.gguf", type).path


def test_the_unmodified_checkpoint_converts(tmp_path: Path, tensors: dict) -> None:
    assert convert(checkpoint(tmp_path / "ok", tensors)).is_file()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="absent: no such directory"):
        convert(tmp_path / "absent")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"empty: not a checkpoint directory \(no config.json\)"):
        convert(tmp_path / "empty")


def test_other_architecture(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(
        tmp_path / "llama", tensors, model_type="llama", architectures=["LlamaForCausalLM"]
    )
    with pytest.raises(
        ConvertError, match="config.json: not a DeepSeek V4 checkpoint: model_type is 'llama'"
    ):
        convert(directory)


def test_config_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConvertError, match=r"bad/config.json: cannot read it as JSON"):
        convert(tmp_path / "bad")


def test_no_safetensors(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match=r"ckpt: no \.safetensors files"):
        convert(directory)


def test_unknown_type(tmp_path: Path, tensors: dict) -> None:
    with pytest.raises(ConvertError, match="unknown type 'q4_k'; choose one of f32, f16, bf16, q8_0"):
        convert(checkpoint(tmp_path / "ckpt", tensors), "q4_k")


def test_missing_tensor(tmp_path: Path, tensors: dict) -> None:
    del tensors["layers.1.attn.wkv.weight"]
    message = r"no tensor 'layers\.1\.attn\.wkv\.weight' \(for blk\.1\.attn_kv\.weight\)"
    with pytest.raises(ConvertError, match=message):
        convert(checkpoint(tmp_path / "ckpt", tensors))


def test_missing_expert(tmp_path: Path, tensors: dict) -> None:
    tensors = {k: v for k, v in tensors.items() if not k.startswith("layers.2.ffn.experts.0.w2")}
    with pytest.raises(
        ConvertError, match=r"no tensor 'layers\.2\.ffn\.experts\.0\.w2\.weight'.*blk\.2\.ffn_down_exps"
    ):
        convert(checkpoint(tmp_path / "ckpt", tensors))


def test_shape_that_disagrees_with_the_config(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors, q_lora_rank=48)
    message = r"'layers\.0\.attn\.wq_a\.weight' has shape \[32, 64\], but config.json implies \[48, 64\]"
    with pytest.raises(ConvertError, match=message):
        convert(directory)


def test_tensor_the_config_does_not_account_for(tmp_path: Path, tensors: dict) -> None:
    tensors["layers.4.attn_norm.weight"] = torch.ones(64)
    with pytest.raises(
        ConvertError, match=r"config.json does not account for: 'layers\.4\.attn_norm\.weight'"
    ):
        convert(checkpoint(tmp_path / "ckpt", tensors))


def test_fp8_weight_without_its_scale(tmp_path: Path, tensors: dict) -> None:
    del tensors["layers.0.attn.wq_a.scale"]
    directory = checkpoint(tmp_path / "ckpt", tensors)
    with pytest.raises(ConvertError, match=r"FP8 tensor 'layers\.0\.attn\.wq_a\.weight' has no"):
        convert(directory)
    assert not list(tmp_path.glob("out.gguf*"))  # nothing half-written is left behind


def test_hash_table_with_expert_ids_out_of_range(tmp_path: Path, tensors: dict) -> None:
    tensors["layers.0.ffn.gate.tid2eid"] = tensors["layers.0.ffn.gate.tid2eid"].clone()
    tensors["layers.0.ffn.gate.tid2eid"][5, 1] = 8
    with pytest.raises(ConvertError, match=r"layers\.0\.ffn\.gate\.tid2eid holds expert ids outside 0\.\.7"):
        convert(checkpoint(tmp_path / "ckpt", tensors))


def test_hash_layers_after_scored_layers(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors, mlp_layer_types=["moe", "hash_moe", "moe", "moe"])
    with pytest.raises(ConvertError, match="hash_moe layers must all come before the moe layers"):
        convert(directory)


def test_missing_output_directory(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors)
    with pytest.raises(ConvertError, match="nowhere: no such directory for the output file"):
        convert_checkpoint(directory, tmp_path / "nowhere" / "m.gguf", "f32")
