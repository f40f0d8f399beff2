"""``convert_checkpoint`` on DeepSeek's release layout: FP8 / FP4 weights dequantized exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from models import (
    MTP_TENSORS,
    gguf_values,
    make_hf_checkpoint,
    make_release_checkpoint,
    release_tensors,
    release_values,
    tiny_hf_config,
)

from dwarfstar.convert import Conversion, convert_checkpoint
from dwarfstar.gguf.reader import GGUFFile

CONFIG = tiny_hf_config()
SEED = 5


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The release checkpoint converted to f32, with no tokenizer.json (the package's is used)."""
    directory = make_release_checkpoint(tmp_path_factory.mktemp("release"), CONFIG, SEED)
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").unlink()
    return convert_checkpoint(directory, directory.parent / "release.gguf", "f32")


def test_fp8_and_fp4_weights_are_dequantized_exactly(release: Conversion) -> None:
    expected = gguf_values(release_values(release_tensors(CONFIG, SEED)))
    f = GGUFFile(release.path)
    assert set(f.tensors) == set(expected)
    for name, values in expected.items():
        assert f.tensors[name].shape == tuple(values.shape), name
        assert np.array_equal(f.tensors[name].data, values.numpy()), name


def test_mtp_tensors_are_skipped_and_reported(release: Conversion) -> None:
    assert sorted(release.skipped) == sorted(MTP_TENSORS)
    assert not any(name.startswith("mtp") for name in GGUFFile(release.path).tensors)


def test_same_file_as_the_transformers_checkpoint_of_the_same_values(
    release: Conversion, tmp_path: Path
) -> None:
    """The release's legacy config.json and FP8/FP4 tensors give the transformers checkpoint's GGUF."""
    hf = make_hf_checkpoint(tmp_path / "hf", CONFIG, SEED, release_precision=True)
    ours = GGUFFile(convert_checkpoint(hf, tmp_path / "hf.gguf", "f32").path)
    theirs = GGUFFile(release.path)
    assert {**ours.metadata, "general.name": ""} == {**theirs.metadata, "general.name": ""}
    assert list(ours.tensors) == list(theirs.tensors)
    for name, info in ours.tensors.items():
        assert info.kind == theirs.tensors[name].kind and info.shape == theirs.tensors[name].shape
        assert np.array_equal(info.data, theirs.tensors[name].data), name
