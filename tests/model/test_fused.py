"""The fused decode kernels (model/fused.py) agree with the torch operations they replace.

Run in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
Tolerance: float32 rounding of exp and of sums taken in another order, 1e-5 relative.
"""

import pytest
import torch

from dwarfstar.model.hyper import sinkhorn
from dwarfstar.model.norm import rms_norm

fused = pytest.importorskip("dwarfstar.model.fused", reason="triton is a test dependency")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sinkhorn_matches_the_torch_iterations():
    logits = 3 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = sinkhorn(logits, 20, 1e-6)
    ours = fused.sinkhorn(logits.to(DEVICE), 20, 1e-6).cpu()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.sum(-2), torch.ones(3, 4), atol=1e-5)  # columns sum to one


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_torch(weighted):
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, 96, generator=g), torch.randn(96, generator=g)
    w = weight if weighted else None
    ours = fused.rms_norm(x.to(DEVICE), None if w is None else w.to(DEVICE), 1e-6).cpu()
    torch.testing.assert_close(ours, rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_matches_torch(inverse):
    from dwarfstar.model.config import ModelConfig
    from dwarfstar.model.rope import layer_rope

    rope = layer_rope(ModelConfig(), 4)  # YaRN frequencies, 32 pairs
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 96, generator=g)
    positions = torch.tensor([0, 17, 4000])
    ours = fused.rope(x.to(DEVICE), positions.to(DEVICE), rope.freqs.to(DEVICE), inverse).cpu()
    torch.testing.assert_close(ours, rope.apply(x, positions, inverse), rtol=1e-5, atol=1e-5)
