"""GGUFFile: metadata and memory-mapped tensors, and errors that name the file and the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from dwarfstar.gguf.reader import GGUFError, GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec
from dwarfstar.model.config import ConfigError, ModelConfig, load_config

RNG = np.random.default_rng(0)
VALUES = {
    "a.matrix": RNG.standard_normal((3, 64), dtype=np.float32),
    "b.half": RNG.standard_normal((2, 4), dtype=np.float32),
    "c.brain": RNG.standard_normal((2, 8), dtype=np.float32),
    "d.vector": RNG.standard_normal(5, dtype=np.float32),
    "e.table": np.arange(12, dtype=np.int32).reshape(4, 3),
    "f.last": RNG.standard_normal((4, 32), dtype=np.float32),
}
KINDS = {
    "a.matrix": T.Q8_0,
    "b.half": T.F16,
    "c.brain": T.BF16,
    "d.vector": T.F32,
    "e.table": T.I32,
    "f.last": T.F32,
}


def stored(name: str) -> np.ndarray:
    return VALUES[name] if KINDS[name] == T.I32 else quantize(VALUES[name], KINDS[name])


def write_sample(path: Path, metadata: dict | None = None) -> Path:
    metadata = {"general.architecture": "deepseek4", "x.count": 7, "x.list": ["a", "b"], **(metadata or {})}
    specs = [TensorSpec(name, KINDS[name], VALUES[name].shape) for name in VALUES]
    with GGUFFileWriter(path, metadata, specs) as writer:
        for name in VALUES:
            writer.write_tensor(name, stored(name))
    return path


def test_reads_metadata_and_tensors_as_views(tmp_path: Path) -> None:
    f = GGUFFile(write_sample(tmp_path / "m.gguf"))
    assert f.metadata == {
        "general.architecture": "deepseek4",
        "general.alignment": 32,
        "x.count": 7,
        "x.list": ["a", "b"],
    }
    assert f.alignment == 32
    assert list(f.tensors) == list(VALUES)
    for name, info in f.tensors.items():
        assert info.name == name
        assert info.kind == KINDS[name]
        assert info.shape == VALUES[name].shape
        np.testing.assert_array_equal(info.data, stored(name))
        assert info.data.dtype == stored(name).dtype
        # a view into the mapped file, not a copy
        assert not info.data.flags.owndata
        assert not info.data.flags.writeable


def test_agrees_with_gguf_py(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "m.gguf", {"y.flag": True, "y.ratio": 0.25, "y.ints": [0, 4, 128]})
    ours = GGUFFile(path)
    theirs = gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.data.shape == t.data.shape and info.data.dtype == t.data.dtype
        np.testing.assert_array_equal(info.data, t.data)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + bytes(64))
    with pytest.raises(GGUFError, match=r"model\.safetensors: not a GGUF file"):
        GGUFFile(path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"GGUF\x03"])
def test_too_short_to_be_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="short.gguf: not a GGUF file"):
        GGUFFile(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="absent.gguf: no such file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


def test_a_path_that_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match=r"file/m\.gguf: cannot open it \(Not a directory\)"):
        GGUFFile(tmp_path / "file" / "m.gguf")


def test_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sample(tmp_path / "m.gguf")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    # the tests may run as root, for whom permission bits do not refuse anything
    monkeypatch.setattr("dwarfstar.gguf.reader.open", refuse, raising=False)
    with pytest.raises(GGUFError, match=r"m\.gguf: cannot open it \(Permission denied\)"):
        GGUFFile(path)


@pytest.mark.parametrize("version", [1, 2, 4])
def test_other_versions_are_refused(tmp_path: Path, version: int) -> None:
    path = write_sample(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=f"m.gguf: unsupported GGUF version {version} "):
        GGUFFile(path)


def test_truncated_tensor_is_named_with_the_missing_bytes(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "m.gguf")
    last = gguf.GGUFReader(path).tensors[-1]  # f.last, per gguf-py's own parse
    end = last.data_offset + last.n_bytes
    cut = end - 100
    path.write_bytes(path.read_bytes()[:cut])
    message = r"m\.gguf: truncated file: tensor 'f\.last' .* \(100 bytes missing\)"
    with pytest.raises(GGUFError, match=message):
        GGUFFile(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(GGUFError, match=r"m\.gguf: truncated file: the header"):
        GGUFFile(path)


def test_unknown_tensor_type(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    type_at = tensor_entry_field(data, b"b.half", "type")
    assert struct.unpack_from("<I", data, type_at)[0] == T.F16
    data[type_at : type_at + 4] = struct.pack("<I", 99)
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=r"m\.gguf: tensor 'b\.half' has unknown type id 99"):
        GGUFFile(path)


def tensor_entry_field(data: bytearray, name: bytes, field: str) -> int:
    """Where ``field`` (type or offset) of tensor ``name``'s directory entry sits in the file.

    An entry is: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset u64.
    """
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    return {"type": type_at, "offset": type_at + 4}[field]


def test_misaligned_tensor_data(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    offset_at = tensor_entry_field(data, b"e.table", "offset")
    (offset,) = struct.unpack_from("<Q", data, offset_at)
    assert offset % 32 == 0
    data[offset_at : offset_at + 8] = struct.pack("<Q", offset + 4)  # still inside the file
    path.write_bytes(data)
    message = (
        rf"m\.gguf: tensor 'e\.table' starts at data offset {offset + 4}, not a multiple of the alignment 32"
    )
    with pytest.raises(GGUFError, match=message):
        GGUFFile(path)


def test_load_config_names_the_file_on_a_wrong_architecture(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "llama.gguf", {"general.architecture": "llama"})
    message = r"llama\.gguf: general\.architecture is 'llama', expected 'deepseek4'"
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_load_config_reads_a_deepseek4_file(tmp_path: Path) -> None:
    # floats exact in float32, the type they are stored with
    eps = 2.0**-20
    config = ModelConfig(
        n_layer=2,
        n_hash_layer=1,  # no more hash-routed layers than layers
        dim=64,
        hc_eps=eps,
        rms_eps=eps,
        compress_ratios=(0, 4),
        swiglu_limit=(10.0, 7.0),
    )
    path = write_sample(tmp_path / "m.gguf", config.to_metadata())
    assert load_config(path) == config
    assert load_config(GGUFFile(path)) == config
