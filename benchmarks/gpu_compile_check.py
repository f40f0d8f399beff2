"""Compile every Triton product kernel for a GPU architecture on a machine without one.

    python benchmarks/gpu_compile_check.py [--arch 90] [--sweep]

Triton's wheels bring NVIDIA's assembler, so each variant the model launches (`matvec_kernel`
per format, with and without expert ids, in its configured tile shape; `gemm_kernel` per format,
plain and grouped, in each precision) is compiled to a cubin here, and its registers and spills
(stack bytes) are printed from `cuobjdump`. A compile error or a spill found here costs nothing;
found on a lent GPU it costs the run. `--sweep` adds the tile shapes `gpu_check.py` tries.
Uses Triton's compiler entry points (`ASTSource`, `triton.compile`), which change between
releases: written against Triton 3.6 to 3.9.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dwarfstar.quant.triton import kernels as K

WEIGHT_POINTER = {K.F16: "*fp16", K.BF16: "*bf16"}
MATVEC_INTS = (
    "rows cols row_stride expert_stride x_stride x_divisor out_stride split_stride n_blocks blocks_per_split"
)
GEMM_INTS = "pairs rows cols row_stride expert_stride x_stride x_divisor out_stride n_experts"


def compile_kernel(fn, types: dict[str, str], constants: dict[str, object], target: GPUTarget, warps: int):
    names = fn.arg_names
    signature = {name: "constexpr" if name in constants else types[name] for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    return triton.compile(ASTSource(fn, signature, constexprs), target=target, options={"num_warps": warps})


def resources(compiled) -> str:
    """Registers and stack (spill) bytes a thread, from the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    fields = dict(f.split(":") for line in out.stdout.splitlines() if "REG:" in line for f in line.split())
    return f"registers {fields.get('REG', '?')}, stack {fields.get('STACK', '?')} bytes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 for H100/H200")
    parser.add_argument("--sweep", action="store_true", help="also the tile shapes gpu_check.py tries")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    start = time.perf_counter()
    for code, has_ids in itertools.product(range(6), (False, True)):
        types = dict(w_ptr=WEIGHT_POINTER.get(code, "*u8"), x_ptr="*fp32", ids_ptr="*i64", grid_ptr="*i64",
                     out_ptr="*fp32") | dict.fromkeys(MATVEC_INTS.split(), "i32")  # fmt: skip
        configs = [K.MATVEC_CONFIGS[code]]
        if args.sweep:
            sys.path.insert(0, os.path.dirname(__file__))
            from gpu_check import candidate_configs

            configs = candidate_configs(code)
        for config in configs:
            constants = dict(FORMAT=code, HAS_IDS=has_ids, ROWS=config.rows, BLOCKS=config.blocks)
            compiled = compile_kernel(K.matvec_kernel, types, constants, target, config.warps)
            print(
                f"matvec_kernel format {code} ids {has_ids!s:5} {config}: {resources(compiled)}", flush=True
            )
    for code, grouped, precision in itertools.product(range(6), (False, True), ("tf32", "tf32x3", "ieee")):
        if precision != K.GEMM_PRECISION and not grouped:
            continue
        values, units = K._TILE[code]
        types = dict(w_ptr=WEIGHT_POINTER.get(code, "*u8"), x_ptr="*fp32", slot_pair_ptr="*i64",
                     tile_expert_ptr="*i64", grid_ptr="*fp32", out_ptr="*fp32")  # fmt: skip
        types |= dict.fromkeys(GEMM_INTS.split(), "i32")
        constants = dict(FORMAT=code, VALUES=values, UNITS=units, GROUPED=grouped, PAIRS=K.GEMM_PAIRS,
                         ROWS=K.GEMM_ROWS, STEP=K.GEMM_STEP, PRECISION=precision)  # fmt: skip
        compiled = compile_kernel(K.gemm_kernel, types, constants, target, K.GEMM_WARPS)
        print(
            f"gemm_kernel format {code} grouped {grouped!s:5} {precision:6}: {resources(compiled)}",
            flush=True,
        )
    pointers = "w_ptr x_ptr slot_pair_ptr tile_expert_ptr grid_ptr out_ptr"
    types = dict.fromkeys(pointers.split(), "*fp32") | dict.fromkeys(GEMM_INTS.split(), "i32")
    constants = dict(FORMAT=K.F16, VALUES=64, UNITS=64, GROUPED=False, PAIRS=K.GEMM_PAIRS, ROWS=K.GEMM_ROWS,
                     STEP=K.GEMM_STEP, PRECISION=K.GEMM_PRECISION)  # fmt: skip
    compiled = compile_kernel(K.gemm_kernel, types, constants, target, K.GEMM_WARPS)
    print(f"gemm_kernel float32 weights (decoded once): {resources(compiled)}", flush=True)
    print(f"all compiled for sm_{args.arch} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
