"""Seconds to quantize routed-expert matrices: ours against llama.cpp's quantizer, same data.

llama.cpp's side is ``ggml_quantize_chunk`` from the libggml that llama-cpp-python ships (the
function ``llama-quantize`` runs per chunk of rows), called through ctypes on one thread; ours is
``dwarfstar.quant.quantize`` on one thread and on ``--threads``. Matrices have Flash's expert
shapes: gate/up 2048x4096 (IQ2_XXS in the q2 recipe, Q4_K in q4) and down 4096x2048 (Q2_K or
Q4_K), Gaussian, each quantized with an importance vector (as IQ2_XXS requires). The
projection multiplies the per-matrix times by Flash's 43 layers x 256 experts x 3 projections.

    python benchmarks/bench_quantize.py [--matrices 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import bytes_per_row, quantize

LAYERS, EXPERTS = 43, 256
CASES = (  # kind, shape, how many of them the full model holds per recipe
    (Q.IQ2_XXS, (2048, 4096), "q2: gate+up"),
    (Q.Q2_K, (4096, 2048), "q2: down"),
    (Q.Q4_K, (2048, 4096), "q4: gate+up"),
    (Q.Q4_K, (4096, 2048), "q4: down"),
)


def load_ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def llama_seconds(lib: ctypes.CDLL, kind: Q, matrix: np.ndarray, importance: np.ndarray) -> float:
    rows, cols = matrix.shape
    out = np.empty((rows, bytes_per_row(kind, cols)), dtype=np.uint8)
    lib.ggml_quantize_init(int(kind))  # builds IQ2_XXS's grid tables, once, outside the timing
    start = time.perf_counter()
    lib.ggml_quantize_chunk(
        int(kind), matrix.ctypes.data, out.ctypes.data, 0, rows, cols, importance.ctypes.data
    )
    return time.perf_counter() - start


def our_seconds(kind: Q, matrix: np.ndarray, importance: np.ndarray, threads: int) -> float:
    start = time.perf_counter()
    quantize(matrix, kind, importance, threads=threads)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=2, help="matrices timed per case (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    lib = load_ggml()
    rng = np.random.default_rng(0)
    warm = rng.standard_normal((8, 4096), dtype=np.float32)
    for kind, _, _ in CASES:  # compile (or load the cached) kernels before timing
        quantize(warm, kind, np.ones(4096, np.float32))
    threaded = f"ours {args.threads}t"
    print(
        f"{'case':<14} {'kind':<8} {'shape':>10} {'llama.cpp':>10} {'ours 1t':>8} {'ratio':>6} {threaded:>8}"
    )
    per_matrix = {}
    for kind, shape, label in CASES:
        theirs, ours1, oursn = [], [], []
        for _ in range(args.matrices):
            matrix = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            importance = np.exp(rng.standard_normal(shape[1])).astype(np.float32)
            theirs.append(llama_seconds(lib, kind, matrix, importance))
            ours1.append(our_seconds(kind, matrix, importance, 1))
            oursn.append(our_seconds(kind, matrix, importance, args.threads))
        t, o1, on = (float(np.median(v)) for v in (theirs, ours1, oursn))
        per_matrix[label] = (t, o1, on)
        size = "x".join(map(str, shape))
        print(f"{label:<14} {kind.name:<8} {size:>10} {t:>9.2f}s {o1:>7.2f}s {o1 / t:>6.2f} {on:>7.2f}s")
    for recipe in ("q2", "q4"):
        gate_up, down = per_matrix[f"{recipe}: gate+up"], per_matrix[f"{recipe}: down"]
        count = LAYERS * EXPERTS
        total = [count * (2 * g + d) for g, d in zip(gate_up, down, strict=True)]
        hours = [f"{seconds / 3600:.1f} h" for seconds in total]
        print(
            f"full model, {recipe} experts ({3 * count} matrices): llama.cpp 1 thread {hours[0]}, "
            f"ours 1 thread {hours[1]}, ours {args.threads} threads {hours[2]}"
        )


if __name__ == "__main__":
    main()
