"""Checkpoints the converter refuses, each with a message naming the file, field or tensor."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from models import release_config, release_tensors, tiny_hf_config, write_tokenizer
from safetensors.torch import save_file

from dwarfstar.convert import ConvertError, convert_checkpoint
from dwarfstar.convert import checkpoint as checkpoint_module
from dwarfstar.convert.checkpoint import Checkpoint, CheckpointError
from dwarfstar.gguf.writer import GGUFFileWriter

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


def test_output_that_is_a_directory(tmp_path: Path, tensors: dict) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors)
    (tmp_path / "out.gguf").mkdir()
    with pytest.raises(ConvertError, match=r"out\.gguf: is a directory; give a file name for the output"):
        convert(directory)
    assert not (tmp_path / "out.gguf.part").exists()


def test_a_full_disk(tmp_path: Path, tensors: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = checkpoint(tmp_path / "ckpt", tensors)
    write_tensor = GGUFFileWriter.write_tensor
    written: list[str] = []

    def write_until_full(self: GGUFFileWriter, name: str, parts: object) -> None:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        write_tensor(self, name, parts)

    monkeypatch.setattr(GGUFFileWriter, "write_tensor", write_until_full)
    with pytest.raises(ConvertError, match=r"out\.gguf\.part: No space left on device"):
        convert(directory)
    assert len(written) == 3  # the file was partly written
    assert not list(tmp_path.glob("out.gguf*"))


def write_raw_safetensors(path: Path, name: str, dtype: str, shape: list[int], nbytes: int) -> None:
    """A one-tensor safetensors file, written by hand to hold a dtype torch cannot make."""
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))


def test_a_tensor_safetensors_cannot_read(tmp_path: Path, tensors: dict) -> None:
    del tensors["layers.0.attn_norm.weight"]
    directory = checkpoint(tmp_path / "ckpt", tensors)
    # 64 six-bit floats: a valid safetensors entry that neither safetensors nor torch can load
    write_raw_safetensors(directory / "extra.safetensors", "layers.0.attn_norm.weight", "F6_E2M3", [64], 48)
    message = r"extra\.safetensors: cannot read tensor 'layers\.0\.attn_norm\.weight' \(.*F6_E2M3"
    with pytest.raises(ConvertError, match=message):
        convert(directory)
    assert not list(tmp_path.glob("out.gguf*"))


def test_a_refused_checkpoint_closes_the_files_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[Path] = []
    safe_open = checkpoint_module.safe_open

    class Tracked:
        def __init__(self, path: Path, framework: str) -> None:
            self.path, self.handle = path, safe_open(path, framework=framework)

        def __enter__(self) -> object:
            return self.handle.__enter__()

        def __exit__(self, *exc: object) -> None:
            closed.append(self.path)
            self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoint_module, "safe_open", Tracked)
    save_file({"embed.weight": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"model.embed_tokens.weight": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' and 'embed.weight' are both"):
        Checkpoint(tmp_path)
    assert sorted(closed) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
