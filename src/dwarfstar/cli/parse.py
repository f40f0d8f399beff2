"""``ds4 parse``: the assistant message a server would make of a model's generated text."""

from __future__ import annotations

import argparse
import json
import sys

from dwarfstar.chat.parser import OutputParser
from dwarfstar.cli.main import CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parse",
        help="print the assistant message (reasoning, content, tool calls) in a generated text",
        description=(
            "Parse what DeepSeek V4 generated after the prompt (in thinking mode: the text after "
            "<think>) into an OpenAI-shaped assistant message, printed as JSON. Exit status 1 when "
            "the text breaks the format (the message then has an 'error' field)."
        ),
    )
    parser.add_argument("text", nargs="?", help="the generated text (default: stdin)")
    parser.add_argument(
        "--chat", action="store_true", help="non-thinking mode: the prompt ended in </think>, not <think>"
    )
    parser.add_argument(
        "--events", action="store_true", help="print the parser's event stream as JSON lines instead"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = _read_text(args.text)
    parser = OutputParser(thinking=not args.chat)
    events = parser.feed(text) + parser.finish()
    message = events[-1].message
    if args.events:
        out = "".join(json.dumps(event.as_dict(), ensure_ascii=False) + "\n" for event in events)
    else:
        out = json.dumps(message, ensure_ascii=False, indent=2) + "\n"
    sys.stdout.buffer.write(out.encode("utf-8"))
    sys.stdout.flush()
    if "error" in message:
        print(f"ds4 parse: malformed output: {message['error']}", file=sys.stderr)
        return 1
    return 0


def _read_text(arg: str | None) -> str:
    if arg is None:
        raw, source = sys.stdin.buffer.read(), "stdin"
    else:
        # The command line reaches Python decoded with surrogateescape; undo it to check the bytes.
        raw, source = arg.encode("utf-8", "surrogateescape"), "TEXT"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CommandError(f"{source} is not valid UTF-8 (byte {err.start})") from None
    if not text:
        raise CommandError(f"{source} is empty: nothing to parse")
    return text
