"""Builds the compiled CPU kernels; everything else is in pyproject.toml.

The extensions are optional: without a working C compiler the package still installs;
`dwarfstar.quant` falls back to its pure-torch kernels with a warning, and the model's small
decode-step operations (`dwarfstar.model._fused`) to their torch code.
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread"]
link_args = [] if sys.platform == "win32" else ["-pthread"]
FLOAT_DOT = "src/dwarfstar/quant/csrc/float_dot.h"  # included by both
CPU_SHARED = "src/dwarfstar/quant/csrc/cpu_shared.h"

setup(
    ext_modules=[
        Extension(
            "dwarfstar.quant._cpu",
            sources=["src/dwarfstar/quant/csrc/cpu_kernels.c", "src/dwarfstar/quant/csrc/cpu_gemm.c"],
            depends=[FLOAT_DOT, CPU_SHARED],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        ),
        Extension(
            "dwarfstar.model._fused",
            sources=["src/dwarfstar/model/csrc/fused_cpu.c"],
            depends=[FLOAT_DOT],
            extra_compile_args=compile_args,
            optional=True,
        ),
    ]
)
