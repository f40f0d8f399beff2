"""``ds4 perplexity``: how well the model predicts a text, as perplexity.

The text is tokenized as written (plain BPE, no chat template) and cut into windows of
``--ctx`` tokens; each window starts a fresh session with BOS. Its first ``--skip`` tokens only
give context (a window's first predictions see almost nothing and would dominate the figure,
as in ds4 and llama.cpp); every later token is scored by the log-probability the model gave it
one position earlier. Output: ``tokens= scored= nll= avg_nll= ppl=`` as ds4 prints it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dwarfstar.cli.common import (
    PREFILL_CHUNK,
    add_model_arguments,
    model_path,
    open_model,
    open_tokenizer,
    read_text_file,
)
from dwarfstar.cli.main import CommandError

if TYPE_CHECKING:
    from dwarfstar.model.model import Model

DEFAULT_CTX = 4096
DEFAULT_SKIP = 32


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perplexity",
        help="perplexity of a text file",
        description=(
            "Score a UTF-8 text: windows of --ctx tokens, each from a fresh session starting with "
            "BOS, the first --skip tokens of each window unscored. Prints tokens, scored tokens, "
            "total and mean negative log-likelihood (nats) and perplexity."
        ),
    )
    add_model_arguments(p)
    p.add_argument("text", type=Path, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"window in tokens (default {DEFAULT_CTX})")
    p.add_argument(
        "--skip", type=int, default=DEFAULT_SKIP, help=f"unscored tokens per window (default {DEFAULT_SKIP})"
    )
    p.add_argument("-n", "--max-tokens", type=int, help="read only the first N tokens of the text")
    p.add_argument(
        "--chunk", type=int, default=PREFILL_CHUNK, help=f"tokens per forward pass (default {PREFILL_CHUNK})"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ctx < 2:
        raise CommandError("--ctx must be at least 2")
    if not 0 <= args.skip < args.ctx - 1:
        raise CommandError(f"--skip must be between 0 and --ctx - 2 ({args.ctx - 2})")
    if args.chunk < 1:
        raise CommandError("--chunk must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CommandError("-n must be at least 1")
    text = read_text_file(args.text)
    path = model_path(args)
    model, tokenizer = open_model(path, device=args.device), open_tokenizer(path)
    tokens = tokenizer.encode(text)[: args.max_tokens]
    if len(tokens) <= args.skip:
        raise CommandError(f"{args.text}: {len(tokens)} tokens, nothing to score after --skip {args.skip}")

    nll, scored = negative_log_likelihood(model, tokenizer.bos_id, tokens, args.ctx, args.skip, args.chunk)
    mean = nll / scored
    print(f"tokens={len(tokens)} scored={scored} nll={nll:.6f} avg_nll={mean:.6f} ppl={math.exp(mean):.6f}")
    return 0


def negative_log_likelihood(
    model: Model, bos: int, tokens: list[int], ctx: int, skip: int, chunk: int = PREFILL_CHUNK
) -> tuple[float, int]:
    """Summed NLL (nats) of ``tokens`` and how many were scored, window by window."""
    import torch
    from tqdm import tqdm

    per_window = ctx - 1  # text tokens after the window's BOS
    total, scored = 0.0, 0
    with tqdm(total=len(tokens), desc="perplexity", unit="tok", disable=not sys.stderr.isatty()) as bar:
        for begin in range(0, len(tokens), per_window):
            window = torch.tensor([bos, *tokens[begin : begin + per_window]])
            session = model.new_session()
            # Position i predicts window[i + 1]; text token j (window index j + 1) is scored when j >= skip.
            for start in range(0, len(window) - 1, chunk):
                inputs = window[start : min(start + chunk, len(window) - 1)]
                targets = window[start + 1 : start + 1 + len(inputs)]
                logits = model.forward(inputs, session)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                picked = logprobs.gather(1, targets[:, None])[:, 0]
                keep = torch.arange(start, start + len(targets)) >= skip
                total -= float(picked[keep].sum())
                scored += int(keep.sum())
                bar.update(len(targets))
    return total, scored
