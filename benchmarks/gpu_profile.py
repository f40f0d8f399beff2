"""Where a GPU decode step and a prefill chunk spend their time: torch.profiler's top operations.

    python benchmarks/gpu_profile.py --layers 8    # on a CUDA machine; about a minute on an H200

Builds the synthetic q2-recipe Flash of `gpu_check.py` (fewer layers: every layer costs the
same), fills 1k of context, then profiles `--decode` decode steps and one `--prefill`-token
chunk, printing the operations that take the most device time and how many kernels ran; then
the same decode step captured in a CUDA graph and replayed (a failed capture is reported).
"""

from __future__ import annotations

import argparse

import torch
from gpu_check import capture_decode_step, synchronize, synthetic_flash
from torch.profiler import ProfilerActivity, profile

from dwarfstar.model.config import ModelConfig


def report(title: str, prof: profile, rows: int) -> None:
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n== {title}: {launches} device kernels")
    print(events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device("cuda")
    full = ModelConfig()
    config = ModelConfig(
        n_layer=args.layers,
        n_hash_layer=min(3, args.layers),
        compress_ratios=full.compress_ratios[: args.layers],
        swiglu_limit=full.swiglu_limit[: args.layers],
    )
    model, _, _ = synthetic_flash(config, device)
    tokens = torch.randint(0, config.vocab_size, (args.context + args.prefill,), device=device)
    session = model.new_session()
    for _ in model.prefill_chunks(tokens[: args.context], session, 512):
        pass
    token = tokens[args.context - 1 : args.context]
    for _ in range(2):  # warm-up: kernel compilation
        token = model.forward(token, session, all_logits=False).argmax(-1)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.decode):
            token = model.forward(token, session, all_logits=False).argmax(-1)
        synchronize(device)
    report(f"{args.decode} decode steps, {args.layers} layers", prof, args.rows)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.forward(tokens[args.context :], session, all_logits=False)
        synchronize(device)
    report(f"prefill chunk of {args.prefill} tokens, {args.layers} layers", prof, args.rows)
    try:
        graph, _ = capture_decode_step(model, session, token)
        graph.replay()
        synchronize(device)
    except Exception as error:  # reported, not fatal: the eager profiles above stand
        print(f"\nCUDA graph capture of a decode step failed: {type(error).__name__}: {error}")
        return 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.decode):
            graph.replay()
        synchronize(device)
    report(f"{args.decode} replays of a decode step captured in a CUDA graph", prof, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
