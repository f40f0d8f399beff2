"""QTensor wraps the bytes of a GGUF file read by gguf.GGUFReader, without copying them."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import SUPPORTED_KINDS, QTensor, bytes_per_row, dequantize
from dwarfstar.synthetic.blocks import random_blocks


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A file with a matrix and a stack of 3 matrices of every supported kind, and an I32 table."""
    path = tmp_path_factory.mktemp("quant") / "tensors.gguf"
    generator = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "test")
    for kind in SUPPORTED_KINDS:
        writer.add_tensor(f"{kind.name}.matrix", random_blocks(kind, (5, 512), generator), raw_dtype=kind)
        writer.add_tensor(f"{kind.name}.stack", random_blocks(kind, (3, 2, 256), generator), raw_dtype=kind)
    writer.add_tensor("table", generator.integers(0, 256, size=(6, 10), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def from_reader(tensor) -> QTensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return QTensor.from_numpy(tensor.tensor_type, tuple(reversed(tensor.shape.tolist())), tensor.data)


def test_qtensors_share_memory_with_the_file(gguf_file):
    for tensor in gguf_file.tensors:
        assert isinstance(tensor.data, np.memmap)
        t = from_reader(tensor)
        assert t.data.data_ptr() == tensor.data.ctypes.data
        assert t.nbytes == tensor.n_bytes == tensor.data.nbytes


def test_qtensors_from_the_file_dequantize_like_gguf(gguf_file):
    for tensor in gguf_file.tensors:
        if tensor.tensor_type == Q.I32:
            continue
        t = from_reader(tensor)
        ours = dequantize(t).numpy()
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


def test_layout_of_stored_data(gguf_file):
    tensors = {tensor.name: from_reader(tensor) for tensor in gguf_file.tensors}
    assert tensors["table"].data.dtype == torch.int32
    assert tensors["table"].shape == (6, 10)
    assert tensors["F16.matrix"].data.dtype == torch.float16
    assert tensors["BF16.matrix"].data.dtype == torch.bfloat16
    assert tensors["BF16.matrix"].data.shape == (5, 512)
    stack = tensors["IQ2_XXS.stack"]
    assert stack.shape == (3, 2, 256)
    assert stack.data.shape == (3, 2, bytes_per_row(Q.IQ2_XXS, 256))
    assert stack[2].shape == (2, 256)
    assert stack[2].data.data_ptr() == stack.data.data_ptr() + 2 * 2 * 66


def test_from_numpy_names_the_problem():
    blocks = random_blocks(Q.Q8_0, (4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Q8_0 tensor of shape \(4, 32\) takes 136 bytes"):
        QTensor.from_numpy(Q.Q8_0, (4, 32), blocks)
    with pytest.raises(ValueError, match="not contiguous"):
        QTensor.from_numpy(Q.Q8_0, (4, 32), blocks[:, :34])
    with pytest.raises(ValueError, match="Q4_K blocks"):
        QTensor.from_numpy(Q.Q4_K, (4, 64), blocks)
