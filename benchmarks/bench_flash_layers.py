"""DwarfStar against llama.cpp on two layers of DeepSeek V4 Flash at its real widths.

The model has Flash's real dimensions (hidden 4096, 64 heads of 512, 256 experts of 2048 with 6
used, indexer 64 x 128 with top-k 512, vocabulary 129280) but only two layers, ratio 4 then
ratio 128, no hash routing, random weights and ds4's "IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8" type
mix (docs/architecture.md §13.2). It is written once, about 5.6 GB, into --dir.

A 2-layer file's bytes are mostly the Q8_0 output head, so `--layers 2 4` also runs a 4-layer
file (ratios 4, 128, 4, 128; about 9.8 GB) and reports what one more layer costs each engine
(the difference of the two runs, halved) and the projection to the real model's 43 layers.

Each engine runs in its own subprocess, so peak RSS is that engine's own, on the same prompt
of random token ids: load time, prefill of --prompt tokens (last logits only) twice, then
--decode tokens one at a time. The file is read into the page cache before each engine starts,
so neither reads it from disk. The second prefill is the one compared: the first also maps the
weights into the process, which llama.cpp does while loading and DwarfStar on first use
(`1st prefill tok/s`). The run also streams a large buffer to measure the machine's memory
read bandwidth, and counts the bytes of weights one decoded token touches, which together
give a floor on decode time per token.

    python benchmarks/bench_flash_layers.py [--dir bench-models] [--prompt 512] [--decode 16]
                                            [--layers 2 [4]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from dwarfstar.convert.recipe import recipe_kind
from dwarfstar.model.config import ModelConfig

THREADS = 2
REAL_LAYERS = 43
ROUTED = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def ds4_kind(name: str, shape: tuple[int, ...]) -> T:
    """The stored type ds4's 2-bit Flash file gives each tensor."""
    return recipe_kind("q2", name, shape)


def flash_layers(layers: int) -> ModelConfig:
    """Flash at its real widths with `layers` layers, compression ratios 4 and 128 in turn."""
    ratios = tuple(4 if i % 2 == 0 else 128 for i in range(layers))
    return ModelConfig(n_layer=layers, n_hash_layer=0, compress_ratios=ratios, swiglu_limit=(10.0,) * layers)


def build_model(directory: Path, layers: int) -> Path:
    from dwarfstar.synthetic.models import write_random_model

    path = directory / f"flash-{layers}layers-iq2xxs-q2k.gguf"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        size = 1.4 + 2.1 * layers
        print(f"building {path} (random weights, about {size:.1f} GB; once) ...", file=sys.stderr)
        write_random_model(path, flash_layers(layers), ds4_kind, seed=0, progress=True)
    return path


def decode_bytes(path: Path) -> tuple[int, int]:
    """(file's tensor bytes, bytes of weights one decoded token reads).

    A token reads every matrix of the attention, compressor, indexer, router, shared expert and
    head, 6 of the 256 routed experts per layer, and one row of the embedding.
    """
    from dwarfstar.gguf.reader import GGUFFile

    config = flash_layers(2)  # the widths, expert counts and vocabulary of every file here
    tensors = GGUFFile(path).tensors.values()
    total = sum(t.data.nbytes for t in tensors)
    used = 0.0
    for t in tensors:
        if t.name.endswith(ROUTED):
            used += t.data.nbytes * config.n_expert_used / config.n_expert
        elif t.name == "token_embd.weight":
            used += t.data.nbytes / config.vocab_size
        else:
            used += t.data.nbytes
    return total, int(used)


def read_bandwidth() -> float:
    """Bytes per second of a plain streaming read (a sum over 1 GiB of float32), best of 5."""
    import torch

    torch.set_num_threads(THREADS)
    buffer = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def prompt_tokens(length: int) -> list[int]:
    return np.random.default_rng(1).integers(2, flash_layers(2).vocab_size, length).tolist()


def run_ours(path: Path, prompt: list[int], decode: list[int]) -> dict[str, float]:
    import torch

    from dwarfstar.model.model import Model

    torch.set_num_threads(THREADS)
    marks = [time.perf_counter()]
    model = Model.load(path)
    marks.append(time.perf_counter())
    for _ in range(2):  # the first prompt also faults the mapped weights in; the second is warm
        session = model.new_session()
        model.forward(torch.tensor(prompt), session, all_logits=False)
        marks.append(time.perf_counter())
    for token in decode:
        model.forward(torch.tensor([token]), session, all_logits=False)
    marks.append(time.perf_counter())
    return timings(marks, len(prompt), len(decode))


def run_llama_cpp(path: Path, prompt: list[int], decode: list[int]) -> dict[str, float]:
    """llama.cpp as its Python binding sets it up by default: f16 KV cache, no flash attention."""
    import llama_cpp

    marks = [time.perf_counter()]
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(prompt) + len(decode),
        n_batch=len(prompt),
        n_ubatch=min(len(prompt), 512),
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )
    marks.append(time.perf_counter())
    for _ in range(2):
        llm.reset()  # the next eval starts at position 0 and drops the cache past it
        llm.eval(prompt)
        marks.append(time.perf_counter())
    for token in decode:
        llm.eval([token])
    marks.append(time.perf_counter())
    return timings(marks, len(prompt), len(decode))


def timings(marks: list[float], n_prompt: int, n_decode: int) -> dict[str, float]:
    """Figures from the times at: start, loaded, first prompt read, second prompt read, decoded."""
    start, loaded, first, warm, done = marks
    return {
        "load s": loaded - start,
        "prefill tok/s": n_prompt / (warm - first),
        "1st prefill tok/s": n_prompt / (first - loaded),
        "decode tok/s": n_decode / (done - warm),
        "peak RSS GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    }


ENGINES = {"dwarfstar": run_ours, "llama.cpp": run_llama_cpp}


def read_into_page_cache(path: Path) -> None:
    """Read the file through once, so that no engine's figures include reading it from disk.

    Otherwise whichever engine runs first after the file left the page cache pays for the disk
    (at 1-2 GB/s here, seconds), inside its load (llama.cpp) or its first prefill (DwarfStar).
    """
    chunk = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(chunk):
            pass


def measure(engine: str, path: Path, n_prompt: int, n_decode: int) -> dict[str, float]:
    """Run one engine in a fresh interpreter; its last stdout line is the JSON of its figures."""
    read_into_page_cache(path)
    command = [sys.executable, __file__, "--engine", engine, "--model", str(path)]
    command += ["--prompt", str(n_prompt), "--decode", str(n_decode)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(path: Path, results: dict[str, dict[str, float]], n_prompt: int, n_decode: int) -> None:
    total, per_token = decode_bytes(path)
    print(f"model: {path} ({total / 2**30:.2f} GiB of tensors), {THREADS} threads")
    print(f"prompt {n_prompt} tokens, then {n_decode} decoded one at a time")
    ours, theirs = results["dwarfstar"], results["llama.cpp"]
    print(f"\n{'':18}{'dwarfstar':>12}{'llama.cpp':>12}{'us/llama.cpp':>14}")
    for figure in ours:
        print(f"{figure:18}{ours[figure]:12.3f}{theirs[figure]:12.3f}{ours[figure] / theirs[figure]:14.3f}")
    print("(tok/s: higher is better; load time and peak RSS: lower is better)")
    print(f"weights read per decoded token: {per_token / 2**20:.1f} MiB")


def report_per_layer(runs: dict[int, dict[str, dict[str, float]]]) -> None:
    """What one more layer costs each engine, and the projection to the real model's depth."""
    few, many = sorted(runs)
    print(f"\nper layer, from the {few}- and {many}-layer files; projected to {REAL_LAYERS} layers")
    print(f"{'':28}{'dwarfstar':>12}{'llama.cpp':>12}{'us/llama.cpp':>14}")
    for figure, unit in (("decode tok/s", "decode"), ("prefill tok/s", "prefill")):
        per_layer, projected = {}, {}
        for engine in ENGINES:
            ms_few, ms_many = (1e3 / runs[n][engine][figure] for n in (few, many))
            per_layer[engine] = (ms_many - ms_few) / (many - few)
            projected[engine] = 1e3 / (ms_few + (REAL_LAYERS - few) * per_layer[engine])
        ours, theirs = per_layer["dwarfstar"], per_layer["llama.cpp"]
        print(f"{unit + ' ms/token per layer':28}{ours:12.2f}{theirs:12.2f}{ours / theirs:14.3f}")
        ours, theirs = projected["dwarfstar"], projected["llama.cpp"]
        print(f"{unit + f' tok/s at {REAL_LAYERS} layers':28}{ours:12.3f}{theirs:12.3f}{ours / theirs:14.3f}")
    print("(ms per layer: lower is better; tok/s: higher is better)")


def cpu_code() -> str:
    """Which compiled code DwarfStar runs: a stale or missing build measures something else."""
    from dwarfstar.model import fused_cpu
    from dwarfstar.quant import cpu

    if os.environ.get(cpu.ENVIRONMENT) == "reference":
        kernels = f"reference kernels ({cpu.ENVIRONMENT}=reference)"
    else:
        built = cpu.available()
        kernels = f"compiled kernels ({cpu._cpu.isa()})" if built else "reference kernels (not built)"
    return f"{kernels}, fused operations {'on' if fused_cpu.ACTIVE else 'off'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("bench-models"), help="where the model is cached")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length (tokens)")
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded after the prompt")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[2], help="layer counts: one, or two for the per-layer cost"
    )
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # the subprocesses
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    tokens = prompt_tokens(args.prompt + args.decode)
    if args.engine:
        figures = ENGINES[args.engine](args.model, tokens[: args.prompt], tokens[args.prompt :])
        print(json.dumps(figures))
        return

    if len(args.layers) > 2 or len(set(args.layers)) != len(args.layers):
        parser.error("--layers takes one layer count, or two different ones")
    paths = {layers: build_model(args.dir, layers) for layers in args.layers}
    print(f"DwarfStar's CPU code: {cpu_code()}")
    bandwidth = read_bandwidth()
    runs = {}
    for layers, path in paths.items():
        runs[layers] = {engine: measure(engine, path, args.prompt, args.decode) for engine in ENGINES}
        report(path, runs[layers], args.prompt, args.decode)
        print()
    per_token = decode_bytes(paths[min(paths)])[1]
    floor = per_token / bandwidth
    print(f"memory read bandwidth ({THREADS} threads, streaming sum): {bandwidth / 2**30:.2f} GiB/s")
    smallest = min(paths)
    print(f"decode floor, {smallest} layers: {floor * 1e3:.1f} ms/token = {1 / floor:.1f} tok/s at most")
    if len(runs) == 2:
        report_per_layer(runs)


if __name__ == "__main__":
    main()
