"""The KV cache at growing context: decode time per token, session bytes, snapshot file costs.

A small model of Flash's attention widths (head 512, indexer 128, window 128, one layer of each
kind: sliding window only, ratio 4 with its indexer, ratio 128) and a narrow rest is filled to
each context in chunks of 512; then it decodes ``--decode`` tokens, takes an in-memory snapshot,
and writes and reads a snapshot file. Last, a synthetic state of ``--restore-mb`` (random
compressed rows, as a context of over a million tokens leaves them on this model; Flash's 43
layers hold as much at about 70k tokens) is written once and restored: the time ``kvfile.read``
takes to give a session ready to decode, checksum included (the file in the page cache; the
minimum of three), and a check that the restored rows are the saved ones, bit for bit.

    python benchmarks/bench_kv.py [--sizes 1024 4096 16384] [--decode 16] [--restore-mb 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from dwarfstar.engine import kvfile
from dwarfstar.engine.kvfile import Snapshot
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.synthetic.models import uniform_policy, write_random_model

CONFIG = ModelConfig(
    n_layer=3, dim=256, n_head=4, head_dim=512, value_dim=512, rope_dim=64, q_lora_rank=64,
    o_lora_rank=64, o_groups=2, n_expert=4, n_expert_used=2, expert_ff=64, n_hash_layer=1,
    index_n_head=8, index_head_dim=128, index_topk=512, compress_ratios=(0, 4, 128),
    swiglu_limit=(10.0,) * 3,
)  # fmt: skip
CHUNK = 512


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--restore-mb", type=int, default=1024, help="0: skip the restore figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kv-bench.gguf"
        write_random_model(path, CONFIG, uniform_policy(T.Q8_0))
        model = Model.load(path, quant_sim=False)
        tokens = torch.randint(0, CONFIG.vocab_size, (max(args.sizes) + args.decode,))
        session = model.new_session()
        print(f"{'ctx':>6} {'decode ms/token':>16} {'session bytes':>14} {'bytes/token':>12} "
              f"{'snapshot ms':>12} {'file bytes':>11} {'save ms':>8} {'load ms':>8}")  # fmt: skip
        done = 0
        for size in sorted(args.sizes):
            for start in range(done, size, CHUNK):
                logits = model.forward(tokens[start : min(start + CHUNK, size)], session, all_logits=False)[0]
            done = size
            frontier = session.snapshot()
            began = time.perf_counter()
            for token in tokens[size : size + args.decode]:
                model.forward(token.reshape(1), session, all_logits=False)
            decode_ms = 1000 * (time.perf_counter() - began) / args.decode
            session.restore(frontier)  # the next size extends the prompt, not the decoded tokens
            began = time.perf_counter()
            snapshot = session.snapshot()
            snapshot_ms = 1000 * (time.perf_counter() - began)
            file = Path(tmp) / f"{size}.kv"
            began = time.perf_counter()
            file_bytes = kvfile.write(file, Snapshot(snapshot, tokens[:size].tolist(), None, logits), model)
            save_ms = 1000 * (time.perf_counter() - began)
            began = time.perf_counter()
            kvfile.read(file, model)
            load_ms = 1000 * (time.perf_counter() - began)
            file.unlink()
            print(
                f"{size:>6} {decode_ms:>16.2f} {session.nbytes:>14,} {session.nbytes // size:>12,} "
                f"{snapshot_ms:>12.3f} {file_bytes:>11,} {save_ms:>8.1f} {load_ms:>8.1f}"
            )
        if args.restore_mb:
            restore(model, args.restore_mb << 20, Path(tmp) / "large.kv")


def restore(model: Model, size: int, file: Path) -> None:
    """Write a synthetic state of about ``size`` bytes once, then time restoring it."""
    state = model.new_session()
    logits = model.forward(torch.arange(3), state, all_logits=False)[0]
    parts = [
        (part, ratio)
        for layer, ratio in zip(state.layers, CONFIG.compress_ratios, strict=True)
        for part, ratio in ((layer.compressor, ratio), (layer.indexer, 4))
        if part is not None
    ]
    bytes_per_token = 4 + sum(4 * part.rows.shape[1] / ratio for part, ratio in parts)
    n_tokens = int(size / bytes_per_token)
    for part, ratio in parts:
        part.append_rows(torch.randn(n_tokens // ratio, part.rows.shape[1]))
    state.n_tokens = n_tokens
    tokens = torch.randint(0, CONFIG.vocab_size, (n_tokens,)).tolist()
    began = time.perf_counter()
    file_bytes = kvfile.write(file, Snapshot(state, tokens, None, logits), model)
    save_s = time.perf_counter() - began
    seconds = []
    for _ in range(3):
        began = time.perf_counter()
        restored = kvfile.read(file, model)
        seconds.append(time.perf_counter() - began)
    pairs = zip(kvfile.state_tensors(restored.state), kvfile.state_tensors(state), strict=True)
    same = all(torch.equal(a, b) for (_, a), (_, b) in pairs) and restored.tokens == tokens
    print(
        f"\nrestore of a {file_bytes / 2**30:.2f} GiB snapshot ({n_tokens:,} tokens of rows): "
        f"{1000 * min(seconds):.0f} ms (min of 3; {', '.join(f'{1000 * t:.0f}' for t in seconds)}); "
        f"written in {save_s:.1f} s; restored rows bit-identical: {same}"
    )


if __name__ == "__main__":
    main()
