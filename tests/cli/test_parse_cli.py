"""``ds4 parse``, run as a user runs it: a subprocess, the text as an argument or on stdin."""

import json
import re
import subprocess
import sys

# What the ``ds4`` script runs (``python -m dwarfstar.cli.main`` would load main.py twice and
# so miss the CommandError its subcommands raise).
DS4 = [sys.executable, "-c", "import sys; from dwarfstar.cli.main import main; sys.exit(main())"]

EOS = "<｜end▁of▁sentence｜>"
COMPLETION = (
    "The user wants README.md.</think>Let me read it.\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="read_file">\n'
    '<｜DSML｜parameter name="path" string="true">README.md</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="max_lines" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
)
MESSAGE = {
    "role": "assistant",
    "content": "Let me read it.",
    "reasoning_content": "The user wants README.md.",
    "tool_calls": [
        {
            "type": "function",
            "function": {"name": "read_file", "arguments": '{"path": "README.md", "max_lines": 3}'},
        }
    ],
}


def ds4_parse(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([*DS4, "parse", *args], input=stdin, capture_output=True, timeout=120)


def without_ids(message: dict) -> dict:
    for call in message["tool_calls"]:
        assert re.fullmatch(r"call_[0-9a-f]{32}", call.pop("id"))
    return message


def test_text_argument():
    done = ds4_parse(COMPLETION)
    assert done.returncode == 0, done.stderr
    assert without_ids(json.loads(done.stdout)) == MESSAGE


def test_stdin():
    done = ds4_parse(stdin=COMPLETION.encode())
    assert done.returncode == 0, done.stderr
    assert without_ids(json.loads(done.stdout)) == MESSAGE


def test_chat_mode():
    done = ds4_parse("--chat", stdin="Ciao, è pronto.".encode())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "role": "assistant",
        "content": "Ciao, è pronto.",
        "reasoning_content": "",
        "tool_calls": [],
    }


def test_events():
    done = ds4_parse("--events", COMPLETION)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    types = [e["type"] for e in events]
    assert types[:3] == ["reasoning_delta", "content_delta", "tool_call_start"]
    assert types[-2:] == ["tool_call_end", "done"]
    arguments = "".join(e["text"] for e in events if e["type"] == "tool_call_arguments_delta")
    assert arguments == MESSAGE["tool_calls"][0]["function"]["arguments"]
    assert without_ids(events[-1]["message"]) == MESSAGE


def test_malformed_output_exits_1_with_the_message():
    text = 'Sure.</think>Ok.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">'
    done = ds4_parse(text)
    assert done.returncode == 1
    message = json.loads(done.stdout)
    assert message["content"] == 'Ok.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">'
    assert message["tool_calls"] == [] and "never closed" in message["error"]
    assert b"malformed" in done.stderr


def test_invalid_utf8_is_a_clean_error():
    for args, stdin in (((), b"ok \xff"), ((b"ok \xff",), b"")):
        done = ds4_parse(*args, stdin=stdin)
        assert done.returncode == 2 and done.stdout == b""
        assert b"not valid UTF-8" in done.stderr and b"Traceback" not in done.stderr


def test_empty_input_is_a_clean_error():
    done = ds4_parse(stdin=b"")
    assert done.returncode == 2 and done.stdout == b""
    assert b"empty" in done.stderr and b"Traceback" not in done.stderr


def test_parse_does_not_import_torch():
    code = (
        "import sys; from dwarfstar.cli.main import main; rc = main(['parse', '--chat', 'hi']); "
        "sys.exit(100 if 'torch' in sys.modules else rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
