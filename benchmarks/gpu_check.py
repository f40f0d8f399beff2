"""The device check of issue 11: Triton kernels and a full-size synthetic Flash on one GPU.

    python benchmarks/gpu_check.py                 # on a CUDA machine; under 5 minutes on an H200
    python benchmarks/gpu_check.py --json out.json # the figures also as JSON

1. Kernel agreement: each Triton kernel (matrix × vector, × small batch, grouped experts,
   dequantize) against the reference path on the GPU, within 1e-5 of Σ|w·x| (the scale of a
   float32 sum's rounding; the decoded weights themselves must be bit-identical).
1b. Kernel timings: the matrix × vector kernel before (`gpu_kernels_before.py`) and now, per
   format on real Flash shapes (device µs per launch, weight bytes read per second, cold L2),
   and a few alternative tile shapes of the new one (each checked against the reference); the
   fastest per format is used for the model below (`--no-tune`: the defaults). Then the GEMM
   kernel of prefill (a 2048-token chunk) against the per-expert decode + float32 GEMM it
   replaced, in each precision.
2. A full-size synthetic DeepSeek V4 Flash (43 layers, real widths) in ds4's q2 recipe
   (IQ2_XXS gate/up, Q2_K down, Q8_0 attention/shared/head, F16 embedding/mixers/router, F32
   vectors), random valid blocks generated directly in device memory: no file.
3. Prefill of 2048 tokens (tokens/s), then decode at 1k context: ms/token, the weight bytes one
   token reads, the device's measured copy bandwidth and the fraction of the bandwidth floor
   (bytes per token / bandwidth) reached. Goals (issue 11): ≥ 50% of the floor in decode,
   ≥ 5,000 tokens/s prefill on an H200-class GPU.
4. One decode step captured in a CUDA graph and replayed (the same step at the same position
   each time: what a step costs without launch overhead), its logits compared with the same
   step run eagerly. A failed capture is reported; the eager figures stand.

`--layers`, `--context`, `--prefill`, `--decode` shrink it for a dry run (`--device cpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
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
    (rows, cols) experts: 1e-5 of Σ|w·x| in float32 (the GEMM kernel in "ieee" precision), and
    2^-8 of it for the GEMM kernel's default tf32 ("<kind> tf32")."""
    from dwarfstar.quant.triton import KINDS, kernels

    rng = np.random.default_rng(0)
    worst = {}
    for kind in KINDS:
        w = QTensor.from_numpy(kind, (8, rows, cols), random_blocks(kind, (8, rows, cols), rng))
        w = QTensor(kind, w.shape, w.data.to(device))
        dense = torch.stack([quant.dequantize(QTensor(kind, w.shape[1:], w.data[e].cpu())) for e in range(8)])
        assert torch.equal(kernels.dequantize(w[3]).cpu(), dense[3]), f"{kind.name}: decoded values differ"
        ratios, tf32 = [], []
        for n in (1, 4, 64):
            x = torch.randn(n, cols, device=device)
            out = kernels.gemm(x, w[5], precision="ieee") if n > 8 else kernels.linear(x, w[5])
            ratios.append(_ratio(out, x, dense[5]))
        tf32.append(_ratio(kernels.linear(x, w[5]), x, dense[5], 2**-8))
        for n in (3, 40):  # 6 pairs: the matrix × vector kernel; 80: the grouped GEMM
            x = torch.randn(n, cols, device=device)
            ids = torch.randint(0, 8, (n, 2), device=device)
            ids[0] = torch.tensor([7, 7])
            pairs = [(i, j, int(ids[i, j])) for i in range(n) for j in range(2)]
            out = (
                kernels.gemm(x, w, ids, 2, "ieee").view(n, 2, -1)
                if n > 3
                else kernels.expert_linear(x, w, ids)
            )
            ratios += [_ratio(out[i, j][None], x[i][None], dense[e]) for i, j, e in pairs]
        out = kernels.expert_linear(x, w, ids)
        tf32 += [_ratio(out[i, j][None], x[i][None], dense[e], 2**-8) for i, j, e in pairs]
        worst[kind.name] = max(ratios)
        worst[f"{kind.name} tf32"] = max(tf32)
    return worst


def _ratio(ours: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, scale: float = 1e-5) -> float:
    x64, w64 = x.double().cpu(), dense.double()
    bound = scale * (x64.abs() @ w64.abs().T) + 1e-30
    return float(((ours.double().cpu() - x64 @ w64.T).abs() / bound).max())


KERNEL_CASES = (  # (format, what, stored shape, how inputs meet the weights)
    (T.Q8_0, "attn_output_b", (4096, 8192), "matrix"),
    (T.Q8_0, "attn_q_a", (1024, 4096), "matrix"),
    (T.Q8_0, "output head", (129280, 4096), "matrix"),
    (T.F16, "attn_compressor_kv", (1024, 4096), "matrix"),
    (T.BF16, "a matrix", (1024, 4096), "matrix"),
    (T.Q4_K, "a matrix", (4096, 4096), "matrix"),
    (T.IQ2_XXS, "ffn_gate_exps, 6 of", (256, 2048, 4096), "shared"),  # one token's input, 6 experts
    (T.Q2_K, "ffn_down_exps, 6 of", (256, 4096, 2048), "slots"),  # one input row per expert
)


def device_seconds(device: torch.device, run, repeats: int = 15) -> float:
    """Best device time of `run()` over `repeats`, each after 256 MiB written (a cold L2, and a
    busy GPU while the host launches `run`)."""
    flush = torch.empty(1 << 26, dtype=torch.int32, device=device)
    events = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    synchronize(device)
    return min(start.elapsed_time(end) for start, end in events) / 1000


def candidate_configs(code: int) -> list:
    from dwarfstar.quant.triton.kernels import MATVEC_CONFIGS, MatvecConfig

    base = MATVEC_CONFIGS[code]
    b = base.blocks
    shapes = [(base.rows, b, base.warps), (4, b, 4), (16, b, 4), (8, 2 * b, 4), (16, 2 * b, 8), (32, b, 8),
              (4, b, 2), (8, max(1, b // 2), 4)]  # fmt: skip
    return list(dict.fromkeys(MatvecConfig(*shape) for shape in shapes))


def kernel_timings(device: torch.device, tune_seconds: float, tune: bool) -> dict[str, dict]:
    """Old and new matrix × vector kernels on each case of KERNEL_CASES; with `tune`, the fastest
    correct tile shape per format replaces the default in `kernels.MATVEC_CONFIGS`."""
    from gpu_kernels_before import old_matvec

    from dwarfstar.quant.triton import kernels

    generator = torch.Generator(device=device).manual_seed(1)
    deadline = time.perf_counter() + tune_seconds
    results: dict[str, dict] = {}
    totals: dict[int, dict] = {}  # format code -> config -> [seconds per case]
    for kind, what, shape, mode in KERNEL_CASES:
        code = kernels.FORMAT_CODES[kind]
        w = QTensor(kind, shape, random_tensor(kind, shape, device, generator))
        rows, cols = shape[-2:]
        ids, divisor, matrices = None, 1, 1
        x = torch.randn(1, cols, device=device, generator=generator)
        if mode != "matrix":
            ids = torch.randperm(shape[0], device=device, generator=generator)[:6]
            matrices = 6
            if mode == "shared":
                divisor = 6
            else:
                x = torch.randn(6, cols, device=device, generator=generator)
        chosen = [w[int(e)] for e in ids.tolist()] if ids is not None else [w]
        dense = torch.stack([kernels.dequantize(m) for m in chosen]).double()  # bit-exact decode
        x64 = x.double().expand(matrices, -1) if mode == "shared" else x.double()
        exact = torch.einsum("prc,pc->pr", dense, x64)
        bound = 1e-5 * torch.einsum("prc,pc->pr", dense.abs(), x64.abs()) + 1e-30
        nbytes = matrices * rows * w.data.stride(-2) * w.data.element_size()
        old = device_seconds(device, partial(old_matvec, x, w, ids, divisor))
        label = f"{kind.name} {what} {'x'.join(map(str, shape[-2:]))}"
        case = {"bytes": nbytes, "old_s": old, "configs": {}}
        for config in candidate_configs(code):
            if config != kernels.MATVEC_CONFIGS[code] and time.perf_counter() > deadline:
                break
            try:
                out = kernels.matvec(x, w, ids, divisor, config)
                ratio = float(((out.double() - exact).abs() / bound).max())
                seconds = device_seconds(device, partial(kernels.matvec, x, w, ids, divisor, config))
            except Exception as error:  # a tile shape the compiler refuses: report, try the next
                print(f"  {label} {config}: {type(error).__name__}: {error}", flush=True)
                continue
            key = f"rows={config.rows} blocks={config.blocks} warps={config.warps}"
            case["configs"][key] = {"seconds": seconds, "error_over_bound": ratio}
            if ratio <= 1:
                totals.setdefault(code, {}).setdefault(config, []).append(seconds)
        default = case["configs"].get(
            "rows={0.rows} blocks={0.blocks} warps={0.warps}".format(kernels.MATVEC_CONFIGS[code]), {}
        )
        new = default.get("seconds", float("nan"))
        best_key = min(case["configs"], key=lambda k: case["configs"][k]["seconds"], default="none")
        best = case["configs"].get(best_key, {}).get("seconds", float("nan"))
        print(f"{label:44} {nbytes / 1e6:7.1f} MB  old {old * 1e6:7.1f} µs {nbytes / old / 1e12:5.2f} TB/s"
              f"  new {new * 1e6:7.1f} µs {nbytes / new / 1e12:5.2f} TB/s (error/bound "
              f"{default.get('error_over_bound', float('nan')):.3f})  best {best * 1e6:7.1f} µs "
              f"{nbytes / best / 1e12:5.2f} TB/s {best_key}", flush=True)  # fmt: skip
        results[label] = case
    for code, by_config in totals.items():
        cases = max(len(t) for t in by_config.values())
        complete = {c: sum(t) for c, t in by_config.items() if len(t) == cases}
        fastest = min(complete, key=complete.get)
        name = next(k.name for k, v in kernels.FORMAT_CODES.items() if v == code)
        print(f"  {name}: default {kernels.MATVEC_CONFIGS[code]}, fastest {fastest}", flush=True)
        if tune:
            kernels.MATVEC_CONFIGS[code] = fastest
    return results


GEMM_CASES = (  # (format, what, stored shape, how inputs meet the weights: as in KERNEL_CASES)
    (T.IQ2_XXS, "ffn_gate_exps, 2048 tokens × 6 of", (256, 2048, 4096), "shared"),
    (T.Q2_K, "ffn_down_exps, 2048 tokens × 6 of", (256, 4096, 2048), "slots"),
    (T.Q8_0, "attn_q_b, 2048 tokens ×", (32768, 1024), "matrix"),
)


def gemm_timings(device: torch.device, tokens: int = 2048) -> dict[str, dict]:
    """The products of a 2048-token prefill chunk: before (per-expert decode + float32 GEMM) and
    the GEMM kernel in each precision: device ms and TFLOP/s."""
    from gpu_kernels_before import old_expert_gemm

    from dwarfstar.quant.triton import kernels

    generator = torch.Generator(device=device).manual_seed(2)
    results = {}
    for kind, what, shape, mode in GEMM_CASES:
        w = QTensor(kind, shape, random_tensor(kind, shape, device, generator))
        rows, cols = shape[-2:]
        if mode == "matrix":
            x = torch.randn(tokens, cols, device=device, generator=generator)
            pairs, old = tokens, partial(lambda x, w: x @ kernels.dequantize(w).T, x, w)
            new = partial(kernels.gemm, x, w)
        else:
            scores = torch.rand(tokens, shape[0], device=device, generator=generator)
            ids = scores.topk(min(6, shape[0]), dim=-1).indices
            if mode == "slots":
                x = torch.randn(tokens * 6, cols, device=device, generator=generator)
                ids = ids.reshape(-1, 1)
            else:
                x = torch.randn(tokens, cols, device=device, generator=generator)
            pairs, old = ids.numel(), partial(old_expert_gemm, x, w, ids)
            new = partial(kernels.gemm, x, w, ids, ids.shape[1])
        flops = 2 * pairs * rows * cols
        times = {"old": device_seconds(device, old, repeats=3)}
        for precision in ("ieee", "tf32x3", "tf32"):
            times[precision] = device_seconds(device, partial(new, precision=precision), repeats=3)
        if mode == "matrix":  # what the model runs for this many rows: decoded once, then tf32
            times["decoded once, tf32"] = device_seconds(device, partial(kernels.linear, x, w), repeats=3)
        label = f"{kind.name} {what} {'x'.join(map(str, shape[-2:]))}"
        print(f"{label:52}" + "  ".join(f"{name} {t * 1e3:7.2f} ms {flops / t / 1e12:6.1f} TFLOP/s"
                                        for name, t in times.items()), flush=True)  # fmt: skip
        results[label] = times
    return results


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


def capture_decode_step(model: Model, session, token: torch.Tensor):
    """A decode step of `token` captured in a CUDA graph (not yet run) and its logits' tensor.
    The session's host counters advance at capture; each replay computes the same step."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.forward(token, session, all_logits=False)
    return graph, logits


def graph_decode(model: Model, session, token: torch.Tensor, steps: int) -> tuple[float, float]:
    """One decode step captured in a CUDA graph, replayed `steps` times (the same step at the
    same position): ms per replay, and the largest difference of its logits from the same step
    run eagerly, over their largest value."""
    before = session.snapshot()
    static = token.clone()
    graph, logits = capture_decode_step(model, session, static)
    graph.replay()
    eager = model.forward(static, before, all_logits=False)
    difference = float((logits - eager).abs().max() / eager.abs().max())
    seconds = timed(token.device, lambda: [graph.replay() for _ in range(steps)])
    return 1000 * seconds / steps, difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=43)
    parser.add_argument("--prefill", type=int, default=2048, help="tokens prefilled (timed)")
    parser.add_argument("--context", type=int, default=1024, help="context before the timed decode")
    parser.add_argument("--decode", type=int, default=64, help="decode steps timed")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk")
    parser.add_argument("--skip-kernels", action="store_true", help="no kernel agreement, timings or tuning")
    parser.add_argument("--tune-seconds", type=float, default=40, help="time for trying tile shapes")
    parser.add_argument("--no-tune", action="store_true", help="the model runs the default tile shapes")
    parser.add_argument("--no-graph", action="store_true", help="no CUDA graph capture")
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
        if device.type == "cuda":
            print("matrix × vector kernels, device time per launch (weight bytes / time), old vs new:")
            figures["kernel_timings"] = kernel_timings(device, args.tune_seconds, not args.no_tune)
            print("GEMM (prefill) products, before and in each precision of the GEMM kernel:")
            figures["gemm_timings"] = gemm_timings(device)
            torch.cuda.empty_cache()  # the timing matrices' memory back before the model is built

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
    if device.type == "cuda" and not args.no_graph:
        try:
            graph_ms, difference = graph_decode(model, session, token, args.decode)
        except Exception as error:  # reported, not fatal: the eager figures above stand
            figures["graph_error"] = f"{type(error).__name__}: {error}"
            print(f"CUDA graph capture of a decode step failed: {figures['graph_error']}", flush=True)
        else:
            figures |= {"graph_ms_per_step": graph_ms, "graph_logits_difference": difference,
                        "graph_fraction_of_floor": floor_ms / graph_ms}  # fmt: skip
            print(f"CUDA graph: one decode step replayed {args.decode} times: {graph_ms:.2f} ms/step "
                  f"(eager {ms:.2f} ms/token), {100 * floor_ms / graph_ms:.1f}% of the floor; logits "
                  f"differ from the eager step's by {difference:.2g} of the largest", flush=True)  # fmt: skip
    figures["seconds"] = time.perf_counter() - start
    print(f"total {figures['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
