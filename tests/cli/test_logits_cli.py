"""``ds4 logits`` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import tiny_hf_config

from dwarfstar.model.model import Model


def ds4(*args: str, cwd=None) -> subprocess.CompletedProcess:
    code = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return gguf_model_factory("mixed", tiny_hf_config())


def test_writes_the_logits_of_every_position(model_path, tmp_path):
    ids = [0, 17, 923, 4, 129279, 55, 6, 7, 8, 9, 10]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "sub" / "logits.npy"
    result = ds4("logits", "-m", str(model_path), "--tokens", str(tmp_path / "ids.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "quant sim off" in result.stdout
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), 129280)
    model = Model.load(model_path)
    expected = model.prefill(torch.tensor(ids), model.new_session())
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)

    chunked = tmp_path / "chunked.npy"
    args = ["logits", "-m", str(model_path), "--tokens", str(tmp_path / "ids.json"), "--out", str(chunked)]
    assert ds4(*args, "--chunk", "3").returncode == 0
    np.testing.assert_allclose(np.load(chunked), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[0, 1", "not valid JSON"),
        ('{"ids": [1]}', "expected a non-empty JSON list of integer token ids"),
        ("[]", "expected a non-empty JSON list"),
        ("[0, true]", "expected a non-empty JSON list of integer token ids"),
        ("[0, 1.5]", "expected a non-empty JSON list of integer token ids"),
        ("[0, 129280]", "token ids out of range"),
    ],
)
def test_bad_token_files_are_reported(model_path, tmp_path, content, message):
    (tmp_path / "ids.json").write_text(content)
    result = ds4("logits", "-m", str(model_path), "--tokens", str(tmp_path / "ids.json"), "--out", "x.npy")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_arguments_and_files(tmp_path):
    result = ds4("logits", "--tokens", "ids.json")
    assert result.returncode == 2 and "missing --out (or use --demo)" in result.stderr
    (tmp_path / "ids.json").write_text("[1]")
    result = ds4(
        "logits", "-m", str(tmp_path / "nope.gguf"), "--tokens", str(tmp_path / "ids.json"), "--out", "o"
    )
    assert result.returncode == 2 and "nope.gguf" in result.stderr and "Traceback" not in result.stderr
    result = ds4(
        "logits", "-m", "m.gguf", "--tokens", str(tmp_path / "ids.json"), "--out", "o", "--chunk", "0"
    )
    assert result.returncode == 2 and "--chunk must be at least 1" in result.stderr
