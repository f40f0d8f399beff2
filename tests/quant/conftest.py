"""The instruction sets of the compiled CPU kernels, shared by the kernel test modules."""

import pytest

try:
    from dwarfstar.quant import _cpu
except ImportError:  # the kernel test modules fail on their own import, with the fix in the message
    _cpu = None

ISAS = ["portable", "avx2", "avx512", "avx512vnni"]
ISAS = ISAS[: ISAS.index(_cpu.isa()) + 1] if _cpu else []  # every instruction set up to this CPU's best


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per instruction set, the best one restored after."""
    best = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(best)
