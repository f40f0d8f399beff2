"""The device check of issue 11: Triton kernels and a full-size synthetic Flash on one GPU.

    python benchmarks/gpu_check.py                 # on a CUDA machine; under 5 minutes on an H200
    python benchmarks/gpu_check.py --json out.json # the figures also as JSON

1. Kernel agreement: each Triton kernel (matrix × vector, × small batch, grouped experts,
   dequantize) against the reference path on the GPU, within 1e-5 of Σ|w·x| (the scale of a
   float32 sum's rounding; the decoded weights themselves must be bit-identical).
2. A full-size synthetic DeepSeek V4 Flash (43 layers, real widths) in ds4's q2 recipe
   (IQ2_XXS gate/up, Q2_K down, Q8_0 attention/shared/head, F16 embedding/mixers/router, F32
   vectors), random valid blocks generated directly in device memory: no file.
3. Prefill of 2048 tokens (tokens/s), then decode at 1k context: ms/token, the weight bytes one
   token reads, the device's measured copy bandwidth and the fraction of the bandwidth floor
   (bytes per token / bandwidth) reached. Goals (issue 11): ≥ 50% of the floor in decode,
   ≥ 5,000 tokens/s prefill on an H200-class GPU.

`--layers`, `--context`, `--prefill`, `--decode` shrink it for a dry run (`--device cpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from dwarfstar import quant
from dwarfstar.convert.recipe import recipe_kind
from dwarfstar.gguf.names import global_shapes, layer_prefix, layer_shapes
from dwarfstar.model.config import ModelConfig
from dwarfstar.model.model import Model
from dwarfstar.model.weights import bind
from dwarfstar.quant.tensor import QTensor, is_block_kind, storage_shape
from dwarfstar.synthetic.blocks import HALF_SCALE_OFFSETS, random_blocks

ROUTED = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def kernel_agreement(device: torch.device, rows: int = 256, cols: int = 1024) -> dict[str, float]:
    """Worst error of each kernel as a fraction of its allowed bound (≤ 1 passes), on 8 stacked
    (rows, cols) experts."""
    from dwarfstar.quant.triton import KINDS, kernels

    rng = np.random.default_rng(0)
    worst = {}
    for kind in KINDS:
        w = QTensor.from_numpy(kind, (8, rows, cols), random_blocks(kind, (8, rows, cols), rng))
        w = QTensor(kind, w.shape, w.data.to(device))
        dense = torch.stack([quant.dequantize(QTensor(kind, w.shape[1:], w.data[e].cpu())) for e in range(8)])
        assert torch.equal(kernels.dequantize(w[3]).cpu(), dense[3]), f"{kind.name}: decoded values differ"
        ratios = []
        for n in (1, 4, 64):
            x = torch.randn(n, cols, device=device)
            ratios.append(_ratio(kernels.linear(x, w[5]), x, dense[5]))
        x = torch.randn(3, cols, device=device)
        ids = torch.tensor([[1, 7], [0, 1], [6, 6]], device=device)
        out = kernels.expert_linear(x, w, ids)
        for i in range(3):
            for j in range(2):
                ratios.append(_ratio(out[i, j][None], x[i][None], dense[ids[i, j].item()]))
        worst[kind.name] = max(ratios)
    return worst


def _ratio(ours: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    x64, w64 = x.double().cpu(), dense.double()
    bound = 1e-5 * (x64.abs() @ w64.abs().T) + 1e-30
    return float(((ours.double().cpu() - x64 @ w64.T).abs() / bound).max())


def random_tensor(kind: T, shape: tuple[int, ...], device: torch.device, generator: torch.Generator):
    """Random valid stored data made on `device`: random bytes with fp16 scales in ±[1e-3, 1e-2]."""
    if kind == T.I32:
        return torch.randint(0, 256, shape, dtype=torch.int32, device=device, generator=generator)
    if not is_block_kind(kind):
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[kind]
        return (0.02 * torch.randn(shape, device=device, generator=generator)).to(dtype)
    data = torch.randint(
        0, 256, storage_shape(kind, shape), dtype=torch.uint8, device=device, generator=generator
    )
    type_size = GGML_QUANT_SIZES[kind][1]
    blocks = data.view(-1, type_size)
    for offset in HALF_SCALE_OFFSETS[kind]:
        scales = torch.empty(blocks.shape[0], device=device).uniform_(1e-3, 1e-2, generator=generator)
        blocks[:, offset : offset + 2] = scales.half().view(torch.uint8).view(-1, 2)
    return data


def synthetic_flash(config: ModelConfig, device: torch.device) -> tuple[Model, int, int]:
    """The model in the q2 recipe on `device`, its weight bytes, and the bytes a decoded token reads."""
    generator = torch.Generator(device=device).manual_seed(0)
    names = dict(global_shapes(config))
    for layer in range(config.n_layer):
        names.update({layer_prefix(layer) + s: shape for s, shape in layer_shapes(config, layer).items()})
    tensors, total, per_token = {}, 0, 0.0
    for name, shape in names.items():
        kind = recipe_kind("q2", name, shape)
        data = random_tensor(kind, shape, device, generator)
        tensors[name] = SimpleNamespace(kind=kind, shape=shape, data=data)
        size = data.numel() * data.element_size()
        total += size
        if name.endswith(ROUTED):
            per_token += size * config.n_expert_used / config.n_expert
        elif name == "token_embd.weight":
            per_token += size / config.vocab_size
        else:
            per_token += size
    return Model(bind(config, tensors, "synthetic Flash"), quant_sim=True), total, int(per_token)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved by a device-to-device copy of 2 GiB (read + write), best of 5."""
    source = torch.empty(1 << 29, device=device)
    target = torch.empty_like(source)
    best = min(timed(device, lambda: target.copy_(source)) for _ in range(5))
    return 2 * source.numel() * 4 / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=43)
    parser.add_argument("--prefill", type=int, default=2048, help="tokens prefilled (timed)")
    parser.add_argument("--context", type=int, default=1024, help="context before the timed decode")
    parser.add_argument("--decode", type=int, default=64, help="decode steps timed")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    }
    start = time.perf_counter()

    if not args.skip_kernels:
        figures["kernel_worst_error_over_bound"] = agreement = kernel_agreement(device)
        print("kernel agreement (worst error / bound, must be ≤ 1):", agreement, flush=True)
        if max(agreement.values()) > 1:
            print("FAIL: a kernel disagrees with the reference path", file=sys.stderr)
            return 1

    config = ModelConfig()
    if args.layers != config.n_layer:
        config = ModelConfig(
            n_layer=args.layers,
            n_hash_layer=min(3, args.layers),
            compress_ratios=config.compress_ratios[: args.layers],
            swiglu_limit=config.swiglu_limit[: args.layers],
        )
    build = time.perf_counter()
    model, total, per_token = synthetic_flash(config, device)
    synchronize(device)
    figures |= {"layers": config.n_layer, "weight_bytes": total, "bytes_per_token": per_token}
    built = time.perf_counter() - build
    print(
        f"synthetic Flash: {config.n_layer} layers, {total / 1e9:.1f} GB of weights, built in {built:.1f} s;"
    )
    print(f"a decoded token reads {per_token / 1e9:.2f} GB of weights", flush=True)

    tokens = torch.randint(0, config.vocab_size, (max(args.prefill, args.context),), device=device)
    session = model.new_session()
    seconds = timed(device, lambda: list(model.prefill_chunks(tokens[: args.prefill], session, args.chunk)))
    figures["prefill_tokens_per_s"] = args.prefill / seconds
    print(
        f"prefill {args.prefill} tokens: {seconds:.2f} s, {args.prefill / seconds:.0f} tokens/s", flush=True
    )

    session = model.new_session()
    for _ in model.prefill_chunks(tokens[: args.context], session, args.chunk):
        pass
    token = tokens[args.context - 1 : args.context]

    def decode(steps: int) -> None:
        nonlocal token
        for _ in range(steps):  # greedy, the token never leaves the device: no host sync per step
            token = model.forward(token, session, all_logits=False).argmax(-1)

    decode(2)  # warm-up: kernel compilation
    seconds = timed(device, lambda: decode(args.decode))
    ms = 1000 * seconds / args.decode
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    floor_ms = 1000 * per_token / bandwidth
    figures |= {"decode_ms_per_token": ms, "copy_bandwidth_bytes_per_s": bandwidth, "floor_ms": floor_ms,
                "fraction_of_floor": floor_ms / ms, "seconds": time.perf_counter() - start}  # fmt: skip
    print(f"decode at {args.context} context: {ms:.2f} ms/token ({1000 / ms:.1f} tokens/s); "
          f"{per_token / 1e9:.2f} GB/token at {bandwidth / 1e12:.2f} TB/s measured copy bandwidth: "
          f"floor {floor_ms:.2f} ms, {100 * floor_ms / ms:.1f}% of it reached", flush=True)  # fmt: skip
    print(f"total {figures['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
