"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B).

Each is its dense sibling's decoder (models/llama.py: Qwen2's q/k/v biases, Qwen3's q/k norms)
with a mixture-of-experts MLP in the sparse layers:

    x -> gate (replicated, model dtype) -> softmax (float32) -> top-k [-> renormalise]
      -> routed experts (FusedMoE: TP-sliced, or whole experts per rank under EP)
      [+ sigmoid(shared_expert_gate(x)) * shared_expert(x)]          (Qwen2-MoE only)
      -> one all-reduce for both

A layer is sparse when it is not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
(transformers' Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer); the others have a dense SwiGLU of
intermediate_size. The shared expert's gate is one scalar per token, so it commutes with the
all-reduce: each rank scales its partial sum.

Checkpoint names are transformers': mlp.gate, mlp.experts.{e}.{gate,up,down}_proj (or stacked
mlp.experts.gate_up_proj / down_proj), mlp.shared_expert.*, mlp.shared_expert_gate;
models/weight_loading.py maps them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from shardserve.layers.linear import ReplicatedLinear
from shardserve.layers.moe import FusedMoE
from shardserve.layers.moe_routing import RoutingConfig
from shardserve.models.llama import LlamaFamilyFlags, LlamaForCausalLM, LlamaMLP, dense_mlp
from shardserve.models.pipeline import StageLayout

logger = logging.getLogger(__name__)


def is_qwen_moe_layer(config: Any, layer: int) -> bool:
    """transformers' rule for Qwen2-MoE and Qwen3-MoE."""
    if int(getattr(config, "num_experts", 0) or 0) <= 0:
        return False
    if layer in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (layer + 1) % int(getattr(config, "decoder_sparse_step", 1) or 1) == 0


class QwenMoeBlock(nn.Module):
    """Router -> routed experts (+ the gated shared expert): this rank's partial sum, which
    the next norm all-reduces (models/decoder_layer.py)."""

    returns_partial_sum = True

    def __init__(self, config: Any, dtype: torch.dtype | None) -> None:
        super().__init__()
        routing = RoutingConfig.from_qwen_moe_config(config)
        hidden, act = config.hidden_size, getattr(config, "hidden_act", "silu")
        self.gate = ReplicatedLinear(hidden, routing.num_experts, bias=False, params_dtype=dtype)
        self.experts = FusedMoE(hidden, config.moe_intermediate_size, routing, dtype,
                                reduce_results=False)
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        self.shared_expert = (LlamaMLP(hidden, shared, act, False, dtype, reduce_results=False)
                              if shared else None)
        self.shared_expert_gate = (ReplicatedLinear(hidden, 1, bias=False, params_dtype=dtype)
                                   if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def qwen_moe_mlp(config: Any, flags: LlamaFamilyFlags, layer_idx: int,
                 dtype: torch.dtype | None) -> nn.Module:
    if is_qwen_moe_layer(config, layer_idx):
        return QwenMoeBlock(config, dtype)
    return dense_mlp(config, flags, layer_idx, dtype)


class QwenMoeForCausalLM(LlamaForCausalLM):
    """Qwen2MoeForCausalLM / Qwen3MoeForCausalLM: the interface of LlamaForCausalLM."""

    make_mlp = staticmethod(qwen_moe_mlp)

    def __init__(self, hf_config: Any, dtype: torch.dtype | None = None,
                 max_model_len: int = 0, stage: StageLayout | None = None) -> None:
        super().__init__(hf_config, dtype, max_model_len, stage)
        moe = next((m for m in self.modules() if isinstance(m, FusedMoE)), None)
        if moe is not None:
            logger.info("MoE experts on this rank: %s", moe.extra_repr())
