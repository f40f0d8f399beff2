"""Importance-matrix files: llama.cpp's GGUF layout (checked with gguf-py) and its legacy .dat."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from dwarfstar.gguf.imatrix import Imatrix, ImatrixError, read_imatrix, write_imatrix


def sample() -> Imatrix:
    rng = np.random.default_rng(0)
    imatrix = Imatrix(datasets=["corpus.txt"], chunk_count=7, chunk_size=512)
    imatrix.add("blk.0.ffn_gate_exps.weight", rng.exponential(size=(4, 256)), np.array([3, 0, 5, 1]))
    imatrix.add("blk.0.attn_q_a.weight", rng.exponential(size=(1, 256)), np.array([12]))
    return imatrix


def test_gguf_layout_is_llama_cpps(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    imatrix = sample()
    write_imatrix(path, imatrix)
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["corpus.txt"]
    assert fields["imatrix.chunk_count"].contents() == 7
    assert fields["imatrix.chunk_size"].contents() == 512
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = tensors["blk.0.ffn_gate_exps.weight.in_sum2"], tensors["blk.0.ffn_gate_exps.weight.counts"]
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [256, 4] and list(counts.shape) == [1, 4]  # GGUF ne order
    np.testing.assert_allclose(np.array(counts.data).ravel(), [3, 0, 5, 1])
    np.testing.assert_allclose(
        np.array(sums.data), imatrix.sums["blk.0.ffn_gate_exps.weight"].astype(np.float32), rtol=0
    )


def test_round_trip_and_importance(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    original = sample()
    write_imatrix(path, original)
    read = read_imatrix(path)
    assert read.datasets == ["corpus.txt"] and read.chunk_count == 7 and read.chunk_size == 512
    importance = read.importance("blk.0.ffn_gate_exps.weight")
    sums = original.sums["blk.0.ffn_gate_exps.weight"].astype(np.float32)
    np.testing.assert_allclose(importance[0], sums[0] / 3, rtol=1e-6)
    np.testing.assert_array_equal(importance[1], 1.0)  # never routed: uniform, as llama.cpp does
    assert read.importance("blk.9.ffn_up_exps.weight") is None


def test_legacy_dat(tmp_path: Path) -> None:
    """ds4's published files: means times calls, one entry per weight, then chunks and dataset."""
    means = np.arange(1, 9, dtype=np.float32)
    name = b"blk.2.ffn_down_exps.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name
    data += struct.pack("<ii", 2, means.size) + (means * 2).tobytes()
    data += struct.pack("<i", 40) + struct.pack("<i", 9) + b"rendered!"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(data)
    read = read_imatrix(path)
    np.testing.assert_allclose(read.importance(name.decode())[0], means)
    assert read.chunk_count == 40 and read.datasets == ["rendered!"]


def test_not_an_imatrix(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text("hello")
    with pytest.raises(ImatrixError, match="not an imatrix"):
        read_imatrix(path)


def test_reads_a_file_laid_out_as_llama_imatrix_writes_it(tmp_path: Path) -> None:
    """Written by gguf-py with llama-imatrix's keys only (no general.architecture)."""
    path = tmp_path / "llama-imatrix.gguf"
    writer = gguf.GGUFWriter(path, arch="unused")
    for kv in writer.kv_data:
        kv.pop("general.architecture", None)
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["wiki.train.raw"])
    writer.add_uint32("imatrix.chunk_count", 5)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.full((4, 256), 3.0, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[3], [0], [1], [2]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = read_imatrix(path)
    assert read.datasets == ["wiki.train.raw"] and read.chunk_count == 5 and read.chunk_size == 512
    np.testing.assert_allclose(read.importance("blk.0.ffn_down_exps.weight")[:, 0], [1.0, 1.0, 3.0, 1.5])
