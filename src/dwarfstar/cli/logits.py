"""``ds4 logits``: float32 logits for a list of token ids, to check a build against references."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dwarfstar.cli.main import CommandError

DEMO_DIR = Path("demo")
# Bounds the attention score tensors of a long prompt; every chunking gives the same logits.
DEFAULT_CHUNK = 512


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logits",
        help="write the logits [T, vocab] of a token sequence to a .npy file",
        description="Run the model over a JSON list of token ids and save float32 logits [T, vocab].",
    )
    p.add_argument("-m", "--model", type=Path, help="GGUF model file")
    p.add_argument("--tokens", type=Path, help="JSON file with a list of token ids")
    p.add_argument("--out", type=Path, help="output .npy file")
    p.add_argument(
        "--chunk",
        type=int,
        default=DEFAULT_CHUNK,
        help=f"prefill in chunks of N tokens (1 = token by token; default {DEFAULT_CHUNK})",
    )
    p.add_argument(
        "--no-quant-sim",
        action="store_true",
        help="do not simulate the official FP8 KV / FP4 indexer rounding (on by default for Flash files)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"build a small random-weight demo model under {DEMO_DIR}/ and run it on a sample prompt",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from dwarfstar.gguf.reader import GGUFError
    from dwarfstar.model.config import ConfigError
    from dwarfstar.model.model import Model
    from dwarfstar.model.weights import WeightsError

    if args.demo:
        args = _demo_arguments(args)
    missing = [
        flag
        for flag, value in (("-m", args.model), ("--tokens", args.tokens), ("--out", args.out))
        if not value
    ]
    if missing:
        raise CommandError(f"missing {', '.join(missing)} (or use --demo)")
    if args.chunk < 1:
        raise CommandError("--chunk must be at least 1")
    tokens = _read_tokens(args.tokens)
    if args.out.is_dir():
        raise CommandError(f"--out {args.out} is a directory; give a .npy file name")
    try:
        model = Model.load(args.model, quant_sim=False if args.no_quant_sim else None)
    except (GGUFError, ConfigError, WeightsError) as err:
        raise CommandError(str(err)) from None
    bad = [t for t in tokens if not 0 <= t < model.config.vocab_size]
    if bad:
        raise CommandError(f"token ids out of range [0, {model.config.vocab_size}): {bad[:5]}")

    # Each chunk's logits go straight to a memory-mapped .npy, renamed into place when complete.
    partial = args.out.with_name(args.out.name + ".part")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(partial, "w+", np.float32, (len(tokens), model.config.vocab_size))
        done = 0
        chunks = model.prefill_chunks(torch.tensor(tokens), model.new_session(), args.chunk)
        with tqdm(total=len(tokens), desc="prefill", unit="tok", disable=not sys.stderr.isatty()) as bar:
            for logits in chunks:
                out[done : done + logits.shape[0]] = logits.numpy()
                done += logits.shape[0]
                bar.update(logits.shape[0])
        out.flush()
        last = torch.from_numpy(np.array(out[-1]))
        del out
        partial.replace(args.out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise CommandError(f"cannot write {args.out}: {err.strerror or err}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sim = "on" if model.quant_sim else "off"
    print(f"wrote {args.out}: logits {[len(tokens), model.config.vocab_size]} float32 (quant sim {sim})")
    if args.demo:
        print("top-5 next tokens after the last position:", last.topk(5).indices.tolist())
    return 0


def _read_tokens(path: Path) -> list[int]:
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except OSError as err:
        raise CommandError(f"{path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommandError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        raise CommandError(f"{path}: expected a non-empty JSON list of integer token ids")
    return tokens


def _demo_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Point the command at a demo model and prompt, building them on first use."""
    from dwarfstar.synthetic.models import ensure_demo

    model, tokens = ensure_demo(DEMO_DIR)
    args.model = args.model or model
    args.tokens = args.tokens or tokens
    args.out = args.out or DEMO_DIR / "logits.npy"
    return args
