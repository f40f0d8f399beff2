"""``ds4 convert``: a DeepSeek V4 checkpoint directory to a GGUF file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dwarfstar.cli.main import CommandError

TYPES = ("f32", "f16", "bf16", "q8_0")  # dwarfstar.convert.OUTPUT_TYPES, without importing torch here


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face / DeepSeek checkpoint to GGUF",
        description=(
            "Convert a DeepSeek V4 checkpoint directory (config.json and safetensors, in the transformers "
            "layout or DeepSeek's FP8/FP4 release layout) to one GGUF file with ds4's tensor names and "
            "metadata. llama.cpp and DwarfStar open it; ds4 itself also needs its type mix (Q8_0 "
            "attention, F16 compressor and indexer, 2-4 bit experts), which the quantizer (a later "
            "feature) will produce. Matrices take --type; norms, biases and other vectors stay float32."
        ),
    )
    parser.add_argument("checkpoint", type=Path, metavar="HF_DIR", help="checkpoint directory")
    parser.add_argument("output", type=Path, metavar="OUT.gguf", help="GGUF file to write")
    parser.add_argument(
        "--type",
        choices=TYPES,
        default="bf16",
        help="storage type of every matrix (default: bf16, exact for DeepSeek's FP8/FP4 weights)",
    )
    parser.add_argument("--name", help="general.name of the model (default: the directory's name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dwarfstar.convert import ConvertError, convert_checkpoint

    try:
        result = convert_checkpoint(
            args.checkpoint, args.output, args.type, name=args.name, progress=sys.stderr.isatty()
        )
    except ConvertError as err:
        raise CommandError(str(err)) from None
    if result.skipped:
        print(
            f"note: skipped {len(result.skipped)} multi-token-prediction tensors (mtp.*); "
            "MTP is not converted yet",
            file=sys.stderr,
        )
    size = result.path.stat().st_size / 2**30
    print(f"wrote {result.path} ({result.tensors} tensors, {size:.2f} GiB)", file=sys.stderr)
    return 0
