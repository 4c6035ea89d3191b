"""The pre-norm transformer block every supported family shares:

    x -> RMSNorm -> self_attn -> (+ residual) -> RMSNorm -> mlp -> (+ residual, in the next norm)

Subclasses build `input_layernorm`, `self_attn(positions, hidden)`, `post_attention_layernorm`
and `mlp(hidden)`; the residual add is fused into the next norm (RMSNorm(x, residual)).

So is the tensor-parallel all-reduce of a sublayer's output, where the sublayer leaves it to
the caller: a sublayer with `returns_partial_sum = True` returns this rank's partial sum (its
row-parallel projection not reduced), and the norm after it reduces it (RMSNorm(x, residual,
reduce_partial=True)), in one kernel with the add and the norm on GPUs with the custom
all-reduce. After the MLP that norm is the next layer's input_layernorm, or the final norm, so
the caller passes `hidden_is_partial` in and reads `output_is_partial` (models/pipeline.py).
The vocabulary-parallel embedding is such a sublayer too: under TP the first layer gets its
partial sum with no residual yet, and its input_layernorm reduces it.
"""

from __future__ import annotations

import torch
from torch import nn


def returns_partial_sum(sublayer: nn.Module) -> bool:
    """Whether `sublayer`'s output is this TP rank's partial sum, left for the next norm to
    all-reduce (see the module doc); sublayers that reduce their own output say nothing."""
    return bool(getattr(sublayer, "returns_partial_sum", False))


class PreNormDecoderLayer(nn.Module):
    @property
    def output_is_partial(self) -> bool:
        """Whether forward's hidden states are a partial sum the next norm must all-reduce."""
        return returns_partial_sum(self.mlp)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, hidden_is_partial: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None and not hidden_is_partial:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:  # the first layer's partial embedding comes with residual None
            hidden_states, residual = self.input_layernorm(hidden_states, residual,
                                                           reduce_partial=hidden_is_partial)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(
            hidden_states, residual, reduce_partial=returns_partial_sum(self.self_attn))
        return self.mlp(hidden_states), residual
