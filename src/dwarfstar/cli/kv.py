"""``ds4 kv``: see and manage a KV cache directory (``ds4 serve --kv-disk-dir``)."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from dwarfstar.cli.main import CommandError

_NAME = re.compile(r"^[0-9a-f]{40}\.kv$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kv",
        help="list, inspect or remove the session snapshots of a KV cache directory",
        description="See and manage a KV cache directory (ds4 serve --kv-disk-dir DIR).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="one line per snapshot: name, tokens, size, age, reason, text")
    ls.add_argument("directory", type=Path, metavar="DIR")
    inspect = actions.add_parser("inspect", help="check one snapshot and print its header")
    inspect.add_argument("path", type=Path, metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print the header as JSON")
    rm = actions.add_parser("rm", help="remove snapshots by name prefix, or all of them")
    rm.add_argument("directory", type=Path, metavar="DIR")
    rm.add_argument("names", nargs="*", metavar="NAME", help="file names or their first hex digits")
    rm.add_argument("--all", action="store_true", help="remove every snapshot in DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"ls": list_directory, "inspect": inspect_file, "rm": remove}[args.action](args)


def _snapshots(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CommandError(f"{directory}: no such directory")
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def list_directory(args: argparse.Namespace) -> int:
    from dwarfstar.engine.kvfile import KVFileError, read_header

    files = _snapshots(args.directory)
    now = time.time()
    total = 0
    print(f"{'name':<12} {'tokens':>8} {'size':>10} {'used':>8} {'hits':>5}  {'reason':<10} text")
    for path in files:
        stat = path.stat()
        total += stat.st_size
        try:
            header = read_header(path)
        except (KVFileError, OSError) as err:
            print(
                f"{path.name[:12]:<12} {'-':>8} {_size(stat.st_size):>10} {'-':>8} {'-':>5}  invalid: {err}"
            )
            continue
        extra = header.get("extra") or {}
        text = header.get("text")
        preview = "(tokens only)" if text is None else repr(text[-40:])
        age = _age(now - stat.st_mtime)
        reason = extra.get("reason", "-")
        tokens, size = header.get("n_tokens", 0), _size(stat.st_size)
        hits = header.get("hits", 0)
        print(f"{path.name[:12]:<12} {tokens:>8} {size:>10} {age:>8} {hits:>5}  {reason:<10} {preview}")
    print(f"{len(files)} snapshots, {_size(total)}")
    return 0


def inspect_file(args: argparse.Namespace) -> int:
    from dwarfstar.engine.kvfile import KVFileError, verify

    if not args.path.is_file():
        raise CommandError(f"{args.path}: no such file")
    try:
        header = verify(args.path)
    except KVFileError as err:
        raise CommandError(f"{args.path}: not a usable snapshot: {err}") from None
    if args.json:
        print(json.dumps(header, indent=2, ensure_ascii=False))
        return 0
    identity = header.get("model") or {}
    architecture = identity.get("architecture") or {}
    layers = next((v for k, v in architecture.items() if k.endswith("block_count")), "?")
    tensors = header.get("tensors") or []
    text = header.get("text")
    print(f"file:      {args.path} ({_size(args.path.stat().st_size)}, checksum ok)")
    weights = str(identity.get("weights"))[:16]
    print(f"model:     {layers} layers, quant_sim {identity.get('quant_sim')}, weights {weights}")
    print(f"tokens:    {header.get('n_tokens')}")
    print(f"hits:      {header.get('hits')}")
    print(f"created:   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header.get('created', 0)))}")
    print(f"extra:     {json.dumps(header.get('extra') or {}, ensure_ascii=False)[:200]}")
    print(f"tensors:   {len(tensors)}")
    shown = "(not known)" if text is None else repr(text[:80]) + (" ..." if len(text) > 80 else "")
    print(f"text:      {shown}")
    return 0


def remove(args: argparse.Namespace) -> int:
    files = _snapshots(args.directory)
    if args.all == bool(args.names):
        raise CommandError("give the names to remove, or --all (not both)")
    chosen = files if args.all else [p for p in files if any(p.name.startswith(n) for n in args.names)]
    if not args.all:
        missing = [n for n in args.names if not any(p.name.startswith(n) for p in files)]
        if missing:
            raise CommandError(f"no snapshot in {args.directory} named {', '.join(missing)}")
    for path in chosen:
        path.unlink(missing_ok=True)
    print(f"removed {len(chosen)} snapshots")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
