"""What the model-running commands share: which model to open, token files, prefill with progress."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from dwarfstar.cli.main import CommandError

if TYPE_CHECKING:
    import torch

    from dwarfstar.model.model import Model
    from dwarfstar.model.state import Session
    from dwarfstar.tokenizer import Tokenizer

DEFAULT_MODEL = Path("ds4flash.gguf")  # `ds4 download` points this link at the model it fetched
T = TypeVar("T")
# Bounds a chunk's activations and logits (docs/model.md says how close chunkings are).
PREFILL_CHUNK = 512
GET_A_MODEL = "get the model with `ds4 download q2-imatrix` (~81 GB; q4-imatrix for 256 GB machines)"


def add_model_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``-m FILE`` or ``--demo``: which model a command opens; ``--device``: where it runs."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-m", "--model", type=Path, help=f"GGUF model file (default: ./{DEFAULT_MODEL})")
    which.add_argument(
        "--demo",
        action="store_true",
        help="a small random-weight model of the real architecture, built once in the user's cache "
        "directory: it shows the whole path running, its output is noise",
    )
    if device:
        parser.add_argument(
            "--device",
            choices=("cpu", "cuda", "mps"),
            help="where the model runs (default: the best available: cuda, then mps, then cpu); the "
            "weights are copied there once at load",
        )


def model_path(args: argparse.Namespace) -> Path:
    """The model file the user asked for (building the demo if asked), or an error saying how to get one."""
    if args.demo:
        from dwarfstar.synthetic import demo_model_path

        try:
            return demo_model_path()
        except OSError as err:
            raise CommandError(f"cannot build the demo model: {err.strerror or err}") from None
    path = args.model or DEFAULT_MODEL
    if path.is_dir():
        raise CommandError(f"{path} is a directory, not a GGUF model file")
    if not path.exists():
        if args.model is None:
            raise CommandError(f"no model file ./{DEFAULT_MODEL}: {GET_A_MODEL}, give -m FILE, or try --demo")
        raise CommandError(f"{path}: no such model file ({GET_A_MODEL})")
    return path


def open_model(path: Path, quant_sim: bool | None = None, device: str | None = None) -> Model:
    """Memory-map and bind the model, on ``device`` (None: the best available); a file that is
    not a V4 Flash GGUF, or a device that cannot hold it, is a ``CommandError``."""
    from dwarfstar.model.model import Model

    model = _opening(path, lambda: Model.load(path, quant_sim=quant_sim, device=device))
    for note in model.weights.notes:  # e.g. the MTP block it skipped
        print(f"note: {note}", file=sys.stderr)
    return model


def open_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer embedded in the model file."""
    from dwarfstar.tokenizer import Tokenizer

    return _opening(path, lambda: Tokenizer.from_gguf(path))


def _opening(path: Path, load: Callable[[], T]) -> T:
    from dwarfstar.gguf.reader import GGUFError
    from dwarfstar.model.config import ConfigError
    from dwarfstar.model.device import DeviceError
    from dwarfstar.model.weights import WeightsError

    try:
        return load()
    except (GGUFError, ConfigError, WeightsError, DeviceError) as err:
        raise CommandError(str(err)) from None
    except (ValueError, KeyError) as err:
        raise CommandError(f"{path}: not a usable DeepSeek V4 Flash GGUF ({err})") from None
    except OSError as err:
        raise CommandError(f"{path}: cannot read it ({err.strerror or err})") from None


def read_text_file(path: Path) -> str:
    """A UTF-8 text file the user named, or a clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise CommandError(f"{path}: cannot read it ({err.strerror or err})") from None


def read_token_file(path: Path) -> list[int]:
    """A JSON file holding a non-empty list of token ids."""
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except OSError as err:
        raise CommandError(f"{path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommandError(f"{path}: not valid JSON ({err})") from None
    # JSON true/false are Python bools, which are ints: refuse them by type.
    if not isinstance(tokens, list) or not tokens or not all(type(t) is int for t in tokens):
        raise CommandError(f"{path}: expected a non-empty JSON list of integer token ids")
    return tokens


def check_token_ids(tokens: Sequence[int], vocab_size: int) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise CommandError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")


def prefill(
    model: Model, tokens: Sequence[int], session: Session, chunk: int = PREFILL_CHUNK, desc: str = "prefill"
) -> torch.Tensor:
    """Feed ``tokens`` in chunks (a progress bar on a terminal); the last position's logits (vocab,)."""
    import torch
    from tqdm import tqdm

    ids = torch.tensor(list(tokens), dtype=torch.long)
    with tqdm(total=len(ids), desc=desc, unit="tok", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(ids), chunk):
            logits = model.forward(ids[start : start + chunk], session, all_logits=False)
            bar.update(min(chunk, len(ids) - start))
    return logits[0]
