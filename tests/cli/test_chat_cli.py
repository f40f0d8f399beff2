"""``ds4 -p`` and the interactive ``ds4`` chat, driven as a user drives them: piped and on a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pytest
from models import tiny_hf_config

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.render import THINK_MAX_PREFIX
from dwarfstar.cli.main import main
from dwarfstar.engine import Engine, SamplingParams
from dwarfstar.engine.events import ContentDelta
from dwarfstar.tokenizer import Tokenizer

CODE = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"
STATS = re.compile(r"prompt (\d+) tokens \((\d+) reused\), prefill [\d.]+ tok/s, generated (\d+) tokens")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_path(gguf_model_factory):
    return str(gguf_model_factory("mixed", tiny_hf_config()))


def ds4(*args: str, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CODE, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=300
    )


def stats(stderr: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups())) for m in STATS.finditer(stderr)]


def test_one_shot_piped_prints_the_answer_only_and_a_seed_repeats(model_path):
    args = ("-m", model_path, "-p", "Hello", "--nothink", "-n", "6", "--seed", "7")
    first = ds4(*args)
    assert first.returncode == 0, first.stderr
    engine = Engine.open(model_path)
    conversation = Conversation([{"role": "user", "content": "Hello"}], thinking_mode="chat")
    events = list(engine.generate(conversation, SamplingParams(seed=7, max_tokens=6)))
    answer = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert first.stdout == answer + "\n"  # the seed gives the same answer in another process
    assert not ANSI.search(first.stdout + first.stderr)  # no colours, no bars when piped
    assert stats(first.stderr) == [(events[-1].usage.prompt_tokens, 0, 6)]


def test_piped_chat_extends_the_session_each_turn(model_path, tmp_path):
    (tmp_path / "note.txt").write_text("Rivers: Tiber, Po, Arno.", encoding="utf-8")
    script = "Hello\n/read note.txt\n/think-max\nWhy?\n/quit\nnever sent\n"
    result = ds4("-m", model_path, "--nothink", "-n", "4", "--seed", "3", stdin=script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    turns = stats(result.stderr)
    assert len(turns) == 3
    (p1, r1, g1), (p2, r2, g2), (p3, r3, _) = turns
    assert r1 == 0 and g1 == g2 == 4
    assert r2 == p1 + g1 - 1  # everything held (the last sampled token is fed by the next prompt)
    file_tokens = Tokenizer.from_gguf(model_path).encode("Rivers: Tiber, Po, Arno.")
    assert p2 - r2 > len(file_tokens)  # the file's text was sent, with the turn's markup
    assert "read note.txt: 24 characters" in result.stderr
    assert "Think Max needs a context of at least 393216 tokens (-c); thinking normally\nthinking on\n" in (
        result.stderr
    )
    assert r3 == 0 < p3  # thinking changes the rendered history: read again from the start
    assert not ANSI.search(result.stdout + result.stderr)


def spawn(model_path: str, tmp_path, *args: str, banner: bool = True) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "DS4_HISTORY": str(tmp_path / "history")}
    child = pexpect.spawn(
        sys.executable, ["-c", CODE, "-m", model_path, *args], env=env, cwd=str(tmp_path), encoding="utf-8"
    )
    child.timeout = 120
    if banner:
        child.expect("/help for commands")
    return child


def test_one_shot_on_a_terminal_dims_the_reasoning_and_ctrl_c_stops_it(model_path, tmp_path):
    child = spawn(model_path, tmp_path, "-p", "Think it over.", "-n", "2000", "--seed", "2", banner=False)
    child.expect("prefill[^\n]*\n")
    child.expect_exact("\x1b[2m")  # the reasoning, dimmed
    child.sendintr()
    (_, _, generated), _ = next_stats(child)
    child.expect_exact("[cancelled]")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and 1 <= generated < 2000


def ask(child: pexpect.spawn, line: str) -> None:
    child.expect_exact("ds4> ")
    child.sendline(line)
    child.expect_exact(line)  # the terminal's echo


def next_stats(child: pexpect.spawn) -> tuple[tuple[int, int, int], str]:
    """The stats line after an answer, and everything printed before it."""
    child.expect(STATS)
    return tuple(map(int, child.match.groups())), child.before


def test_terminal_chat_ctrl_c_commands_and_reuse(model_path, tmp_path):
    child = spawn(model_path, tmp_path, "--nothink", "--seed", "11", "--temp", "0.8", "-n", "300")
    ask(child, "/help")
    child.expect_exact("/read FILE")

    # Ctrl-C while the model writes: the answer stops, the prompt comes back.
    ask(child, "Count to ten thousand.")
    child.expect("prefill[^\n]*\n")
    child.expect(r"\S")  # the answer has begun
    child.sendintr()
    (p1, r1, g1), _ = next_stats(child)
    child.expect_exact("[cancelled]")
    assert r1 == 0 and g1 >= 1

    # The next turn works and prefills only its new tokens: the interrupted answer is kept.
    ask(child, "Go on.")
    (p2, r2, g2), _ = next_stats(child)
    assert r2 == p1 + g1  # every token of the cancelled answer was fed, none is read again
    assert p2 > r2

    # /think: the reasoning shows, dimmed.
    ask(child, "/think")
    child.expect_exact("thinking on")
    ask(child, "Why?")
    (_, _, g3), before = next_stats(child)
    assert re.search(r"\x1b\[2m(?!prompt )\S", before)  # dim text other than a stats line

    # /ctx: a message that does not fit is refused with the sizes, and the chat goes on.
    ask(child, "/ctx 40")
    child.expect_exact("context: 40 tokens")
    ask(child, "This message is longer than what is left of forty tokens of context.")
    child.expect(r"error: the prompt is \d+ tokens but the context holds 40")
    ask(child, "/clear")
    child.expect_exact("conversation cleared")
    ask(child, "/nothink")
    ask(child, "Hi")
    (p4, r4, _), _ = next_stats(child)
    assert p4 < 40

    # Ctrl-C at the prompt is harmless; Ctrl-D leaves.
    child.expect_exact("ds4> ")
    child.sendintr()
    child.expect_exact("ds4> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Count to ten thousand." in (tmp_path / "history").read_text(encoding="utf-8")


# ---- errors a user can act on: exit status 2, a clear message, no traceback ---------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "hi"], "no model file ./ds4flash.gguf: get the model with `ds4 download"),
        (["-m", "missing.gguf", "-p", "hi"], "missing.gguf: no such model file"),
        (["-m", "notes.txt", "-p", "hi"], "notes.txt: not a GGUF file"),
        (["-m", ".", "-p", "hi"], "is a directory"),
        (["--prompt-file", "absent.txt"], "absent.txt: no such file"),
        (["--temp", "-1", "-p", "hi"], "--temp must be >= 0"),
        (["--top-p", "1.5", "-p", "hi"], "--top-p must be in (0, 1]"),
        (["-n", "-2", "-p", "hi"], "-n/--tokens must be >= 0"),
        (["-c", "1", "-p", "hi"], "--ctx must be at least 2"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_prompt_longer_than_the_context_is_a_clear_error(model_path, capsys):
    assert main(["-m", model_path, "-c", "16", "-p", "word " * 40]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: the prompt is \d+ tokens but the context holds 16", err)


def test_conflicting_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-p", "a", "--prompt-file", "b"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_think_max_adds_its_prefix_when_the_context_allows(model_path, capsys):
    def prompt_tokens(*args: str) -> int:
        assert main(["-m", model_path, "-p", "hi", "-n", "1", "--seed", "1", *args]) == 0
        return stats(capsys.readouterr().err)[0][0]

    normal = prompt_tokens("--think")
    prefix = Tokenizer.from_gguf(model_path).encode(THINK_MAX_PREFIX)
    assert prompt_tokens("--think-max", "-c", "393216") == normal + len(prefix)
    assert prompt_tokens("--think-max") == normal  # below 393216 tokens: normal thinking, with a note


def test_an_already_rendered_prompt_is_sent_as_written(model_path, capsys):
    rendered = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert main(["-m", model_path, "-p", rendered, "-n", "2", "--seed", "1"]) == 0
    tokens = Tokenizer.from_gguf(model_path).encode(rendered)
    assert len(tokens) == 5  # BOS, User, "Hi", Assistant, </think>: no template around it
    assert stats(capsys.readouterr().err) == [(5, 0, 2)]
