"""The GGUF container itself (version 3, little-endian): magic, version, alignment, scalar codes,
and how many bytes a tensor of each kind takes."""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32

# struct format of each scalar value type
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

# Tensor kinds stored one value per element, with the numpy dtype of their values. BF16 is one
# value per element too, but numpy has no dtype for it.
NUMPY_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.F64: np.dtype(np.float64),
    GGMLQuantizationType.I8: np.dtype(np.int8),
    GGMLQuantizationType.I16: np.dtype(np.int16),
    GGMLQuantizationType.I32: np.dtype(np.int32),
    GGMLQuantizationType.I64: np.dtype(np.int64),
}


def row_nbytes(kind: GGMLQuantizationType, cols: int) -> int:
    """Bytes one row of ``cols`` values takes; a ValueError if the row does not split into blocks."""
    block_size, type_size = GGML_QUANT_SIZES[kind]
    if cols % block_size:
        raise ValueError(
            f"a row of {cols} values is not a whole number of {kind.name} blocks of {block_size}"
        )
    return cols // block_size * type_size


def tensor_nbytes(kind: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``kind`` and torch-order ``shape`` takes (rows run along the last axis)."""
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * row_nbytes(kind, shape[-1] if shape else 1)
