"""Q2_K, Q4_K and IQ2_XXS quantizers: valid blocks, and errors no worse than llama.cpp's own.

The reference is ``llama_model_quantize`` (llama-cpp-python) on the same float32 GGUF: a small
model of the real architecture whose routed experts hold Gaussian or heavy-tailed (Student t,
3 degrees of freedom) values, with rows of 256. llama.cpp refuses IQ2_XXS without an importance
matrix; there both quantizers get the sum of squares of each column, which is also what ours
uses when given none.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from llama_reference import llama_dequantize, llama_quantize, write_f32_model

from dwarfstar.gguf.reader import GGUFFile
from dwarfstar.quant import QTensor, dequantize, quantize
from dwarfstar.quant.quantizers import SEARCHED_KINDS
from dwarfstar.synthetic.models import DEMO_CONFIG

KINDS = pytest.mark.parametrize("kind", SEARCHED_KINDS, ids=lambda kind: kind.name)
CONFIG = dataclasses.replace(DEMO_CONFIG, n_expert=4, expert_ff=256)  # dim 256: every expert row is one block
COMPARED = r"blk\.3\.ffn_(gate|up|down)_exps"
DISTRIBUTIONS = {
    "gaussian": lambda shape, rng: 0.02 * rng.standard_normal(shape),
    "heavy-tailed": lambda shape, rng: 0.02 * rng.standard_t(3, shape),
}


def weighted_rmse(ours: np.ndarray, values: np.ndarray, importance: np.ndarray | float = 1.0) -> float:
    return float(np.sqrt(np.mean((ours - values) ** 2 * importance)))


def decoded(stored: np.ndarray, kind: Q, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(stored, kind).reshape(shape)


@KINDS
@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_decode_with_gguf_py_llama_cpp_and_ours(kind: Q, weighted: bool) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 3, 512), dtype=np.float32)
    importance = rng.uniform(0.1, 2.0, (2, 512)).astype(np.float32) if weighted else None
    stored = quantize(values, kind, importance)
    assert stored.shape == (2, 3, 512 // 256 * gguf.GGML_QUANT_SIZES[kind][1])
    theirs = decoded(stored, kind, values.shape)
    relative = weighted_rmse(theirs, values) / values.std()
    assert relative < {Q.Q2_K: 0.35, Q.Q4_K: 0.09, Q.IQ2_XXS: 0.4}[kind]
    ours = dequantize(QTensor.from_numpy(kind, values.shape, stored)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    llama = llama_dequantize(kind, stored, values.size).reshape(values.shape)
    np.testing.assert_array_equal(llama, theirs)


@KINDS
def test_importance_lowers_the_weighted_error(kind: Q) -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal((16, 512), dtype=np.float32)
    importance = np.exp(2 * rng.standard_normal(512)).astype(np.float32)
    plain = decoded(quantize(values, kind), kind, values.shape)
    weighted = decoded(quantize(values, kind, importance), kind, values.shape)
    assert weighted_rmse(weighted, values, importance) < 0.95 * weighted_rmse(plain, values, importance)


@KINDS
def test_threads_give_the_same_blocks(kind: Q) -> None:
    values = np.random.default_rng(2).standard_normal((200, 256), dtype=np.float32)
    np.testing.assert_array_equal(quantize(values, kind, threads=3), quantize(values, kind))


@KINDS
def test_zero_and_constant_rows(kind: Q) -> None:
    values = np.zeros((3, 256), dtype=np.float32)
    values[1] = 0.5
    values[2, ::7] = -1.0
    stored = quantize(values, kind, np.ones(256, dtype=np.float32))
    result = decoded(stored, kind, values.shape)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result[0], 0.0)
    # IQ2_XXS has no zero level and few flat groups on its grid: a coarser bound there
    bound = 0.45 if kind == Q.IQ2_XXS else 0.25
    assert weighted_rmse(result[1:], values[1:]) < bound * values[1:].std()


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 128), dtype=np.float32), Q.Q2_K)


@pytest.fixture(scope="module", params=list(DISTRIBUTIONS))
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantizers") / f"{request.param}.gguf"
    return write_f32_model(path, CONFIG, DISTRIBUTIONS[request.param], seed=3)


@KINDS
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_error_at_most_llama_cpp(source: Path, tmp_path: Path, kind: Q, weighted: bool) -> None:
    tensors = GGUFFile(source).tensors
    experts = {
        name: np.array(t.data) for name, t in tensors.items() if re.fullmatch(COMPARED + r"\.weight", name)
    }
    assert len(experts) == 3
    rng = np.random.default_rng(4)
    if weighted:  # an imatrix: mean squared activations, log-normal across columns
        imatrix = {
            n: np.exp(rng.standard_normal((v.shape[0], v.shape[2]))).astype(np.float32)
            for n, v in experts.items()
        }
    elif kind == Q.IQ2_XXS:
        imatrix = {n: np.einsum("erc,erc->ec", v, v) for n, v in experts.items()}
    else:
        imatrix = {}
    out = llama_quantize(source, tmp_path / "llama.gguf", overrides={COMPARED: kind}, imatrix=imatrix or None)
    theirs = GGUFFile(out).tensors
    for name, values in experts.items():
        assert theirs[name].kind == kind
        weight = imatrix[name][:, None, :] if weighted else 1.0
        reference = weighted_rmse(decoded(np.array(theirs[name].data), kind, values.shape), values, weight)
        ours = decoded(quantize(values, kind, imatrix.get(name) if weighted else None), kind, values.shape)
        assert weighted_rmse(ours, values, weight) <= 1.03 * reference, name
