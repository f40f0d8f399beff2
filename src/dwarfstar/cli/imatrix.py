"""``ds4 imatrix``: an importance matrix for ``ds4 quantize --imatrix``, from a text corpus.

The text is tokenized as written and cut into chunks of ``--ctx`` tokens, each run from a fresh
session starting with BOS (as ``llama-imatrix`` does). Per layer and routed expert, the squared
input activations of the tokens routed to that expert are summed; the file is llama.cpp's
imatrix GGUF, which ``llama-quantize`` reads too. ``--in-file`` continues from earlier files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwarfstar.cli.common import (
    PREFILL_CHUNK,
    add_model_arguments,
    model_path,
    open_model,
    open_tokenizer,
    read_text_file,
)
from dwarfstar.cli.main import CommandError

DEFAULT_CTX = 512


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imatrix",
        help="collect an importance matrix from a text, for quantize --imatrix",
        description=(
            "Run the model over a UTF-8 text in chunks of --ctx tokens and record, per layer and routed "
            "expert, the mean squared activation of each input column over the tokens routed to it. "
            "Writes llama.cpp's imatrix GGUF format."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 calibration text")
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="IMATRIX", help="imatrix file to write"
    )
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, help="process at most this many chunks")
    p.add_argument(
        "--in-file",
        type=Path,
        action="append",
        default=[],
        metavar="IMATRIX",
        help="start from this imatrix (GGUF or legacy .dat); repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from dwarfstar.gguf.imatrix import Imatrix, ImatrixError, read_imatrix, write_imatrix
    from dwarfstar.model.imatrix import ExpertStatistics

    if args.ctx < 2:
        raise CommandError("--ctx must be at least 2")
    if args.chunks is not None and args.chunks < 1:
        raise CommandError("--chunks must be at least 1")
    text = read_text_file(args.text)
    if not args.output.parent.is_dir():
        raise CommandError(f"{args.output.parent}: no such directory for the output file")
    imatrix = Imatrix()
    try:
        for path in args.in_file:
            earlier = read_imatrix(path)
            for name, sums in earlier.sums.items():
                imatrix.add(name, sums, earlier.counts[name])
            imatrix.datasets += earlier.datasets
            imatrix.chunk_count += earlier.chunk_count
    except ImatrixError as err:
        raise CommandError(str(err)) from None
    path = model_path(args)
    model, tokenizer = open_model(path, device=args.device), open_tokenizer(path)
    tokens = tokenizer.encode(text)
    per_chunk = args.ctx - 1  # after each chunk's BOS
    starts = list(range(0, len(tokens), per_chunk))[: args.chunks]
    if not starts:
        raise CommandError(f"{args.text}: no tokens")
    stats = ExpertStatistics(model, imatrix)
    with (
        stats.observing(),
        tqdm(total=len(starts), desc="imatrix", unit="chunk", disable=not sys.stderr.isatty()) as bar,
    ):
        for start in starts:
            window = torch.tensor([tokenizer.bos_id, *tokens[start : start + per_chunk]])
            session = model.new_session()
            for begin in range(0, len(window), PREFILL_CHUNK):
                model.forward(window[begin : begin + PREFILL_CHUNK], session, all_logits=False)
            bar.update(1)
    imatrix.datasets.append(str(args.text))
    imatrix.chunk_count += len(starts)
    imatrix.chunk_size = args.ctx
    write_imatrix(args.output, imatrix)
    entries, chunks = len(imatrix.sums), len(starts)
    print(
        f"wrote {args.output}: {entries} entries from {chunks} chunks of up to {args.ctx} tokens",
        file=sys.stderr,
    )
    return 0
