"""GGUFFileWriter: metadata with the GGUF types ds4 and llama.cpp read, tensors streamed in order."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.gguf import writer as writer_module
from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.gguf.writer import GGUFFileWriter, TensorSpec

# key -> (value, GGUF type, array element type), as llama.cpp's deepseek4 loader and ds4 expect them
TYPED = {
    "deepseek4.block_count": (43, V.UINT32, None),
    "deepseek4.rope.scaling.original_context_length": (65536, V.UINT32, None),
    "deepseek4.expert_gating_func": (4, V.UINT32, None),
    "deepseek4.expert_weights_scale": (1.5, V.FLOAT32, None),
    "deepseek4.expert_weights_norm": (True, V.BOOL, None),
    "deepseek4.attention.compress_ratios": ([0, 0, 4, 128], V.ARRAY, V.INT32),
    "deepseek4.swiglu_clamp_exp": ([10.0, 10.0, 10.0, 10.0], V.ARRAY, V.FLOAT32),
    "deepseek4.rope.scaling.type": ("yarn", V.STRING, None),
    "tokenizer.ggml.tokens": (["<s>", "a", "b"], V.ARRAY, V.STRING),
    "tokenizer.ggml.token_type": ([3, 1, 1], V.ARRAY, V.INT32),
    "tokenizer.ggml.bos_token_id": (0, V.UINT32, None),
    "some.signed": (-3, V.INT32, None),
    "some.large": (2**40, V.UINT64, None),
}


def write(path: Path, metadata: dict, tensors: dict[str, tuple[T, np.ndarray]] | None = None) -> Path:
    tensors = tensors or {}
    specs = [TensorSpec(name, kind, values.shape) for name, (kind, values) in tensors.items()]
    with GGUFFileWriter(path, {"general.architecture": "deepseek4", **metadata}, specs) as writer:
        for name, (kind, values) in tensors.items():
            writer.write_tensor(name, quantize(values, kind))
    return path


def test_metadata_types(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", {key: value for key, (value, _, _) in TYPED.items()})
    fields = gguf.GGUFReader(path).fields
    for key, (value, vtype, element) in TYPED.items():
        assert fields[key].types == ([vtype, element] if element else [vtype]), key
        assert fields[key].contents() == value, key
    assert fields["general.alignment"].types == [V.UINT32]
    assert GGUFFile(path).metadata == {
        "general.architecture": "deepseek4",
        "general.alignment": 32,
        **{key: value for key, (value, _, _) in TYPED.items()},
    }


def test_numpy_scalars_and_tuples_are_stored_as_plain_values(tmp_path: Path) -> None:
    path = write(tmp_path / "m.gguf", {"a.n": np.int64(5), "a.f": np.float32(0.5), "a.t": (1, 2)})
    fields = gguf.GGUFReader(path).fields
    assert fields["a.n"].types == [V.UINT32] and fields["a.n"].contents() == 5
    assert fields["a.f"].types == [V.FLOAT32] and fields["a.f"].contents() == 0.5
    assert fields["a.t"].types == [V.ARRAY, V.INT32] and fields["a.t"].contents() == [1, 2]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([], ValueError, "a.key: an empty array"),
        (None, TypeError, "a.key: cannot store a NoneType"),
        ([1, 2.5], ValueError, "a.key: array items of mixed types"),
        ([[1], [2]], ValueError, "a.key: nested arrays"),
        ([2**31], ValueError, "a.key: .* does not fit its GGUF type"),
        (1e300, ValueError, "a.key: .* does not fit its GGUF type"),
    ],
)
def test_unstorable_metadata_is_refused(tmp_path: Path, value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        write(tmp_path / "m.gguf", {"a.key": value})
    assert not (tmp_path / "m.gguf").exists()


scalar = st.one_of(
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.floats(width=32, allow_nan=False),
    st.text(max_size=20),
)
array = st.one_of(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8),
    st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=8),
    st.lists(st.text(max_size=8), min_size=1, max_size=8),
    st.lists(st.booleans(), min_size=1, max_size=8),
)


keys = st.from_regex(r"[a-z]{1,8}\.[a-z_]{1,12}", fullmatch=True).filter(
    lambda k: not k.startswith("general.")
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(keys, scalar | array, max_size=6))
def test_metadata_round_trip(tmp_path_factory: pytest.TempPathFactory, metadata: dict) -> None:
    path = write(tmp_path_factory.mktemp("rt") / "m.gguf", metadata)
    read = GGUFFile(path).metadata
    assert read == {"general.architecture": "deepseek4", "general.alignment": 32, **metadata}


def test_tensors_stream_in_parts_and_start_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    experts = rng.standard_normal((3, 4, 64), dtype=np.float32)
    vector = rng.standard_normal(7, dtype=np.float32)
    specs = [TensorSpec("v", T.F32, (7,)), TensorSpec("exps", T.Q8_0, (3, 4, 64))]
    path = tmp_path / "m.gguf"
    with GGUFFileWriter(path, {"general.architecture": "x", "general.alignment": 64}, specs) as writer:
        writer.write_tensor("v", vector)
        writer.write_tensor("exps", (quantize(e, T.Q8_0) for e in experts))
    reader = gguf.GGUFReader(path)
    assert reader.alignment == 64
    assert all(t.data_offset % 64 == 0 for t in reader.tensors)
    assert path.stat().st_size % 64 == 0  # padded to the end, as gguf-py pads
    f = GGUFFile(path)
    np.testing.assert_array_equal(f.tensors["v"].data, vector)
    np.testing.assert_array_equal(f.tensors["exps"].data, quantize(experts, T.Q8_0))
    assert f.tensors["exps"].shape == (3, 4, 64)


def test_writes_must_follow_the_declaration(tmp_path: Path) -> None:
    specs = [TensorSpec("a", T.F32, (4,)), TensorSpec("b", T.F32, (2,))]
    four = np.zeros(4, dtype=np.float32)
    path = tmp_path / "m.gguf"

    def writer(declared: list[TensorSpec] = specs) -> GGUFFileWriter:
        return GGUFFileWriter(path, {"general.architecture": "x"}, declared)

    with pytest.raises(ValueError, match="'b' written out of order: 'a' comes next"), writer() as w:
        w.write_tensor("b", four[:2])
    assert not path.exists()  # a failed write leaves no file behind
    with pytest.raises(ValueError, match="'a' takes 16 bytes as F32, got 8"), writer() as w:
        w.write_tensor("a", four[:2])
    with pytest.raises(ValueError, match="'b' was declared but never written"), writer() as w:
        w.write_tensor("a", four)
    assert not path.exists()
    with pytest.raises(ValueError, match="'c' was not declared"), writer(specs[:1]) as w:
        w.write_tensor("a", four)
        w.write_tensor("c", four)


def test_rows_must_split_into_blocks() -> None:
    with pytest.raises(
        ValueError, match="tensor .w.: a row of 48 values is not a whole number of Q8_0 blocks of 32"
    ):
        _ = TensorSpec("w", T.Q8_0, (2, 48)).nbytes


def test_architecture_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="general.architecture"):
        GGUFFileWriter(tmp_path / "m.gguf", {}, [])


class SmallDisk(io.FileIO):
    """A file on a disk with room for ``room`` bytes: writing past them fails as a full disk does."""

    room = 0

    def write(self, data: bytes) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def open_on_small_disk(room: int, buffered: bool, opened: list[io.IOBase]):
    def open_(path: Path, mode: str) -> io.IOBase:
        raw = SmallDisk(path, mode.replace("b", ""))
        raw.room = room
        opened.append(io.BufferedWriter(raw) if buffered else raw)
        return opened[-1]

    return open_


def write_context(path: Path, metadata: dict) -> GGUFFileWriter:
    return GGUFFileWriter(path, {"general.architecture": "deepseek4", **metadata}, [])


def test_a_full_disk_while_writing_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[io.IOBase] = []
    monkeypatch.setattr(writer_module, "open", open_on_small_disk(4096, False, opened), raising=False)
    vocabulary = {"tokenizer.ggml.tokens": [f"token{i}" for i in range(2000)]}  # ~30 KB of header
    path = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="No space left"), write_context(path, vocabulary):
        pass
    assert opened and opened[0].closed
    assert not path.exists()


def test_a_full_disk_when_the_file_is_flushed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The header fits the write buffer: the disk refuses it only when the file is closed.
    opened: list[io.IOBase] = []
    monkeypatch.setattr(writer_module, "open", open_on_small_disk(16, True, opened), raising=False)
    path = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="No space left"), write_context(path, {"x.count": 7}):
        pass
    assert opened and opened[0].closed
    assert not path.exists()
