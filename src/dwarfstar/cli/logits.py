"""``ds4 logits``: float32 logits for a list of token ids, to check a build against references."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwarfstar.cli.common import (
    PREFILL_CHUNK,
    add_model_arguments,
    check_token_ids,
    model_path,
    open_model,
    open_tokenizer,
    read_token_file,
)
from dwarfstar.cli.main import CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logits",
        help="write the logits [T, vocab] of a token sequence to a .npy file",
        description=(
            "Run the model over a JSON list of token ids and save float32 logits [T, vocab]. "
            "With --demo, the demo model runs a sample prompt unless --tokens is given."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--tokens", type=Path, help="JSON file with a list of token ids")
    p.add_argument("--out", type=Path, help="output .npy file (with --demo: in the cache directory)")
    p.add_argument(
        "--chunk",
        type=int,
        default=PREFILL_CHUNK,
        help=f"prefill in chunks of N tokens (1 = token by token; default {PREFILL_CHUNK})",
    )
    p.add_argument(
        "--no-quant-sim",
        action="store_true",
        help="do not simulate the official FP8 KV / FP4 indexer rounding (on by default for Flash files)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    missing = [flag for flag, value in (("--tokens", args.tokens), ("--out", args.out)) if not value]
    if missing and not args.demo:
        raise CommandError(f"missing {', '.join(missing)} (or use --demo)")
    if args.chunk < 1:
        raise CommandError("--chunk must be at least 1")
    tokens = read_token_file(args.tokens) if args.tokens else None
    path = model_path(args)
    if args.demo:
        from dwarfstar.synthetic.demo import cache_dir
        from dwarfstar.synthetic.models import DEMO_PROMPT

        if tokens is None:
            tokenizer = open_tokenizer(path)
            tokens = [tokenizer.bos_id, *tokenizer.encode(DEMO_PROMPT)]
        args.out = args.out or cache_dir() / "demo-logits.npy"
    if args.out.is_dir():
        raise CommandError(f"--out {args.out} is a directory; give a .npy file name")
    model = open_model(path, quant_sim=False if args.no_quant_sim else None, device=args.device)
    check_token_ids(tokens, model.config.vocab_size)

    # Each chunk's logits go straight to a memory-mapped .npy, renamed into place when complete.
    partial = args.out.with_name(args.out.name + ".part")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(partial, "w+", np.float32, (len(tokens), model.config.vocab_size))
        done = 0
        chunks = model.prefill_chunks(torch.tensor(tokens), model.new_session(), args.chunk)
        with tqdm(total=len(tokens), desc="prefill", unit="tok", disable=not sys.stderr.isatty()) as bar:
            for logits in chunks:
                out[done : done + logits.shape[0]] = logits.cpu().numpy()
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
