"""``ds4 quantize``: a checkpoint directory or GGUF file to a GGUF in ds4's 2/4/8-bit tensor mix."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dwarfstar.cli.main import CommandError

RECIPES = ("q2", "q4", "q8")  # dwarfstar.convert.recipe.RECIPES, without importing numba here


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a checkpoint or GGUF to ds4's 2/4/8-bit tensor mix",
        description=(
            "Quantize a DeepSeek V4 checkpoint directory (what `ds4 convert` reads) or a GGUF file "
            "(F32/F16/BF16/Q8_0, single or split) to ds4's published tensor mix: routed experts per "
            "--recipe (q2: IQ2_XXS gate/up and Q2_K down; q4: Q4_K; q8: Q8_0), attention projections, "
            "shared expert and output head Q8_0, embedding, hyper-connections, compressors, indexer "
            "and router F16, vectors F32. Tensors are streamed one at a time (experts one by one); "
            "the file appears only when complete."
        ),
    )
    parser.add_argument("source", type=Path, metavar="SRC", help="checkpoint directory or GGUF file")
    parser.add_argument("output", type=Path, metavar="OUT.gguf", help="GGUF file to write")
    parser.add_argument("--recipe", choices=RECIPES, default="q2", help="routed-expert types (default: q2)")
    parser.add_argument(
        "--type-override",
        action="append",
        default=[],
        metavar="NAME_GLOB=TYPE",
        help="store matrices whose GGUF name matches the glob in TYPE (f32, f16, bf16, q8_0, q4_k, q2_k, "
        "iq2_xxs); repeatable, the first match wins, e.g. 'blk.4[0-2].ffn_*_exps.weight=q4_k'",
    )
    parser.add_argument(
        "--imatrix", type=Path, metavar="FILE", help="importance matrix (llama.cpp GGUF or .dat)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="quantizer threads (default: all cores)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print each tensor's RMSE against the source (importance-weighted with --imatrix) "
        "and the bits per weight",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dwarfstar.convert.quantize_model import QuantizeError, quantize_model
    from dwarfstar.convert.recipe import RecipeError, TensorMix, parse_override
    from dwarfstar.gguf.imatrix import ImatrixError, read_imatrix

    if args.threads < 1:
        raise CommandError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        mix = TensorMix(args.recipe, [parse_override(text) for text in args.type_override])
        imatrix = read_imatrix(args.imatrix) if args.imatrix else None
        result = quantize_model(
            args.source,
            args.output,
            mix,
            imatrix=imatrix,
            imatrix_name=str(args.imatrix) if args.imatrix else None,
            threads=args.threads,
            report=args.report,
            progress=sys.stderr.isatty(),
            on_plan=lambda plan: print(
                f"{args.source} -> {args.output}: {len(plan.tensors)} tensors, recipe {args.recipe}, "
                f"expected size {human_size(plan.file_nbytes)}",
                file=sys.stderr,
            ),
        )
    except (QuantizeError, RecipeError, ImatrixError) as err:
        raise CommandError(str(err)) from None
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.report:
        print_report(result)
    size = result.path.stat().st_size
    print(
        f"wrote {result.path} ({result.tensors} tensors, {human_size(size)}, "
        f"{result.bits_per_weight:.3f} bits per weight, peak memory {result.peak_rss / 2**20:.0f} MiB)",
        file=sys.stderr,
    )
    return 0


def human_size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def print_report(result: object) -> None:
    """One line per tensor on stdout: name, type, bits per weight, RMSE, RMSE relative to the source's RMS."""
    print(f"{'tensor':<40} {'type':<8} {'bpw':>6} {'rmse':>11} {'rel':>8}")
    for r in result.report:
        bpw = 8 * r.nbytes / max(r.values, 1)
        relative = r.rmse / r.rms if r.rms > 0 else 0.0
        mark = " (imatrix-weighted)" if r.weighted else ""
        print(f"{r.name:<40} {r.kind.name:<8} {bpw:>6.3f} {r.rmse:>11.4e} {relative:>8.4f}{mark}")
    print(f"file: {result.bits_per_weight:.4f} bits per weight over {result.values} weights")
