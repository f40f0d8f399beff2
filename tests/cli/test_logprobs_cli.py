"""``ds4 logprobs`` and ``ds4 perplexity`` as a user runs them, checked against plain forward passes."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from models import tiny_hf_config

from dwarfstar.cli.main import main
from dwarfstar.model.model import Model
from dwarfstar.tokenizer import Tokenizer

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"
TEXT = (
    "Of Man's first disobedience, and the fruit\n"
    "Of that forbidden tree whose mortal taste\n"
    "Brought death into the World, and all our woe,\n"
    "With loss of Eden, till one greater Man\n"
    "Restore us, and regain the blissful seat, 42 + 17 = 59.\n"
)


def ds4(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return gguf_model_factory("mixed", tiny_hf_config())


@pytest.fixture(scope="module")
def model(model_path):
    return Model.load(model_path)


def last_logits(model: Model, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ``ids``, from one fresh pass over all of them."""
    return model.prefill(torch.tensor(ids), model.new_session())[-1]


def test_logprobs_follow_a_plain_greedy_loop(model_path, model, tmp_path):
    ids = [0, 17, 923, 4, 55, 6, 7]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "steps.json"
    result = ds4(
        "logprobs", "-m", str(model_path), "--tokens", str(tmp_path / "ids.json"), "-n", "4", "--top-k", "5",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["prompt_tokens"], report["top_k"], report["ctx"]) == (len(ids), 5, 32768)
    tokenizer = Tokenizer.from_gguf(model_path)
    sequence = list(ids)
    assert len(report["steps"]) == 4
    for index, step in enumerate(report["steps"]):
        logits = last_logits(model, sequence)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = int(logits.argmax())
        assert step["step"] == index and step["selected"]["id"] == chosen
        expected_top = logprobs.topk(5).indices.tolist()
        assert [t["token"]["id"] for t in step["top_logprobs"]] == expected_top
        for entry in step["top_logprobs"]:
            token = entry["token"]["id"]
            assert entry["logprob"] == pytest.approx(float(logprobs[token]), abs=1e-4)
            assert entry["logit"] == pytest.approx(float(logits[token]), abs=1e-4)
            assert bytes(entry["token"]["bytes"]) == tokenizer.token_bytes(token)
            assert entry["token"]["text"] == tokenizer.decode([token])
        assert step["top_logprobs"][0]["token"] == step["selected"]
        sequence.append(chosen)


def test_a_prompt_is_rendered_as_one_user_turn_without_thinking(model_path):
    result = ds4("logprobs", "-m", str(model_path), "--prompt", "Hello", "-n", "1", "--top-k", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # no --out: the JSON goes to stdout
    rendered = "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"
    assert report["prompt_tokens"] == len(Tokenizer.from_gguf(model_path).encode(rendered))
    raw = ds4("logprobs", "-m", str(model_path), "--prompt", rendered, "-n", "1", "--top-k", "1")
    assert json.loads(raw.stdout)["steps"] == report["steps"]


def test_perplexity_matches_the_log_likelihood_of_each_window(model_path, model, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ctx, skip = 24, 4
    text = str(tmp_path / "text.txt")
    result = ds4(
        "perplexity", "-m", str(model_path), text, "--ctx", str(ctx), "--skip", str(skip), "--chunk", "5"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = dict(re.findall(r"(\w+)=([\d.]+)", result.stdout))

    tokens = Tokenizer.from_gguf(model_path).encode(TEXT)
    nll, scored = 0.0, 0
    for begin in range(0, len(tokens), ctx - 1):
        window = [0, *tokens[begin : begin + ctx - 1]]
        logprobs = torch.log_softmax(model.prefill(torch.tensor(window), model.new_session()), dim=-1)
        for position in range(skip, len(window) - 1):
            nll -= float(logprobs[position, window[position + 1]])
            scored += 1
    assert int(figures["tokens"]) == len(tokens) and int(figures["scored"]) == scored
    assert float(figures["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(figures["ppl"]) == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_no_model_says_how_to_get_one(tmp_path):
    result = ds4("logprobs", "--prompt", "Hi", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no model file ./ds4flash.gguf" in result.stderr and "ds4 download q2-imatrix" in result.stderr


def test_bad_inputs_are_clear_errors(model_path, tmp_path, capsys):
    def fails(*args: str, message: str) -> None:
        try:
            status = main(list(args))
        except SystemExit as exit:  # argparse's own usage errors
            status = exit.code
        assert status == 2 and message in capsys.readouterr().err

    (tmp_path / "short.txt").write_text("Hi", encoding="utf-8")
    short = str(tmp_path / "short.txt")
    fails("perplexity", "-m", str(tmp_path / "none.gguf"), short, message="none.gguf: no such model file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    fails("logprobs", "-m", str(tmp_path / "junk.gguf"), "--prompt", "Hi", message="junk.gguf")
    fails("logprobs", "-m", str(model_path), "--prompt", "Hello there", "--ctx", "4", message="raise --ctx")
    fails("logprobs", "-m", str(model_path), message="one of the arguments --prompt --tokens is required")
    fails("logprobs", "-m", str(model_path), "--prompt", "x", "--top-k", "500", message="--top-k must be")
    fails(
        "perplexity",
        "-m",
        str(model_path),
        str(tmp_path / "missing.txt"),
        message="missing.txt: no such file",
    )
    fails("perplexity", "-m", str(model_path), short, message="nothing to score")
    fails("perplexity", "-m", str(model_path), "x.txt", "--ctx", "8", "--skip", "7", message="--skip must be")
