"""Modules built on pyllm's ops, drop-in replacements for their LLaMA counterparts."""
from __future__ import annotations

import torch
from torch import nn

from pyllm.ops.swiglu import swiglu_packed


class SwiGLUMLP(nn.Module):
    """LLaMA's MLP, down(silu(x W_gate) * (x W_up)), with the gate and up projections fused into
    one matmul whose (..., 2 * hidden_dim) output feeds the fused SwiGLU kernel directly.

    gate_up.weight is [W_gate; W_up] stacked along the output dim, so a LLaMA checkpoint loads
    with gate_up.weight = torch.cat([w1.weight, w3.weight]) and down.weight = w2.weight.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu_packed(self.gate_up(x))  # (..., 2 * hidden) -> (..., hidden)
        return self.down(h)  # (..., dim)
