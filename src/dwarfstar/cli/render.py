"""``ds4 render``: the exact prompt the model would see for an API request."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dwarfstar.chat.render import render_parts
from dwarfstar.chat.request import RequestError, from_anthropic, from_openai, from_responses, parse_request
from dwarfstar.cli.main import CommandError

MAPPERS = {"openai": from_openai, "anthropic": from_anthropic, "responses": from_responses}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="print the prompt text (or token ids) for a chat request",
        description=(
            "Render an API request body to the exact DeepSeek V4 prompt text, ending where the model "
            "starts its answer. The body is read as --api says, never guessed from its fields."
        ),
    )
    parser.add_argument(
        "request",
        nargs="?",
        default="-",
        metavar="REQUEST.json",
        help="file holding the request body (JSON); '-' or nothing reads it from standard input",
    )
    parser.add_argument(
        "--api",
        choices=tuple(MAPPERS),
        default="openai",
        help="the API the body is for: openai (/v1/chat/completions, the default), anthropic "
        "(/v1/messages) or responses (/v1/responses)",
    )
    parser.add_argument(
        "--anthropic", dest="api", action="store_const", const="anthropic", help="the same as --api anthropic"
    )
    parser.add_argument("--tokens", action="store_true", help="print the token ids as a JSON list")
    parser.add_argument(
        "-m", "--model", type=Path, help="GGUF file whose tokenizer --tokens uses (default: DeepSeek V4's)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.request == "-":
        raw, source = sys.stdin.buffer.read(), "stdin"
    else:
        try:
            raw = Path(args.request).read_bytes()
        except OSError as err:
            raise CommandError(f"cannot read {args.request}: {err.strerror}") from None
        source = args.request
    try:
        body = parse_request(raw)
        parts = render_parts(MAPPERS[args.api](body))
    except RequestError as err:
        raise CommandError(f"{source}: {err}") from None

    if args.tokens:
        # Special tokens count only in the template's markup, never in the request's text.
        sys.stdout.write(json.dumps(_tokenizer(args.model).encode_parts(parts)) + "\n")
    else:
        sys.stdout.buffer.write("".join(text for text, _ in parts).encode("utf-8"))
    sys.stdout.flush()
    return 0


def _tokenizer(model: Path | None):
    from dwarfstar.tokenizer import Tokenizer

    if model is None:
        return Tokenizer.default()
    if not model.is_file():
        raise CommandError(f"model file not found: {model}")
    try:
        return Tokenizer.from_gguf(model)
    except ValueError as err:  # not a GGUF file (GGUFError), or no usable tokenizer in it
        raise CommandError(str(err)) from None
