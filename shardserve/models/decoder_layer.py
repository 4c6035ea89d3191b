"""The pre-norm transformer block every supported family shares:

    x -> RMSNorm -> self_attn -> (+ residual) -> RMSNorm -> mlp -> (+ residual, in the next norm)

Subclasses build `input_layernorm`, `self_attn(positions, hidden)`, `post_attention_layernorm`
and `mlp(hidden)`; the residual add is fused into the next norm (RMSNorm(x, residual)).
"""

from __future__ import annotations

import torch
from torch import nn


class PreNormDecoderLayer(nn.Module):
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual
