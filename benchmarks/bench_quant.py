"""Time `quant.linear` per format against the time it takes just to read the weight's bytes.

Decoding a token is bound by memory bandwidth: each weight is streamed once per token. So the
yardstick is a floor, measured in the same run: bytes of the weight / the bandwidth of a plain
streaming read (`torch.sum` over a float32 buffer far larger than the caches). The read is
timed for each row of the table, between its runs of kernel calls: on a shared machine the
bandwidth on offer moves by 2x within minutes, and each ratio compares like with like. (torch's
OpenMP threads are made to sleep as soon as a read is done, OMP_WAIT_POLICY=PASSIVE, as the
engine has them: spinning, they take the cores from the kernels for milliseconds after.)
Each timed call uses another copy of the weight, cycling over copies that together overflow the
caches, so the kernels too read from memory, as they do in the model.

Then the grouped expert path, `quant.expert_linear`, as in a prefill: tokens each routed to 6
of 32 stacked experts, about 12 or 64 rows per expert (a 512-token prompt gives 512 x 6 / 256 =
12 rows to each of ds4's 256 experts); GB/s counts the bytes of the experts used. GFLOP/s
counts 2 x rows x cols per input row and matrix: what a prefill's products (512 rows: the
integer GEMM on AVX-512 VNNI) are bound by.

    python benchmarks/bench_quant.py [--kinds Q8_0 IQ2_XXS] [--repeats 15] [--threads 1]
                                     [--isa avx512]   # the compiled kernels' instruction set
                                     [--best]         # fastest of the repeats, not the median
                                     [--rows 1]       # only these input rows, no expert_linear
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see above

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from dwarfstar import quant
from dwarfstar.synthetic.blocks import random_blocks

KINDS = (Q.F16, Q.BF16, Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS, Q.MXFP4)
SHAPES = ((2048, 4096), (4096, 2048))
BATCHES = (1, 2, 4, 12, 64, 512)
EXPERTS, EXPERTS_USED, ROWS_PER_EXPERT = 32, 6, (12, 64)
# Copies of a weight cycled through: together at least this many bytes, well over the L3 cache.
POOL_BYTES = 256 << 20
MAX_COPIES = 64


STATISTIC: Callable[[list[float]], float] = statistics.median
"""Of the repeats' times: the median, or with --best the fastest (on a busy machine)."""


def median_seconds(fn: Callable[[int], object], repeats: int) -> float:
    """STATISTIC of fn(i)'s wall time over `repeats` calls, after two warm-up calls."""
    fn(0)
    fn(1)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return STATISTIC(times)


def alternating_seconds(
    kernel: Callable[[int], object], read: Callable[[], object], repeats: int, run: int = 8
) -> tuple[float, float]:
    """STATISTIC of `repeats` timed kernel calls and of the reads between them: runs of `run`
    back-to-back calls (as in a decode step, after one untimed call that wakes the pool's
    threads), each followed by one read. Call i of the kernel is given i (each its own copy)."""
    kernel_times, read_times, calls = [], [], 0
    while len(kernel_times) < repeats:
        for timed in [False] + [True] * run:
            start = time.perf_counter()
            kernel(calls)
            calls += 1
            if timed:
                kernel_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        read()
        read_times.append(time.perf_counter() - start)
    return STATISTIC(kernel_times), STATISTIC(read_times)


def linear_and_read_seconds(
    x: torch.Tensor, copies: list[quant.QTensor], buffer: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """The time of `quant.linear(x, w)`, each call on the next copy of the weight, and of a
    streaming read of `buffer`, taken in turn."""
    return alternating_seconds(lambda i: quant.linear(x, copies[i % len(copies)]), buffer.sum, repeats)


def expert_seconds(
    kind: Q, shape: tuple[int, int], rows_per_expert: int, repeats: int, generator: np.random.Generator
) -> tuple[float, int]:
    """Median time of one `quant.expert_linear` call, and the bytes of the experts it used."""
    w = quant.QTensor.from_numpy(kind, (EXPERTS, *shape), random_blocks(kind, (EXPERTS, *shape), generator))
    tokens = rows_per_expert * EXPERTS // EXPERTS_USED
    ids = torch.from_numpy(generator.random((tokens, EXPERTS)).argsort(-1)[:, :EXPERTS_USED])
    x = torch.from_numpy(generator.standard_normal((tokens, shape[1]), dtype=np.float32))
    used = len(ids.unique())
    return median_seconds(lambda _: quant.expert_linear(x, w, ids), repeats), w.nbytes * used // EXPERTS


def weight_copies(kind: Q, shape: tuple[int, int], generator: np.random.Generator) -> list[quant.QTensor]:
    stored = random_blocks(kind, shape, generator)
    copies = min(MAX_COPIES, max(2, POOL_BYTES // stored.nbytes))
    return [quant.QTensor.from_numpy(kind, shape, stored.copy()) for _ in range(copies)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kinds", nargs="+", default=[k.name for k in KINDS], choices=[k.name for k in KINDS]
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--isa", help="instruction set of the compiled kernels (default: the best)")
    parser.add_argument("--best", action="store_true", help="fastest of the repeats, not the median")
    parser.add_argument(
        "--rows", nargs="+", type=int, help="only these input rows (e.g. 1: decode), no expert_linear"
    )
    args = parser.parse_args()
    global STATISTIC
    if args.best:
        STATISTIC = min
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        from dwarfstar.quant import _cpu

        _cpu.set_isa(args.isa)

    buffer = torch.zeros(POOL_BYTES // 4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("read: a streaming read's GB/s, timed in turn with the row's calls; floor = MB / read")
    print(
        f"{'kind':8} {'shape':>10} {'MB':>6} {'x rows':>6} {'ms':>9} {'GB/s':>7} {'read':>6} "
        f"{'of read':>7} {'x floor':>8} {'GFLOP/s':>8}"
    )
    generator = np.random.default_rng(0)
    for name in args.kinds:
        kind = Q[name]
        for shape in SHAPES:
            copies = weight_copies(kind, shape, generator)
            nbytes = copies[0].nbytes
            for batch in args.rows or BATCHES:
                x = torch.from_numpy(generator.standard_normal((batch, shape[1]), dtype=np.float32))
                seconds, read_seconds = linear_and_read_seconds(x, copies, buffer, args.repeats)
                speed, read = nbytes / seconds, buffer.nbytes / read_seconds
                flop = 2 * batch * shape[0] * shape[1]
                print(
                    f"{name:8} {shape[0]:>5}x{shape[1]:<4} {nbytes / 1e6:6.2f} {batch:6} "
                    f"{seconds * 1e3:9.2f} {speed / 1e9:7.2f} {read / 1e9:6.1f} {speed / read:7.0%} "
                    f"{read / speed:8.1f} {flop / seconds / 1e9:8.1f}"
                )
    if args.rows:
        return
    print(f"\nexpert_linear, {EXPERTS} experts, {EXPERTS_USED} per token")
    print(f"{'kind':8} {'shape':>10} {'MB used':>7} {'rows/expert':>11} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8}")
    for name in args.kinds:
        for rows_per_expert in ROWS_PER_EXPERT:
            shape = SHAPES[0]
            seconds, nbytes = expert_seconds(Q[name], shape, rows_per_expert, args.repeats, generator)
            flop = 2 * rows_per_expert * EXPERTS * shape[0] * shape[1]  # = tokens x 6 products
            print(
                f"{name:8} {shape[0]:>5}x{shape[1]:<4} {nbytes / 1e6:7.1f} {rows_per_expert:11} "
                f"{seconds * 1e3:9.2f} {nbytes / seconds / 1e9:7.2f} {flop / seconds / 1e9:8.1f}"
            )


if __name__ == "__main__":
    main()
