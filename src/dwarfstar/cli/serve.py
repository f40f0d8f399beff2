"""``ds4 serve``: the OpenAI- and Anthropic-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from dwarfstar.cli.common import add_model_arguments, model_path
from dwarfstar.cli.main import CommandError

DEFAULT_CTX = 32768
DEFAULT_KV_RAM_MB = 4096
DEFAULT_KV_DISK_SPACE_MB = 16384
DEFAULT_KV_MIN_TOKENS = 512
DEFAULT_KV_SAVE_INTERVAL = 16384
DEFAULT_KV_TRIM = 32
DEFAULT_KV_ALIGN = 2048
# Live sessions are bounded by --kv-ram-mb; this caps their number too.
MAX_LIVE_SESSIONS = 64


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over the OpenAI and Anthropic APIs",
        description=(
            "Serve the model on /v1/chat/completions, /v1/completions, /v1/responses and /v1/messages "
            "(Claude Code, Codex CLI, opencode, pi and the official SDKs work unchanged)."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument(
        "--ctx", type=int, default=DEFAULT_CTX, help=f"context size in tokens (default: {DEFAULT_CTX})"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="the most tokens one answer may have (default: the context)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another model name to answer to (besides deepseek-v4-flash, deepseek-chat and "
        "deepseek-reasoner); repeatable",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help="require this key (Authorization: Bearer or x-api-key)"
    )
    parser.add_argument(
        "--cors",
        action="append",
        metavar="ORIGIN",
        help="allow browsers from ORIGIN ('*' for any); repeatable",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=64, help="largest request body in MiB (default: 64)"
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE", help="append one JSON record per request to FILE"
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="SSE keep-alive comment interval (default: 5)",
    )
    parser.add_argument(
        "--kv-ram-mb",
        type=float,
        default=DEFAULT_KV_RAM_MB,
        metavar="MB",
        help=f"memory for live sessions, least recently used evicted (default: {DEFAULT_KV_RAM_MB})",
    )
    parser.add_argument(
        "--kv-disk-dir",
        type=Path,
        metavar="DIR",
        help="keep session snapshots in DIR: conversations survive restarts and evictions",
    )
    parser.add_argument(
        "--kv-disk-space-mb",
        type=float,
        default=DEFAULT_KV_DISK_SPACE_MB,
        metavar="MB",
        help=f"the most the snapshots in --kv-disk-dir may take (default: {DEFAULT_KV_DISK_SPACE_MB})",
    )
    parser.add_argument(
        "--kv-min-tokens",
        type=int,
        default=DEFAULT_KV_MIN_TOKENS,
        metavar="N",
        help=f"save prompts of at least N new tokens to disk (default: {DEFAULT_KV_MIN_TOKENS})",
    )
    parser.add_argument(
        "--kv-save-interval",
        type=int,
        default=DEFAULT_KV_SAVE_INTERVAL,
        metavar="N",
        help="save a session to --kv-disk-dir each time it crosses a multiple of N tokens, during a "
        f"prefill or a generation (default: {DEFAULT_KV_SAVE_INTERVAL})",
    )
    parser.add_argument(
        "--kv-trim",
        type=int,
        default=DEFAULT_KV_TRIM,
        metavar="N",
        help="save a long raw (/v1/completions) prompt N tokens short of its end, so a request that "
        f"continues its last word still extends it (default: {DEFAULT_KV_TRIM})",
    )
    parser.add_argument(
        "--kv-align",
        type=int,
        default=DEFAULT_KV_ALIGN,
        metavar="N",
        help=f"... and aligned down to a multiple of N tokens (default: {DEFAULT_KV_ALIGN})",
    )
    # Tests make a random-weight model write a chosen answer (the x-ds4-script header).
    parser.add_argument("--allow-scripted-output", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    if args.ctx < 2:
        raise CommandError(f"--ctx must be at least 2, not {args.ctx}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CommandError(f"--max-tokens must be at least 1, not {args.max_tokens}")
    if not 0 <= args.port < 65536:
        raise CommandError(f"--port must be in 0..65535, not {args.port}")
    if args.kv_ram_mb <= 0 or args.kv_disk_space_mb <= 0:
        raise CommandError("--kv-ram-mb and --kv-disk-space-mb must be positive")
    if args.kv_save_interval < 1:
        raise CommandError(f"--kv-save-interval must be at least 1, not {args.kv_save_interval}")
    if args.kv_min_tokens < 1:
        raise CommandError(f"--kv-min-tokens must be at least 1, not {args.kv_min_tokens}")
    if args.kv_trim < 0 or args.kv_align < 1:
        raise CommandError("--kv-trim must be at least 0 and --kv-align at least 1")
    if args.max_body_mb <= 0 or args.keepalive <= 0:
        raise CommandError("--max-body-mb and --keepalive must be positive")
    if args.api_key is None and not _loopback(args.host):
        print(
            f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the model",
            file=sys.stderr,
        )
    path = model_path(args)

    import uvicorn

    from dwarfstar.engine import Engine, EngineError
    from dwarfstar.server.app import create_app
    from dwarfstar.server.common import Service
    from dwarfstar.server.worker import Worker

    try:
        engine = Engine.open(
            path,
            ctx=args.ctx,
            device=args.device,
            max_sessions=MAX_LIVE_SESSIONS,
            kv_ram_mb=args.kv_ram_mb,
            kv_disk_dir=args.kv_disk_dir,
            kv_disk_space_mb=args.kv_disk_space_mb,
            kv_min_tokens=args.kv_min_tokens,
            kv_save_interval=args.kv_save_interval,
            kv_trim=args.kv_trim,
            kv_align=args.kv_align,
        )
    except EngineError as err:
        raise CommandError(str(err)) from None
    try:
        worker = Worker(engine, trace=args.trace)
    except OSError as err:
        raise CommandError(f"cannot open the trace file {args.trace}: {err.strerror or err}") from None
    service = Service(
        engine,
        worker,
        max_tokens=args.max_tokens,
        keepalive_seconds=args.keepalive,
        allow_scripted_output=args.allow_scripted_output,
        aliases=tuple(args.alias),
    )
    app = create_app(service, api_key=args.api_key, cors=args.cors, max_body_mb=args.max_body_mb)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    print(
        f"ds4 serve: {path} on http://{args.host}:{args.port} (context {args.ctx})",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    return 0
