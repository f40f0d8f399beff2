"""``ds4 quantize``: a checkpoint directory or a GGUF file -> a GGUF in ds4's tensor mix.

Tensors are read, quantized and written one at a time, stacked experts one expert at a time, so
memory stays bounded by one expert matrix (plus the source's mmap pages, which the OS reclaims),
whatever the model's size. The output is written to ``OUT.part`` and renamed when complete; an
error or an interrupt removes it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from dwarfstar.convert.checkpoint import Checkpoint, CheckpointError
from dwarfstar.convert.converter import PlannedTensor, gguf_metadata, leftovers, plan_tensors
from dwarfstar.convert.hf_config import CheckpointConfigError, read_checkpoint_config
from dwarfstar.convert.recipe import FILE_TYPES, TensorMix
from dwarfstar.gguf.imatrix import Imatrix
from dwarfstar.gguf.names import ARCH
from dwarfstar.gguf.reader import GGUFError
from dwarfstar.gguf.shards import SPLIT_KEYS, GGUFModel
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec
from dwarfstar.quant import QTensor, dequantize, quantize
from dwarfstar.quant.quantizers import SEARCHED_KINDS
from dwarfstar.tokenizer import deepseek_tokenizer_json, gguf_tokenizer_metadata

# Keys of the source's metadata that describe its own storage, not the model.
_STORAGE_KEYS = ("general.file_type", "general.quantization_version")
# Values dequantized at a time from a 2-D GGUF tensor (64 MiB of float32): the vocabulary-sized
# embedding and head would otherwise take 2 GiB each.
_BAND_VALUES = 1 << 24
IMATRIX_KEYS = (
    "quantize.imatrix.file",
    "quantize.imatrix.dataset",
    "quantize.imatrix.entries_count",
    "quantize.imatrix.chunks_count",
)


class QuantizeError(ValueError):
    """The source cannot be quantized; the message says which file or tensor and why."""


@dataclass
class TensorReport:
    """One tensor against the source: RMSE (importance-weighted if ``weighted``) and the source's RMS."""

    name: str
    kind: T
    values: int
    nbytes: int
    rmse: float
    rms: float
    weighted: bool


@dataclass
class Quantization:
    path: Path
    tensors: int
    nbytes: int  # tensor data
    values: int
    peak_rss: int  # bytes
    notes: list[str] = field(default_factory=list)
    report: list[TensorReport] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.values, 1)


@dataclass(frozen=True)
class Plan:
    """What will be written: metadata and tensors (kinds decided), and notes for the user."""

    metadata: dict[str, object]
    tensors: list[PlannedTensor]
    notes: list[str]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (each tensor padded to the alignment)."""
        return sum(-(-t.spec.nbytes // 32) * 32 for t in self.tensors)

    @property
    def file_nbytes(self) -> int:
        """The expected file size: the tensors, the tensor directory and the metadata (the vocabulary)."""
        directory = sum(len(t.spec.name) + 48 for t in self.tensors)
        return self.nbytes + directory + sum(len(k) + 12 + _value_nbytes(v) for k, v in self.metadata.items())


def _value_nbytes(value: object) -> int:
    if isinstance(value, str):
        return 8 + len(value.encode())
    if isinstance(value, list | tuple):
        return 12 + sum(_value_nbytes(v) for v in value)
    return 8


def plan_quantization(
    source: Path, mix: TensorMix, imatrix: Imatrix | None, imatrix_name: str | None, stack: ExitStack
) -> Plan:
    """The plan for a checkpoint directory or a GGUF file (shards allowed); ``stack`` keeps files open."""
    if source.is_dir():
        metadata, tensors, notes = _checkpoint_plan(source, mix, stack)
    elif source.is_file():
        metadata, tensors, notes = _gguf_plan(source, mix)
    else:
        raise QuantizeError(f"{source}: no such file or directory")
    metadata["general.file_type"] = int(FILE_TYPES[mix.recipe])
    metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    if imatrix is not None:
        used = [t.spec.name for t in tensors if t.spec.kind in SEARCHED_KINDS and t.spec.name in imatrix.sums]
        metadata["quantize.imatrix.file"] = imatrix_name or ""
        metadata["quantize.imatrix.dataset"] = imatrix.datasets[0] if imatrix.datasets else ""
        metadata["quantize.imatrix.entries_count"] = len(used)
        metadata["quantize.imatrix.chunks_count"] = imatrix.chunk_count
        missing = [
            t.spec.name for t in tensors if t.spec.kind in SEARCHED_KINDS and t.spec.name not in imatrix.sums
        ]
        if missing:
            notes.append(
                f"the imatrix has no entry for {len(missing)} tensors (e.g. {missing[0]}); quantized without"
            )
    return Plan(metadata, tensors, notes + mix.fallbacks)


def _checkpoint_plan(
    directory: Path, mix: TensorMix, stack: ExitStack
) -> tuple[dict, list[PlannedTensor], list[str]]:
    try:
        config = read_checkpoint_config(directory / "config.json")
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            tokenizer_json = deepseek_tokenizer_json()
        tokenizer = gguf_tokenizer_metadata(tokenizer_json, vocab_size=config.model.vocab_size)
        metadata = gguf_metadata(config, directory.resolve().name, T.Q8_0, tokenizer)
        checkpoint = stack.enter_context(Checkpoint(directory, config.fp8_block))
        tensors = plan_tensors(config, checkpoint, mix.kind)
        skipped = leftovers(checkpoint, tensors)
    except (CheckpointConfigError, CheckpointError) as err:
        raise QuantizeError(str(err)) from None
    notes = [f"skipped {len(skipped)} multi-token-prediction tensors (mtp.*)"] if skipped else []
    return metadata, tensors, notes


def _gguf_plan(path: Path, mix: TensorMix) -> tuple[dict, list[PlannedTensor], list[str]]:
    try:
        model = GGUFModel(path)
    except GGUFError as err:
        raise QuantizeError(str(err)) from None
    if model.metadata.get("general.architecture") != ARCH:
        raise QuantizeError(f"{path}: not a DeepSeek V4 model (general.architecture is not {ARCH!r})")
    skip = (*SPLIT_KEYS, *_STORAGE_KEYS, *IMATRIX_KEYS)
    metadata = {k: v for k, v in model.metadata.items() if k not in skip}
    tensors = []
    for name, info in model.tensors.items():
        kind = info.kind if info.kind == T.I32 else mix.kind(name, info.shape)
        tensors.append(PlannedTensor(TensorSpec(name, kind, info.shape), _gguf_values(info), (name,)))
    return metadata, tensors, []


def _gguf_values(info: object) -> Callable[[], Iterator[np.ndarray]]:
    """A GGUF tensor's float32 values, a matrix (one expert) at a time; big matrices in row bands."""

    def values() -> Iterator[np.ndarray]:
        if info.kind == T.I32:
            yield np.asarray(info.data)
            return
        if len(info.shape) < 2:
            yield dequantize(QTensor.from_numpy(info.kind, info.shape, np.asarray(info.data))).numpy()
            return
        cols = info.shape[-1]
        band = max(1, _BAND_VALUES // cols)
        for stored in info.data.reshape(-1, *info.data.shape[-2:]):
            for start in range(0, stored.shape[0], band):
                rows = np.asarray(stored[start : start + band])
                yield dequantize(QTensor.from_numpy(info.kind, (rows.shape[0], cols), rows)).numpy()

    return values


def quantize_model(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    mix: TensorMix,
    *,
    imatrix: Imatrix | None = None,
    imatrix_name: str | None = None,
    threads: int = 1,
    report: bool = False,
    progress: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
) -> Quantization:
    """Quantize ``source`` to ``out_path`` in ``mix``; ``on_plan`` sees the plan before writing starts."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise QuantizeError(f"{out.parent}: no such directory for the output file")
    partial = out.with_name(out.name + ".part")
    for path in (out, partial):
        if path.is_dir():
            raise QuantizeError(f"{path}: is a directory; give a file name for the output")
    reports: list[TensorReport] = []
    try:
        with ExitStack() as stack:
            plan = plan_quantization(Path(source), mix, imatrix, imatrix_name, stack)
            if on_plan is not None:
                on_plan(plan)
            total = sum(int(np.prod(t.spec.shape)) for t in plan.tensors)
            bar = stack.enter_context(tqdm(total=total, unit="w", unit_scale=True, disable=not progress))
            with GGUFFileWriter(partial, plan.metadata, [t.spec for t in plan.tensors]) as writer:
                for item in plan.tensors:
                    bar.set_description(item.spec.name)
                    importance = imatrix.importance(item.spec.name) if imatrix is not None else None
                    parts = _encoded(item, importance, threads, reports if report else None, bar)
                    writer.write_tensor(item.spec.name, parts)
        partial.replace(out)
    except (CheckpointError, GGUFError) as err:
        raise QuantizeError(str(err)) from None
    except OSError as err:  # an unwritable output or a full disk, mostly
        raise QuantizeError(f"{err.filename or partial}: {err.strerror or err}") from None
    finally:
        partial.unlink(missing_ok=True)  # gone already when the quantization succeeded
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Quantization(out, len(plan.tensors), plan.nbytes, total, peak, plan.notes, reports)


def _encoded(
    item: PlannedTensor,
    importance: np.ndarray | None,
    threads: int,
    reports: list[TensorReport] | None,
    bar: tqdm,
) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor, a matrix at a time; its error added to ``reports`` if given."""
    kind = item.spec.kind
    shape = item.spec.shape
    if importance is not None and (
        importance.shape[-1] != shape[-1] or importance.shape[0] not in (1, shape[0])
    ):
        raise QuantizeError(
            f"imatrix entry for {item.spec.name} has shape {importance.shape}, not for {shape}"
        )
    use = importance if kind in SEARCHED_KINDS else None
    squared = weights = power = 0.0
    count = 0
    rows_per_matrix = item.spec.shape[-2] if len(item.spec.shape) > 1 else 1
    row = 0
    for values in item.values():
        index = row // rows_per_matrix  # the expert these rows belong to (0 for a 2-D tensor)
        row += values.shape[0] if values.ndim > 1 else 1
        matrix_importance = None if use is None else use[index if use.shape[0] > 1 else 0]
        stored = (
            values.astype(np.int32) if kind == T.I32 else quantize(values, kind, matrix_importance, threads)
        )
        if reports is not None and kind != T.I32:
            decoded = dequantize(QTensor.from_numpy(kind, values.shape, stored)).numpy()
            w = 1.0 if importance is None else importance[index if importance.shape[0] > 1 else 0]
            w = np.broadcast_to(w, values.shape)
            squared += float(np.sum(w * (decoded - values) ** 2, dtype=np.float64))
            weights += float(np.sum(w, dtype=np.float64))
            power += float(np.sum(np.square(values, dtype=np.float64)))
            count += values.size
        bar.update(values.size)
        yield stored
    if reports is not None and kind != T.I32:
        reports.append(
            TensorReport(
                item.spec.name,
                kind,
                count,
                item.spec.nbytes,
                float(np.sqrt(squared / max(weights, 1e-30))),
                float(np.sqrt(power / max(count, 1))),
                importance is not None,
            )
        )
