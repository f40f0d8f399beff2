"""Which technology for the CPU kernels: the compiled C extension against numba, on Q8_0.

Times x @ W.T for a Q8_0 matrix straight from its blocks, three ways, in one run:

- `c`: the C extension in use (`dwarfstar.quant.cpu`, AVX2 when present, pthread pool);
- `numba`: the same algorithm (fp16 scale, int8 values, float32 sums) written for numba with
  `prange` over the output rows; only when numba is importable (it is not a dependency:
  `pip install numba` into any directory on PYTHONPATH to include it);
- `reference`: the pure-torch path (dequantize bands of rows, then torch.mm).

    python benchmarks/bench_kernel_tech.py [--rows 4096] [--cols 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar.quant import QTensor, cpu, reference_linear
from dwarfstar.synthetic.blocks import random_blocks


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def numba_q8_0(threads: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """x (n, cols) @ W.T for Q8_0 blocks (rows, blocks, 34), compiled by numba; None without numba."""
    try:
        import numba
    except ImportError:
        return None
    numba.set_num_threads(threads)

    @numba.njit(inline="always")
    def half_to_float(low: np.uint8, high: np.uint8) -> np.float32:
        bits = np.uint32(low) | (np.uint32(high) << 8)
        sign = -1.0 if bits & 0x8000 else 1.0
        exponent = (bits >> 10) & 0x1F
        mantissa = bits & 0x3FF
        if exponent == 0:
            return np.float32(sign * mantissa * 2.0**-24)
        return np.float32(sign * (1024 + mantissa) * 2.0 ** (np.int32(exponent) - 25))

    @numba.njit(parallel=True, fastmath=True)
    def product(blocks: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
        rows, n_blocks = blocks.shape[0], blocks.shape[1]
        out = np.empty((x.shape[0], rows), dtype=np.float32)
        for r in numba.prange(rows):
            for i in range(x.shape[0]):
                total = np.float32(0.0)
                for b in range(n_blocks):
                    partial = np.float32(0.0)
                    for j in range(32):
                        partial += np.float32(values[r, b, j]) * x[i, 32 * b + j]
                    total += half_to_float(blocks[r, b, 0], blocks[r, b, 1]) * partial
                out[i, r] = total
        return out

    def run(stored: np.ndarray, x: np.ndarray) -> np.ndarray:
        blocks = stored.reshape(stored.shape[0], -1, 34)
        return product(blocks, blocks[:, :, 2:].view(np.int8), x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = np.random.default_rng(0)
    shape = (args.rows, args.cols)
    stored = random_blocks(Q.Q8_0, shape, generator)
    w = QTensor.from_numpy(Q.Q8_0, shape, stored)
    numba_run = numba_q8_0(args.threads)
    print(f"Q8_0 {args.rows}x{args.cols} ({w.nbytes / 2**20:.1f} MiB), {args.threads} threads, ", end="")
    print(f"C instruction set {cpu._cpu.isa()}")
    print(f"{'x rows':>6} {'c ms':>8} {'numba ms':>9} {'reference ms':>13} {'numba/c':>8} {'ref/c':>6}")
    for batch in (1, 8, 64):
        x = torch.from_numpy(generator.standard_normal((batch, args.cols), dtype=np.float32))
        c = median_ms(lambda x=x: cpu.linear(x, w), args.repeats)
        reference = median_ms(lambda x=x: reference_linear(x, w), max(3, args.repeats // 4))
        if numba_run is None:
            print(f"{batch:6} {c:8.3f} {'-':>9} {reference:13.3f} {'-':>8} {reference / c:6.1f}")
            continue
        expected = x @ reference_linear(torch.eye(args.cols), w)
        got = torch.from_numpy(numba_run(stored, x.numpy()))
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-2), "numba kernel disagrees"
        numba_ms = median_ms(lambda x=x: numba_run(stored, x.numpy()), args.repeats)
        ratios = f"{numba_ms / c:8.1f} {reference / c:6.1f}"
        print(f"{batch:6} {c:8.3f} {numba_ms:9.3f} {reference:13.3f} {ratios}")
    if numba_run is None:
        print("numba is not installed: only the C extension and the reference were timed")


if __name__ == "__main__":
    main()
