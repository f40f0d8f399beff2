"""Where a prefill's time goes: each part of the forward pass, exclusive of the parts it calls.

Prefills one prompt (by default 512 tokens, one chunk, as bench_flash_layers does) twice and
times the second (the first also faults in the memory-mapped weights; --cold times that one)
piece by piece: routed experts (`quant.expert_linear`), the other matrix products
(`quant.linear`, split into decoding stored bands and torch's float32 GEMM on them), attention,
compressors, indexer, hyper-connections, norms, rope, routing. Each row counts only its own
time: attention's row excludes the projections and the compressor it calls, and so on. The
last rows compare wall with CPU time: with N threads, a CPU/wall ratio well under N means
threads waiting (for the GIL, for each other, or for a core another process holds).

    python benchmarks/profile_prefill.py MODEL.gguf [--prompt 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from dwarfstar.model.model import Model

# (module, function, row): the functions timed, each exclusive of the others it calls. The
# pieces of a matrix product (rows starting with "  ") are counted under the entry point that
# called them: routed experts or dense products.
PIECES = (
    ("dwarfstar.quant", "expert_linear", "routed experts + out_a groups (quant.expert_linear)"),
    ("dwarfstar.quant", "linear", "dense Q8_0/F16 products (quant.linear)"),
    ("dwarfstar.quant.cpu", "_run_bands", "  banded GEMM (C band decoding + torch GEMM)"),
    ("dwarfstar.quant._cpu", "matmul", "  direct C kernel"),
    ("dwarfstar.quant._cpu", "gemm", "  compiled GEMM (C: integer, F16/BF16 float32)"),
    ("dwarfstar.quant", "take_rows", "embedding rows"),
    ("dwarfstar.model.model", "attention", "attention (scores, softmax, values, rope)"),
    ("dwarfstar.model.attention", "compress", "compressors (pooling, norm, rope)"),
    ("dwarfstar.model.attention", "indexer_select", "indexer (scores, top-k)"),
    ("dwarfstar.model.model", "hc_pre", "hyper-connections: pre + Sinkhorn"),
    ("dwarfstar.model.model", "hc_post", "hyper-connections: post"),
    ("dwarfstar.model.model", "hc_head", "hyper-connections: head"),
    ("dwarfstar.model.model", "rms_norm", "rms norms (model level)"),
    ("dwarfstar.model.moe", "route", "routing (without its product)"),
    ("dwarfstar.model.model", "moe", "MoE: swiglu, weighting, sums"),
)
ENTRY_POINTS = ("expert_linear", "linear")


class ExclusiveTimer:
    """Wall time per row, each call's time minus that of the timed calls inside it."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []
        self._entry: list[str] = []

    def wrap(self, row: str, fn: Callable, entry: bool) -> Callable:
        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)  # shared out by the caller: counted in its row
            name = row
            if entry:
                self._entry.append(row.split(" (")[0])
            elif row.startswith("  ") and self._entry:
                name = f"{self._entry[-1]}: {row.strip()}"
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._inner.pop()
                self.spent[name] += elapsed - inner
                self.calls[name] += 1
                if self._inner:
                    self._inner[-1] += elapsed
                if entry:
                    self._entry.pop()

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cold", action="store_true", help="profile the first prefill (it also faults in the mapped weights)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Model.load(args.model)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, model.config.vocab_size, (args.prompt,), generator=generator)

    first = None
    if not args.cold:  # as bench_flash_layers: the compared prefill is the second
        start = time.perf_counter()
        model.forward(tokens, model.new_session(), all_logits=False)
        first = time.perf_counter() - start

    timer = ExclusiveTimer()
    for module_name, function, row in PIECES:
        module = importlib.import_module(module_name)
        if hasattr(module, function):
            wrapped = timer.wrap(row, getattr(module, function), function in ENTRY_POINTS)
            setattr(module, function, wrapped)
    session = model.new_session()
    start, cpu_start = time.perf_counter(), time.process_time()
    model.forward(tokens, session, all_logits=False)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start

    print(f"{args.model.name}: {model.config.n_layer} layers, {args.threads} threads, ", end="")
    which = "first" if first is None else "second"
    print(f"{which} prefill of {args.prompt} tokens: {wall:.2f} s = {args.prompt / wall:.1f} tok/s")
    if first is not None:
        print(f"(the first, untimed by piece, which also faulted in the weights: {first:.2f} s)")
    print(f"{'':52} {'s':>7} {'share':>6} {'calls':>6}")
    for row, seconds in timer.spent.items():
        print(f"{row:52} {seconds:7.3f} {seconds / wall:6.1%} {timer.calls[row]:6d}")
    rest = wall - sum(timer.spent.values())
    print(f"{'everything else (embedding, head collapse, glue)':52} {rest:7.3f} {rest / wall:6.1%}")
    print(f"{'prefill, wall':52} {wall:7.3f}")
    print(f"{'prefill, CPU (all threads)':52} {cpu:7.3f}  CPU/wall {cpu / wall:.2f}")


if __name__ == "__main__":
    main()
