"""``ds4 imatrix``: per-expert statistics over only the tokens routed to each expert."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from models import tiny_hf_config

from dwarfstar.cli.main import main
from dwarfstar.gguf.imatrix import read_imatrix
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.tokenizer import Tokenizer

CONFIG = tiny_hf_config()
TEXT = "DwarfStar runs DeepSeek V4 Flash. " * 40


@pytest.fixture(scope="module")
def model(gguf_model_factory: Callable[..., Path]) -> Path:
    return gguf_model_factory("mixed", CONFIG, "f32")


@pytest.fixture(scope="module")
def collected(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("imatrix")
    text = directory / "corpus.txt"
    text.write_text(TEXT)
    out = directory / "imatrix.gguf"
    assert main(["imatrix", "-m", str(model), "--text", str(text), "-o", str(out), "--ctx", "64"]) == 0
    return out, text


def chunks(bos: int) -> list[list[int]]:
    tokens = Tokenizer.default().encode(TEXT)
    return [[bos, *tokens[i : i + 63]] for i in range(0, len(tokens), 63)]


def test_counts_are_the_routed_tokens(collected: tuple[Path, Path], model: Path) -> None:
    imatrix = read_imatrix(collected[0])
    windows = chunks(Tokenizer.default().bos_id)
    n_tokens = sum(len(w) for w in windows)
    assert imatrix.chunk_count == len(windows) and imatrix.chunk_size == 64
    assert imatrix.datasets == [str(collected[1])]
    k = CONFIG.num_experts_per_tok
    tables = GGUFFile(model).tensors
    for layer in range(CONFIG.num_hidden_layers):
        for part in ("gate", "up", "down"):
            counts = imatrix.counts[f"blk.{layer}.ffn_{part}_exps.weight"]
            assert counts.shape == (CONFIG.n_routed_experts,)
            assert counts.sum() == n_tokens * k
        table = tables.get(f"blk.{layer}.ffn_gate_tid2eid.weight")
        if table is not None:  # hash-routed: the experts follow from the token ids alone
            ids = np.concatenate([np.array(w) for w in windows])
            expected = np.bincount(np.asarray(table.data)[ids].ravel(), minlength=CONFIG.n_routed_experts)
            np.testing.assert_array_equal(imatrix.counts[f"blk.{layer}.ffn_gate_exps.weight"], expected)


def test_importance_shapes_and_unrouted_experts(collected: tuple[Path, Path]) -> None:
    imatrix = read_imatrix(collected[0])
    gate = imatrix.importance("blk.2.ffn_gate_exps.weight")
    down = imatrix.importance("blk.2.ffn_down_exps.weight")
    assert gate.shape == (CONFIG.n_routed_experts, CONFIG.hidden_size)
    assert down.shape == (CONFIG.n_routed_experts, CONFIG.moe_intermediate_size)
    np.testing.assert_array_equal(gate, imatrix.importance("blk.2.ffn_up_exps.weight"))  # same input
    routed = imatrix.counts["blk.2.ffn_gate_exps.weight"] > 0
    assert np.isfinite(gate).all() and (gate[routed] > 0).all()
    np.testing.assert_array_equal(gate[~routed], 1.0)


def test_in_file_accumulates(collected: tuple[Path, Path], model: Path, tmp_path: Path) -> None:
    first, text = collected
    out = tmp_path / "more.gguf"
    args = ["imatrix", "-m", str(model), "--text", str(text), "-o", str(out), "--ctx", "64", "--chunks", "1"]
    assert main([*args, "--in-file", str(first)]) == 0
    before, after = read_imatrix(first), read_imatrix(out)
    name = "blk.3.ffn_down_exps.weight"
    assert after.counts[name].sum() == before.counts[name].sum() + 64 * CONFIG.num_experts_per_tok
    assert after.chunk_count == before.chunk_count + 1


def test_errors(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["imatrix", "-m", str(model), "--text", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x")])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
