"""``ds4 logprobs``: a greedy continuation with each step's top-K log-probabilities, as JSON.

The file has the shape of ds4's ``--dump-logprobs`` (the format it compares with the official
API's ``top_logprobs``): ``source``, ``model``, ``prompt_tokens``, ``ctx``, ``top_k`` and
``steps[]``, each ``{step, selected: {id, text, bytes}, top_logprobs: [{token: {id, text,
bytes}, logit, logprob}]}``. Log-probabilities are the server's (``sampling.token_logprobs``):
a log-softmax over the whole vocabulary. The continuation stops at ``-n`` tokens, at the end of
the context, or before an EOS token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dwarfstar.cli.common import (
    add_model_arguments,
    check_token_ids,
    model_path,
    open_model,
    open_tokenizer,
    prefill,
    read_token_file,
)
from dwarfstar.cli.main import CommandError

if TYPE_CHECKING:
    from dwarfstar.model.model import Model
    from dwarfstar.tokenizer import Tokenizer

DEFAULT_CTX = 32768
MAX_TOP_K = 128


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logprobs",
        help="greedy continuation with each step's top-K log-probabilities, as JSON",
        description=(
            "Continue a prompt greedily and write, for each generated token, the chosen token and "
            "the K most likely ones with their logits and log-probabilities (ds4's "
            "--dump-logprobs format). --prompt TEXT is rendered as one user turn, thinking off, "
            "no system prompt (as the official API test vectors are), unless it already starts "
            "with <｜begin▁of▁sentence｜>."
        ),
    )
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--tokens", type=Path, help="JSON file with the prompt's token ids")
    p.add_argument("-s", "--system", default="", help="system prompt for --prompt (default: none)")
    p.add_argument("--think", action="store_true", help="render --prompt in thinking mode")
    p.add_argument("-n", "--n-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument(
        "--top-k", type=int, default=20, help=f"alternatives per step (default 20, at most {MAX_TOP_K})"
    )
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context size (default {DEFAULT_CTX})")
    p.add_argument("--out", type=Path, help="output JSON file (default: stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.n_tokens < 1:
        raise CommandError("-n must be at least 1")
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise CommandError(f"--top-k must be between 1 and {MAX_TOP_K}")
    if args.ctx < 2:
        raise CommandError("--ctx must be at least 2")
    if args.out is not None and args.out.is_dir():
        raise CommandError(f"--out {args.out} is a directory; give a .json file name")
    path = model_path(args)
    model, tokenizer = open_model(path, device=args.device), open_tokenizer(path)
    if args.tokens is not None:
        ids = read_token_file(args.tokens)
        check_token_ids(ids, model.config.vocab_size)
    else:
        ids = _prompt_ids(args, tokenizer)
    if len(ids) >= args.ctx:
        raise CommandError(f"the prompt is {len(ids)} tokens but --ctx is {args.ctx}: raise --ctx")

    report = {
        "source": "dwarfstar",
        "model": str(path),
        "prompt_tokens": len(ids),
        "ctx": args.ctx,
        "top_k": args.top_k,
        "steps": greedy_steps(model, tokenizer, ids, min(args.n_tokens, args.ctx - len(ids)), args.top_k),
    }
    text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    partial = args.out.with_name(args.out.name + ".part")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        partial.replace(args.out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise CommandError(f"cannot write {args.out}: {err.strerror or err}") from None
    print(f"wrote {args.out}: {len(report['steps'])} steps, top {args.top_k}", file=sys.stderr)
    return 0


def greedy_steps(model: Model, tokenizer: Tokenizer, ids: list[int], n_tokens: int, top_k: int) -> list[dict]:
    """Up to ``n_tokens`` greedy steps after ``ids``, each with its top-``top_k`` alternatives."""
    import torch

    from dwarfstar.engine.sampling import token_logprobs

    session = model.new_session()
    logits = prefill(model, ids, session)
    steps = []
    for step in range(n_tokens):
        chosen = int(torch.argmax(logits))
        if chosen == tokenizer.eos_id:
            break
        _, top = token_logprobs(logits, chosen, top_k)
        steps.append(
            {
                "step": step,
                "selected": _token(tokenizer, chosen),
                "top_logprobs": [
                    {"token": _token(tokenizer, t), "logit": float(logits[t]), "logprob": logprob}
                    for t, logprob in top
                ],
            }
        )
        if step + 1 < n_tokens:
            logits = model.forward(torch.tensor([chosen]), session, all_logits=False)[0]
    return steps


def _token(tokenizer: Tokenizer, token_id: int) -> dict:
    return {
        "id": token_id,
        "text": tokenizer.decode([token_id]),
        "bytes": list(tokenizer.token_bytes(token_id)),
    }


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer) -> list[int]:
    """An already rendered prompt as written; otherwise one user turn, its text never markup."""
    from dwarfstar.chat.render import render_message_parts
    from dwarfstar.chat.tokens import BOS

    if args.prompt.startswith(BOS):
        return tokenizer.encode(args.prompt)
    messages = [{"role": "user", "content": args.prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    mode = "thinking" if args.think else "chat"
    return tokenizer.encode_parts(render_message_parts(messages, thinking_mode=mode))
