"""``ds4``: one command, one module per subcommand.

Each module in ``COMMANDS`` defines ``add_parser(subparsers)`` (which registers the
subcommand and sets ``func`` to its runner) and is imported only when listed, so a
subcommand's heavy imports (torch) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "chat",
    "logits",
    "logprobs",
    "perplexity",
    "convert",
    "quantize",
    "imatrix",
    "render",
    "parse",
    "download",
    "info",
    "bench",
    "serve",
    "kv",
)


class CommandError(Exception):
    """A user-facing failure: printed as ``ds4 <command>: error: ...``, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds4", description="DeepSeek V4 Flash inference engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dwarfstar.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["chat", *argv]  # `ds4 -p PROMPT` and bare `ds4` chat
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"ds4 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the installed module so CommandError is the class the handlers raise.
    from dwarfstar.cli.main import main as installed_main

    sys.exit(installed_main())
