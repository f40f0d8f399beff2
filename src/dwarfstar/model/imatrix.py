"""Collecting an importance matrix: what each routed expert is fed, over a text.

For each layer and routed expert, the sum of squared input activations per input column, and the
number of tokens routed to that expert; only those tokens count. Gate and up share their input
(the FFN-normalized hidden state); down's input is the route-weighted SwiGLU output, as ds4 and
llama.cpp's ``llama-imatrix`` record them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch

from dwarfstar.gguf.imatrix import Imatrix
from dwarfstar.gguf.names import layer_prefix
from dwarfstar.model.model import Model
from dwarfstar.model.moe import observing_experts
from dwarfstar.model.weights import MoE


class ExpertStatistics:
    """Accumulates into ``imatrix`` while used as ``with stats.observing(): model.forward(...)``."""

    def __init__(self, model: Model, imatrix: Imatrix | None = None) -> None:
        self.imatrix = imatrix if imatrix is not None else Imatrix()
        self.n_expert = model.config.n_expert
        self._layers = {id(layer.moe): i for i, layer in enumerate(model.weights.layers)}

    def observing(self) -> AbstractContextManager[None]:
        return observing_experts(self._observe)

    def _observe(self, w: MoE, x: torch.Tensor, experts: torch.Tensor, down_input: torch.Tensor) -> None:
        prefix = layer_prefix(self._layers[id(w)])
        k = experts.shape[1]
        routed = experts.reshape(-1)
        counts = torch.bincount(routed, minlength=self.n_expert).cpu().numpy()
        inputs = x.double().square().repeat_interleave(k, dim=0)  # one row per (token, expert) pair
        squares = x.new_zeros(self.n_expert, x.shape[-1], dtype=torch.float64).index_add_(0, routed, inputs)
        for name in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
            self.imatrix.add(prefix + name, squares.cpu().numpy(), counts)
        hidden = down_input.double().square().reshape(-1, down_input.shape[-1])
        squares = hidden.new_zeros(self.n_expert, hidden.shape[-1]).index_add_(0, routed, hidden)
        self.imatrix.add(prefix + "ffn_down_exps.weight", squares.cpu().numpy(), np.asarray(counts))
