"""DeepSeek-V2 / V2-Lite / V2.5 / V3 / R1: multi-head latent attention + mixture of experts.

One decoder layer, this rank's part (TP splits heads and intermediate dims):

    x -> input_layernorm -> attention:
           q = q_proj(x)                          (q_lora_rank None: V2-Lite)
             | q_b_proj(q_a_layernorm(q_a_proj(x)))  (V2, V3)
           [q_nope | q_pe] per head;  [c_kv | k_pe] = kv_a_proj_with_mqa(x), c_kv normed
           RoPE on q_pe and k_pe only (decoupled; YaRN with DeepSeek's mscale)
           MLAAttention caches [c_kv | k_pe] per token and attends (layers/mla_attention.py)
           o_proj (row parallel; all-reduced by the norm after it, decoder_layer.py)
      -> post_attention_layernorm -> MLP: dense SwiGLU (first_k_dense_replace layers) or
           MoE = routed experts (FusedMoE, layers/moe.py) + shared experts; one all-reduce,
           again in the next norm

The router keeps float32 weights and logits, as transformers does. Checkpoint names are
Hugging Face's; gate/up projections are fused (gate_up_proj) and experts stacked
(experts.w13_weight / w2_weight); FP8 block-quantized checkpoints are dequantized on load
(loader/fp8.py). Multi-token-prediction layers (V3's layer 61) are not loaded.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.linear import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                      divide)
from shardserve.layers.mla_attention import MLAAttention
from shardserve.layers.moe import FusedMoE
from shardserve.layers.moe_routing import RoutingConfig
from shardserve.layers.rotary import get_rope, get_rope_config
from shardserve.layers.weight_utils import LoadedWeight, default_weight_loader, set_weight_attrs
from shardserve.models.decoder_layer import PreNormDecoderLayer
from shardserve.models.pipeline import (IntermediateTensors, StageDecoderModel, stage_lm_head,
                                        StageLayout)
from shardserve.loader.fp8 import dequantize_fp8_weights, fp8_block_size
from shardserve.models.deepseek_memory import deepseek_memory, is_moe_layer
from shardserve.models.llama import LlamaMLP
from shardserve.models.weight_loading import load_checkpoint_weights

logger = logging.getLogger(__name__)

# transformers' DeepseekV2/V3 build q_a_layernorm and kv_a_layernorm with the default eps.
_LORA_NORM_EPS = 1e-6


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: Any) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN: DeepSeek's
    correction for the longer context (the cos/sin tables carry mscale / mscale_all_dim)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, rope_scaling = get_rope_config(config)
    if rope_scaling and rope_scaling.get("rope_type", "default") != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            scale *= yarn_mscale(rope_scaling["factor"], mscale_all_dim) ** 2
    return scale


class DeepseekV2MoE(nn.Module):
    """Router (float32) -> routed experts + shared experts: this rank's partial sum, which the
    next norm all-reduces (models/decoder_layer.py)."""

    returns_partial_sum = True

    def __init__(self, config: Any, dtype: torch.dtype | None, v3: bool) -> None:
        super().__init__()
        routing = RoutingConfig.from_deepseek_config(config, v3)
        self.gate = ReplicatedLinear(config.hidden_size, routing.num_experts, bias=False,
                                     params_dtype=torch.float32)
        if routing.topk_method == "noaux_tc":
            self.gate.e_score_correction_bias = nn.Parameter(
                torch.zeros(routing.num_experts, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(self.gate.e_score_correction_bias,
                             {"weight_loader": default_weight_loader})
        self.experts = FusedMoE(config.hidden_size, config.moe_intermediate_size, routing, dtype,
                                reduce_results=False)
        num_shared = int(getattr(config, "n_shared_experts", 0) or 0)
        self.shared_experts = LlamaMLP(
            config.hidden_size, config.moe_intermediate_size * num_shared, config.hidden_act,
            False, dtype, reduce_results=False) if num_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = F.linear(x.float(), self.gate.weight)
        out = self.experts(x, router_logits, getattr(self.gate, "e_score_correction_bias", None))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekV2Attention(nn.Module):
    """Projections and RoPE around MLAAttention (this rank's heads)."""

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype | None,
                 max_model_len: int, rope_interleave: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = divide(config.num_attention_heads, get_tp_group().world_size,
                                "num_attention_heads")
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        bias = bool(getattr(config, "attention_bias", False))
        total_q = config.num_attention_heads * self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, total_q, bias=False, params_dtype=dtype)
        else:
            self.q_a_proj = ReplicatedLinear(h, self.q_lora_rank, bias=bias, params_dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LORA_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_q, bias=False,
                                                 params_dtype=dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, self.kv_lora_rank + self.qk_rope_head_dim,
                                                   bias=bias, params_dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LORA_NORM_EPS, dtype)
        kv_b_rows = config.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, kv_b_rows, bias=False,
                                              params_dtype=dtype)
        # A bias is added once, after the all-reduce, so a biased o_proj reduces itself.
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.v_head_dim, h,
                                        bias=bias, reduce_results=bool(bias),
                                        params_dtype=dtype)
        base, rope_scaling = get_rope_config(config)
        # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)... (GPT-J style); V3 configs
        # may say rope_interleave False for the rotate-half layout.
        self.rotary_emb = get_rope(self.qk_rope_head_dim, self.qk_rope_head_dim,
                                   config.max_position_embeddings, base, rope_scaling,
                                   is_neox_style=not rope_interleave, num_positions=max_model_len)
        self.mla_attn = MLAAttention(self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                                     self.v_head_dim, self.kv_lora_rank, softmax_scale(config),
                                     self.kv_b_proj, layer_idx)

    @property
    def returns_partial_sum(self) -> bool:
        return not self.o_proj.reduce_results

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(num_tokens, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(num_tokens, -1), k_pe.contiguous())
        out = self.mla_attn(q_nope, q_pe.view(num_tokens, self.num_heads, -1), kv_c, k_pe)
        return self.o_proj(out)


class DeepseekV2DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype | None,
                 max_model_len: int, v3: bool) -> None:
        super().__init__()
        rope_interleave = bool(getattr(config, "rope_interleave", True)) if v3 else True
        self.self_attn = DeepseekV2Attention(config, layer_idx, dtype, max_model_len,
                                             rope_interleave)
        if is_moe_layer(config, layer_idx):
            self.mlp: nn.Module = DeepseekV2MoE(config, dtype, v3)
        else:
            self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                False, dtype, reduce_results=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class DeepseekV2Model(StageDecoderModel):
    """Embedding (first pipeline stage), this stage's decoder layers, final norm (last
    stage); see models/pipeline.py."""

    def __init__(self, config: Any, dtype: torch.dtype | None, max_model_len: int,
                 v3: bool, stage: StageLayout | None = None) -> None:
        super().__init__(config, dtype, stage, lambda i: DeepseekV2DecoderLayer(
            config, i, dtype, max_model_len, v3))


# checkpoint name part -> (our fused parameter, shard id), for dense MLPs and shared experts
_STACKED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV2ForCausalLM(nn.Module):
    """DeepseekV2ForCausalLM(hf_config, dtype, max_model_len): the model interface of
    models/llama.py (forward over packed tokens, compute_logits, load_weights)."""

    is_v3 = False

    def __init__(self, hf_config: Any, dtype: torch.dtype | None = None,
                 max_model_len: int = 0, stage: StageLayout | None = None) -> None:
        super().__init__()
        self.config = hf_config
        self.fp8_block_size = fp8_block_size(hf_config)
        self.model = DeepseekV2Model(hf_config, dtype, max_model_len, self.is_v3, stage)
        self.stage = self.model.stage
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = stage_lm_head(hf_config, dtype, self.model, self.tie_word_embeddings)
        self._log_kv_cache_size(dtype)

    def _log_kv_cache_size(self, dtype: torch.dtype | None) -> None:
        elem = torch.tensor([], dtype=dtype or torch.get_default_dtype()).element_size()
        mem = deepseek_memory(self.config, get_tp_group().world_size, elem)
        logger.info("MLA KV cache: %d bytes per token (%d layers x (kv_lora_rank %d + rope %d) "
                    "x %d B); standard attention with %d heads would cache %d bytes (%.1fx more)",
                    mem.kv_bytes_per_token, self.config.num_hidden_layers,
                    self.config.kv_lora_rank, self.config.qk_rope_head_dim, elem,
                    self.config.num_attention_heads, mem.mha_kv_bytes_per_token,
                    mem.mha_kv_bytes_per_token / mem.kv_bytes_per_token)
        moe = next((m for m in self.modules() if isinstance(m, FusedMoE)), None)
        if moe is not None:
            logger.info("MoE experts on this rank: %s", moe.extra_repr())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None
                ) -> torch.Tensor | IntermediateTensors:
        """input_ids, positions [T] -> final hidden states [T, hidden_size] (pipeline stages:
        see models/llama.py LlamaForCausalLM.forward)."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor,
                       gather_all: bool = True) -> torch.Tensor | None:
        """[T, hidden_size] -> [T, vocab_size] float32 (see ParallelLMHead.compute_logits)."""
        return self.lm_head.compute_logits(hidden_states, gather_all)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        """Load HF-named checkpoint tensors; returns the parameters that received all their
        parts (a fused gate_up_proj both halves, an expert stack every local expert)."""
        if self.fp8_block_size is not None:
            weights = dequantize_fp8_weights(weights, self.fp8_block_size)
        num_layers = self.config.num_hidden_layers
        # Multi-token-prediction layers past the decoder are not loaded.
        weights = ((name, w) for name, w in weights
                   if not ((layer := _LAYER.match(name)) and int(layer.group(1)) >= num_layers))
        return load_checkpoint_weights(self, weights, _STACKED)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: V2's model with the sigmoid, bias-corrected noaux_tc router (and
    FP8 block-quantized checkpoints)."""

    is_v3 = True
