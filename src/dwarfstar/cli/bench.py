"""``ds4 bench``: prefill and generation speed as the context grows.

The model loads once and reads a fixed long text (by default Milton's *Paradise Lost*, shipped
in the package) up to each context frontier in turn. At each frontier it times only the newly
prefilled stretch, then generates ``--gen-tokens`` tokens greedily with EOS excluded (so every
frontier generates the same count), timed, and rolls the session back to the frontier before
moving on. One CSV row per frontier: ``ctx,prefill_tps,gen_tps,kv_bytes,rss_bytes``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

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

COLUMNS = ("ctx", "prefill_tps", "gen_tps", "kv_bytes", "rss_bytes")
BENCH_TEXT = "paradise_lost.txt"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill and generation speed at growing context sizes (CSV, optional plot)",
        description=(
            "Prefill a long text frontier by frontier (--ctx-start, then --step more tokens or "
            "--step-mul times more, up to --ctx-max), timing only the new tokens, and at each "
            "frontier time --gen-tokens greedy tokens (EOS excluded; the session is rolled back "
            "after). Writes CSV columns " + ",".join(COLUMNS) + " to stdout or --csv."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--text", type=Path, help="UTF-8 text to read (default: Paradise Lost, shipped)")
    p.add_argument("--ctx-start", type=int, default=2048, help="first frontier in tokens (default 2048)")
    p.add_argument("--ctx-max", type=int, default=32768, help="last frontier at most (default 32768)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step", type=int, default=2048, help="tokens between frontiers (default 2048)")
    step.add_argument("--step-mul", type=float, help="each frontier this many times the last (> 1)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per frontier (default 128)")
    p.add_argument(
        "--chunk", type=int, default=PREFILL_CHUNK, help=f"prefill chunk in tokens (default {PREFILL_CHUNK})"
    )
    p.add_argument("--csv", type=Path, help="CSV output file (default: stdout)")
    p.add_argument("--plot", type=Path, help="also plot both speeds against context to this PNG file")
    p.set_defaults(func=run)


def frontiers(start: int, stop: int, step: int, multiplier: float | None = None) -> list[int]:
    """The context sizes measured: ``start``, then ``+step`` (or ``×multiplier``, rounded up) to ``stop``."""
    sizes = []
    size = start
    while size <= stop:
        sizes.append(size)
        size = math.ceil(size * multiplier) if multiplier else size + step
    return sizes


def run(args: argparse.Namespace) -> int:
    if args.ctx_start < 1 or args.ctx_max < args.ctx_start:
        raise CommandError("need 1 <= --ctx-start <= --ctx-max")
    if args.step_mul is not None and args.step_mul <= 1:
        raise CommandError("--step-mul must be more than 1")
    if args.step < 1 or args.gen_tokens < 1 or args.chunk < 1:
        raise CommandError("--step, --gen-tokens and --chunk must be at least 1")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise CommandError(f"--plot {args.plot}: give a .png file name")
    text = _read_text(args.text)
    path = model_path(args)
    model, tokenizer = open_model(path, device=args.device), open_tokenizer(path)
    tokens = [tokenizer.bos_id, *tokenizer.encode(text)]
    if args.ctx_max > len(tokens):
        source = args.text or BENCH_TEXT
        raise CommandError(
            f"{source} is {len(tokens)} tokens: --ctx-max must be at most that (or give a longer --text)"
        )
    sizes = frontiers(args.ctx_start, args.ctx_max, args.step, args.step_mul)

    rows = []
    with _output(args.csv) as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        out.flush()
        for row in measure(model, tokens, sizes, args.gen_tokens, tokenizer.eos_id, args.chunk):
            writer.writerow([row[0], f"{row[1]:.2f}", f"{row[2]:.2f}", row[3], row[4]])
            out.flush()
            rows.append(row)
    if args.plot is not None:
        plot(rows, args.plot, title=f"{path.name}, {args.gen_tokens} generated tokens per point")
    if args.csv is not None:
        print(f"wrote {args.csv}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


def measure(
    model: Model, tokens: list[int], sizes: list[int], gen_tokens: int, eos: int, chunk: int = PREFILL_CHUNK
) -> Iterator[tuple[int, float, float, int, int]]:
    """``(ctx, prefill_tps, gen_tps, kv_bytes, rss_bytes)`` at each frontier in ``sizes``."""
    import torch
    from tqdm import tqdm

    session = model.new_session()
    ids = torch.tensor(tokens, dtype=torch.long)
    no_eos = torch.tensor([eos])
    total = sizes[-1] + gen_tokens * len(sizes)
    with tqdm(total=total, desc="bench", unit="tok", disable=not sys.stderr.isatty()) as bar:
        done = 0
        for size in sizes:
            began = time.perf_counter()
            for start in range(done, size, chunk):
                logits = model.forward(ids[start : min(start + chunk, size)], session, all_logits=False)[0]
            prefill_s = time.perf_counter() - began
            bar.update(size - done)
            frontier = session.snapshot()

            began = time.perf_counter()
            for _ in range(gen_tokens):
                # EOS excluded: every frontier generates the same number of tokens.
                choice = logits.index_fill(0, no_eos, -math.inf).argmax().reshape(1)
                logits = model.forward(choice, session, all_logits=False)[0]
            gen_s = time.perf_counter() - began
            bar.update(gen_tokens)

            session.restore(frontier)  # the next frontier extends the text, not the generated tokens
            yield size, (size - done) / prefill_s, gen_tokens / gen_s, frontier.nbytes, _rss_bytes()
            done = size


def plot(rows: list[tuple[int, float, float, int, int]], path: Path, title: str) -> None:
    """Both speeds against context: prefill on the left axis, generation on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [row[0] for row in rows]
    figure, prefill_axis = plt.subplots(figsize=(9.6, 5.4), dpi=100)
    prefill_axis.plot(ctx, [row[1] for row in rows], "o-", color="tab:blue", label="prefill")
    prefill_axis.set_xlabel("context (tokens)")
    prefill_axis.set_ylabel("prefill (tokens/s)", color="tab:blue")
    prefill_axis.set_ylim(bottom=0)
    gen_axis = prefill_axis.twinx()
    gen_axis.plot(ctx, [row[2] for row in rows], "s-", color="tab:red", label="generation")
    gen_axis.set_ylabel("generation (tokens/s)", color="tab:red")
    gen_axis.set_ylim(bottom=0)
    prefill_axis.set_title(title)
    prefill_axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(figure)


def _read_text(path: Path | None) -> str:
    if path is None:
        from importlib.resources import files

        return files("dwarfstar").joinpath("data", BENCH_TEXT).read_text(encoding="utf-8")
    return read_text_file(path)


class _output:
    """The CSV destination: a file (written in place, row by row) or stdout."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __enter__(self) -> TextIO:
        if self.path is None:
            return sys.stdout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("w", encoding="utf-8", newline="")
        except OSError as err:
            raise CommandError(f"cannot write {self.path}: {err.strerror or err}") from None
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.file.close()


def _rss_bytes() -> int:
    """Resident memory of this process now (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            import os

            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
