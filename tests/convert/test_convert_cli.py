"""``ds4 convert`` as a user runs it: what it writes, what it prints, how it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from models import make_release_checkpoint, tiny_hf_config

from dwarfstar.cli.main import main
from dwarfstar.gguf.reader import GGUFFile

CONFIG = tiny_hf_config(vocab_size=320)


def test_converts_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_release_checkpoint(tmp_path / "DeepSeek-V4-Tiny", CONFIG, seed=1)
    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(checkpoint), str(out), "--type", "q8_0"]) == 0
    err = capsys.readouterr().err
    assert "note: skipped 3 multi-token-prediction tensors (mtp.*)" in err
    assert f"wrote {out} (" in err
    f = GGUFFile(out)
    assert f.metadata["general.name"] == "DeepSeek-V4-Tiny"
    assert f.tensors["blk.0.attn_q_a.weight"].kind.name == "Q8_0"
    assert not list(tmp_path.glob("*.part"))


def test_name_and_default_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = make_release_checkpoint(tmp_path / "ckpt", CONFIG, seed=1)
    assert main(["convert", str(checkpoint), str(tmp_path / "m.gguf"), "--name", "Tiny V4"]) == 0
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.metadata["general.name"] == "Tiny V4"
    assert f.tensors["blk.0.attn_q_a.weight"].kind.name == "BF16"
    assert f.tensors["blk.0.attn_norm.weight"].kind.name == "F32"


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == f"ds4 convert: error: {tmp_path / 'nope'}: no such directory\n"


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == f"ds4 convert: error: {tmp_path}: not a checkpoint directory (no config.json)\n"
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path), str(tmp_path / "m.gguf"), "--type", "q4_k"])
    assert exit_info.value.code == 2
    assert "argument --type: invalid choice: 'q4_k'" in capsys.readouterr().err
