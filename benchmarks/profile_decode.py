"""Where a decoded token's time goes: matrix products against everything else, per layer.

Decodes a few tokens after a short prompt and times, inside each step, the calls to the
`quant` entry points (`linear`, `expert_linear`, `take_rows`); the rest of the step is the
small torch operations around them (hyper-connections, norms, rope, attention, compressors,
indexer, routing). Prints both per token and per layer, in wall time, and the step's CPU time
(on a busy machine the wall time also counts waiting for a CPU). The last row is the calling
thread's CPU time outside the matrix products: the rest of the step, which runs on that thread,
without the waiting that a shared machine adds to its wall time.

    python benchmarks/profile_decode.py MODEL.gguf [--prompt 64] [--decode 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from dwarfstar import quant
from dwarfstar.model.model import Model

ENTRY_POINTS = ("linear", "expert_linear", "take_rows")


def timed(spent: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start, cpu_start = time.perf_counter(), time.thread_time()
        result = fn(*args, **kwargs)
        spent[name] += time.perf_counter() - start
        spent["thread cpu"] += time.thread_time() - cpu_start
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Model.load(args.model)
    layers = model.config.n_layer
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, model.config.vocab_size, (args.prompt + args.decode + 1,), generator=generator)
    session = model.new_session()
    model.forward(tokens[: args.prompt], session, all_logits=False)
    model.forward(tokens[args.prompt : args.prompt + 1], session, all_logits=False)  # warm-up

    spent: dict[str, float] = defaultdict(float)
    for name in ENTRY_POINTS:
        setattr(quant, name, timed(spent, name, getattr(quant, name)))
    start, cpu_start, thread_start = time.perf_counter(), time.process_time(), time.thread_time()
    for token in tokens[args.prompt + 1 :]:
        model.forward(token.view(1), session, all_logits=False)
    total = (time.perf_counter() - start) / args.decode * 1e3
    cpu = (time.process_time() - cpu_start) / args.decode * 1e3
    thread = (time.thread_time() - thread_start) / args.decode * 1e3
    rest_cpu = thread - spent.pop("thread cpu") / args.decode * 1e3
    per_token = {name: seconds / args.decode * 1e3 for name, seconds in spent.items()}
    matrices = sum(per_token.values())
    rest = total - matrices
    print(f"{args.model.name}: {layers} layers, {args.threads} threads, ", end="")
    print(f"{args.decode} tokens decoded after {args.prompt}")
    print(f"{'':28} {'ms/token':>9} {'ms/layer':>9}")
    for name in ENTRY_POINTS:
        ms = per_token.get(name, 0.0)
        print(f"{'quant.' + name:28} {ms:9.2f} {ms / layers:9.2f}")
    print(f"{'all matrix products':28} {matrices:9.2f} {matrices / layers:9.2f}")
    print(f"{'everything else':28} {rest:9.2f} {rest / layers:9.2f}")
    print(f"{'decode step':28} {total:9.2f} {total / layers:9.2f}")
    print(f"{'decode step, CPU time':28} {cpu:9.2f} {cpu / layers:9.2f}  (all threads; wall time above)")
    print(f"{'everything else, CPU time':28} {rest_cpu:9.2f} {rest_cpu / layers:9.2f}  (the calling thread)")
    print("(ms/layer divides by the layer count; the output head and embedding are in the first rows)")


if __name__ == "__main__":
    main()
