"""``ds4 bench`` on a small model: a well-formed CSV, a PNG that opens, sizes checked independently."""

from __future__ import annotations

import csv
import subprocess
import sys
from importlib.resources import files

import pytest
import torch
from models import tiny_hf_config
from PIL import Image
from terminal import run_with_terminal_stderr

from dwarfstar.cli.bench import COLUMNS, frontiers
from dwarfstar.model.model import Model
from dwarfstar.tokenizer import Tokenizer

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"


def ds4(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return gguf_model_factory("mixed", tiny_hf_config())


def test_frontiers_step_and_multiply():
    assert frontiers(2048, 8192, 2048) == [2048, 4096, 6144, 8192]
    assert frontiers(8, 20, 5, multiplier=1.5) == [8, 12, 18]
    assert frontiers(10, 10, 4) == [10]


def test_bench_writes_a_csv_and_a_plot(model_path, tmp_path):
    out, png = tmp_path / "speed.csv", tmp_path / "speed.png"
    result = ds4(
        "bench", "-m", str(model_path), "--ctx-start", "8", "--ctx-max", "24", "--step", "8",
        "--gen-tokens", "3", "--chunk", "5", "--csv", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the CSV went to the file; no progress bar when piped
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [int(row[0]) for row in rows[1:]] == [8, 16, 24]
    for row in rows[1:]:
        assert float(row[1]) > 0 and float(row[2]) > 0 and int(row[4]) > 0

    # kv_bytes is the state at the frontier: the generated tokens were rolled back before it grew.
    text = files("dwarfstar").joinpath("data", "paradise_lost.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_gguf(model_path)
    tokens = [tokenizer.bos_id, *tokenizer.encode(text[:2000])]
    model = Model.load(model_path)
    for row in rows[1:]:
        session = model.new_session()
        model.prefill(torch.tensor(tokens[: int(row[0])]), session)
        assert int(row[3]) == session.nbytes

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
        image.load()  # decodes the whole image


def test_csv_goes_to_stdout_by_default(model_path):
    result = ds4("bench", "-m", str(model_path), "--ctx-start", "4", "--ctx-max", "6", "--step-mul", "1.5",
                 "--gen-tokens", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ",".join(COLUMNS) and [line.split(",")[0] for line in lines[1:]] == ["4", "6"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ctx-max", "100000000"], "--ctx-max must be at most"),
        (["--ctx-start", "64", "--ctx-max", "32"], "need 1 <= --ctx-start <= --ctx-max"),
        (["--step-mul", "1.0"], "--step-mul must be more than 1"),
        (["--plot", "speed.svg"], "give a .png file name"),
        (["--text", "no-such.txt"], "no-such.txt: no such file"),
    ],
)
def test_bad_settings_are_clear_errors(model_path, tmp_path, args, message):
    result = ds4("bench", "-m", str(model_path), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_progress_shows_on_a_terminal(model_path, tmp_path):
    status, stdout, terminal = run_with_terminal_stderr(
        [sys.executable, "-c", CODE, "bench", "-m", str(model_path), "--ctx-start", "4", "--ctx-max", "4",
         "--gen-tokens", "1", "--csv", str(tmp_path / "b.csv")]
    )  # fmt: skip
    assert status == 0, terminal
    assert "bench: 100%" in terminal and "5/5" in terminal
