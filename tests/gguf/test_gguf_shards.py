"""GGUFModel: one file, or llama.cpp's split files opened from any shard, with errors that name
the missing or mismatched shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from models import split_gguf

from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.shards import GGUFModel
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec
from dwarfstar.quant import QTensor, dequantize

RNG = np.random.default_rng(0)
VALUES = {f"t{i}.weight": RNG.standard_normal((i + 1, 32), dtype=np.float32) for i in range(7)}
METADATA = {"general.architecture": "deepseek4", "x.count": 7, "x.names": ["a", "b"]}


def write_single(path: Path) -> Path:
    specs = [TensorSpec(name, 0, values.shape) for name, values in VALUES.items()]
    with GGUFFileWriter(path, METADATA, specs) as writer:
        for name, values in VALUES.items():
            writer.write_tensor(name, values)
    return path


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return split_gguf(write_single(tmp_path / "m.gguf"), tmp_path / "split", 3)


def assert_whole_model(model: GGUFModel) -> None:
    assert {k: v for k, v in model.metadata.items() if k != "general.alignment"} == METADATA
    assert list(model.tensors) == list(VALUES)
    for name, values in VALUES.items():
        info = model.tensors[name]
        np.testing.assert_array_equal(
            dequantize(QTensor.from_numpy(info.kind, info.shape, info.data)), values
        )


def test_a_single_file_is_a_set_of_one(tmp_path: Path) -> None:
    model = GGUFModel(write_single(tmp_path / "m.gguf"))
    assert len(model.shards) == 1 and model.path == tmp_path / "m.gguf"
    assert_whole_model(model)


@pytest.mark.parametrize("given", [0, 1, 2])
def test_any_shard_opens_every_shard(shards: list[Path], given: int) -> None:
    assert [p.name for p in shards] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    model = GGUFModel(shards[given])
    assert [s.path for s in model.shards] == shards
    assert model.path == shards[0]
    assert sorted(set(model.shard_of.values())) == [0, 1, 2]
    assert_whole_model(model)
    # the tensors stay views of each shard's own mapping
    for name, index in model.shard_of.items():
        assert name in model.shards[index].tensors


def test_a_missing_shard_is_named(shards: list[Path]) -> None:
    shards[1].unlink()
    with pytest.raises(GGUFError, match=r"split into 3 files and 1 are missing .*m-00002-of-00003\.gguf"):
        GGUFModel(shards[0])


def test_a_shard_of_another_split_is_named(tmp_path: Path, shards: list[Path]) -> None:
    other = split_gguf(write_single(tmp_path / "o.gguf"), tmp_path / "other", 3)
    shutil.copy(other[0], shards[2])  # shard 1 of another set, renamed as shard 3 of this one
    with pytest.raises(
        GGUFError, match=r"m-00003-of-00003\.gguf: split\.no / split\.count are 0 / 3, expected 2 / 3"
    ):
        GGUFModel(shards[0])


def test_a_shard_that_cannot_find_its_siblings(tmp_path: Path, shards: list[Path]) -> None:
    renamed = shards[1].rename(tmp_path / "renamed.gguf")
    with pytest.raises(GGUFError, match="its name does not follow NAME-00001-of-000NN.gguf"):
        GGUFModel(renamed)


def test_tensor_count_and_duplicates_are_checked(tmp_path: Path) -> None:
    """Shards written by hand: the first claims more tensors than there are, then a duplicate."""

    def write(path: Path, number: int, names: list[str], total: int) -> None:
        writer = GGUFWriter(path, "deepseek4")
        writer.add_uint16("split.no", number)
        writer.add_uint16("split.count", 2)
        writer.add_int32("split.tensors.count", total)
        for name in names:
            writer.add_tensor(name, VALUES[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    first, second = tmp_path / "h-00001-of-00002.gguf", tmp_path / "h-00002-of-00002.gguf"
    write(first, 0, ["t0.weight"], 3)
    write(second, 1, ["t1.weight"], 3)
    with pytest.raises(GGUFError, match="the 2 shards hold 2 tensors, split.tensors.count says 3"):
        GGUFModel(second)
    write(second, 1, ["t0.weight"], 2)
    with pytest.raises(GGUFError, match="tensor 't0.weight' is also in h-00001-of-00002.gguf"):
        GGUFModel(first)


def test_shards_are_plain_gguf_files(shards: list[Path]) -> None:
    """Each shard also opens alone, with its split keys; only the first has the model's metadata."""
    first, last = GGUFFile(shards[0]), GGUFFile(shards[2])
    assert first.metadata["split.no"] == 0 and last.metadata["split.no"] == 2
    assert first.metadata["x.count"] == 7 and "x.count" not in last.metadata
