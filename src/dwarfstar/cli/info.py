"""``ds4 info``: what a GGUF model holds, what decoding a token reads from it, and whether this
machine has a fast kernel for every format in it."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from dwarfstar.cli.main import CommandError

EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a GGUF model: shape, formats, bytes per token, kernels",
        description=(
            "Print a model's architecture and context, its tensors and bytes per format, its "
            "shards, the bytes decoding one token reads, and whether every matrix has a fast "
            "(compiled) kernel on this machine. Any shard of a split model describes the whole."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL.gguf")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = describe(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


def describe(path: Path) -> dict:
    """The report, as plain data (what ``--json`` prints)."""
    from dwarfstar.gguf.names import is_mtp_tensor, key, tensor_role
    from dwarfstar.gguf.reader import GGUFError
    from dwarfstar.gguf.shards import GGUFModel
    from dwarfstar.model.config import ConfigError, load_config
    from dwarfstar.quant import LINEAR_KERNELS
    from dwarfstar.quant.formats import SUPPORTED_KINDS

    try:
        file = GGUFModel(path)
        config = load_config(file)
    except (GGUFError, ConfigError) as err:
        raise CommandError(str(err)) from None

    formats: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    per_token = skipped = 0
    slow: dict[str, int] = defaultdict(int)
    for name, info in file.tensors.items():
        stored = formats[info.kind.name]
        stored["tensors"] += 1
        stored["bytes"] += info.data.nbytes
        if is_mtp_tensor(name, config.n_layer, config.n_mtp_layer):
            skipped += 1
            continue
        role = tensor_role(name, len(info.shape))
        if name == "token_embd.weight" or role == "table":  # one row per token
            per_token += info.data.nbytes // info.shape[0]
        elif name.endswith(EXPERT_SUFFIXES):  # the routed experts: n_expert_used of n_expert
            per_token += info.data.nbytes * config.n_expert_used // config.n_expert
        else:
            per_token += info.data.nbytes
        # the matrix products: formats without a compiled kernel take the (slower) reference path
        multiplied = role == "matrix" and name != "token_embd.weight"
        fast = info.kind.name == "F32" or ("cpu", info.kind) in LINEAR_KERNELS
        if multiplied and not fast:
            slow[info.kind.name] += 1
    unsupported = sorted(kind for kind in formats if kind not in {k.name for k in SUPPORTED_KINDS} | {"I32"})
    metadata = file.metadata
    return {
        "path": str(file.path),
        "name": metadata.get("general.name"),
        "shards": [str(shard.path) for shard in file.shards],
        "architecture": metadata.get("general.architecture"),
        "layers": config.n_layer,
        "mtp_layers": config.n_mtp_layer,
        "skipped_tensors": skipped,
        "width": config.dim,
        "experts": config.n_expert,
        "experts_per_token": config.n_expert_used,
        "vocabulary": config.vocab_size,
        "context_length": metadata.get(key("context_length")),
        "is_flash": config.is_flash,
        "tensors": len(file.tensors),
        "bytes": sum(f["bytes"] for f in formats.values()),
        "formats": dict(sorted(formats.items(), key=lambda item: -item[1]["bytes"])),
        "bytes_per_token": per_token,
        "unsupported_formats": unsupported,
        "reference_path": dict(sorted(slow.items())),
    }


def render(report: dict) -> str:
    """The report as the text ``ds4 info`` prints."""
    shards = report["shards"]
    lines = [f"model         {report['path']}"]
    if len(shards) > 1:
        lines.append(f"shards        {len(shards)}: " + ", ".join(Path(s).name for s in shards))
    if report["name"]:
        lines.append(f"name          {report['name']}")
    mtp = f" (+{report['mtp_layers']} MTP block, not run)" if report["mtp_layers"] else ""
    flash = "DeepSeek V4 Flash" if report["is_flash"] else "a DeepSeek V4 model"
    lines += [
        f"architecture  {report['architecture']}, {flash}: {report['layers']} layers{mtp}, width "
        f"{report['width']}, {report['experts']} experts ({report['experts_per_token']} per token), "
        f"vocabulary {report['vocabulary']}",
        f"context       {report['context_length'] or 'not stated'} tokens",
        f"tensors       {report['tensors']}, {_size(report['bytes'])}",
        "",
        f"  {'format':8} {'tensors':>8} {'bytes':>10} {'share':>6}",
    ]
    for kind, stored in report["formats"].items():
        share = stored["bytes"] / max(1, report["bytes"])
        lines.append(f"  {kind:8} {stored['tensors']:>8} {_size(stored['bytes']):>10} {share:>6.1%}")
    lines += ["", f"per token     {_size(report['bytes_per_token'])} of weights read per decoded token"]
    if report["unsupported_formats"]:
        lines.append("formats       not supported: " + ", ".join(report["unsupported_formats"]))
    if report["reference_path"]:
        slow = ", ".join(
            f"{kind} ({count} tensor{'s' if count > 1 else ''})"
            for kind, count in report["reference_path"].items()
        )
        lines.append(f"kernels       no fast kernel on this machine for {slow}: the slower reference path")
    else:
        lines.append("kernels       every matrix has a fast kernel on this machine")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
