"""DeepSeek-V2 / V2-Lite / V2.5 / V3 / R1: multi-head latent attention + mixture of experts.

One decoder layer, this rank's part (TP splits heads and intermediate dims):

    x -> input_layernorm -> attention:
           q = q_proj(x)                          (q_lora_rank None: V2-Lite)
             | q_b_proj(q_a_layernorm(q_a_proj(x)))  (V2, V3)
           [q_nope | q_pe] per head;  [c_kv | k_pe] = kv_a_proj_with_mqa(x), c_kv normed
           RoPE on q_pe and k_pe only (decoupled; YaRN with DeepSeek's mscale)
           MLAAttention caches [c_kv | k_pe] per token and attends (layers/mla_attention.py)
           o_proj (row parallel, all-reduced)
      -> post_attention_layernorm -> MLP: dense SwiGLU (first_k_dense_replace layers) or
           MoE = routed experts (FusedMoE, layers/moe.py) + shared experts, one all-reduce

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
from shardserve.errors import UnsupportedModelError
from shardserve.layers.activation import SiluAndMul
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                      ReplicatedLinear, RowParallelLinear, divide)
from shardserve.layers.mla_attention import MLAAttention
from shardserve.layers.moe import FusedMoE
from shardserve.layers.moe_routing import RoutingConfig
from shardserve.layers.rotary import get_rope, get_rope_config
from shardserve.layers.weight_utils import LoadedWeight, default_weight_loader, set_weight_attrs
from shardserve.models.decoder_layer import PreNormDecoderLayer
from shardserve.models.pipeline import (IntermediateTensors, StageDecoderModel, stage_lm_head,
                                        StageLayout, tied_head_weight_name)
from shardserve.loader.fp8 import dequantize_fp8_weights, fp8_block_size
from shardserve.models.deepseek_memory import deepseek_memory, is_moe_layer

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


class DeepseekV2MLP(nn.Module):
    """SwiGLU, TP-sliced. reduce_results=False leaves the all-reduce to the caller (the MoE
    block reduces routed + shared experts together)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str,
                 dtype: torch.dtype | None, reduce_results: bool = True) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise UnsupportedModelError(f"MLP activation {hidden_act!r} is not supported "
                                        "(only 'silu').")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       bias=False, params_dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False,
                                           reduce_results=reduce_results, params_dtype=dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DeepseekV2MoE(nn.Module):
    """Router (float32) -> routed experts + shared experts -> one all-reduce."""

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
        self.shared_experts = DeepseekV2MLP(
            config.hidden_size, config.moe_intermediate_size * num_shared, config.hidden_act,
            dtype, reduce_results=False) if num_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = F.linear(x.float(), self.gate.weight)
        out = self.experts(x, router_logits, getattr(self.gate, "e_score_correction_bias", None))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return get_tp_group().all_reduce(out)


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
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.v_head_dim, h,
                                        bias=bias, params_dtype=dtype)
        base, rope_scaling = get_rope_config(config)
        # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)... (GPT-J style); V3 configs
        # may say rope_interleave False for the rotate-half layout.
        self.rotary_emb = get_rope(self.qk_rope_head_dim, self.qk_rope_head_dim,
                                   config.max_position_embeddings, base, rope_scaling,
                                   is_neox_style=not rope_interleave, num_positions=max_model_len)
        self.mla_attn = MLAAttention(self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                                     self.v_head_dim, self.kv_lora_rank, softmax_scale(config),
                                     self.kv_b_proj, layer_idx)

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
            self.mlp = DeepseekV2MLP(config.hidden_size, config.intermediate_size,
                                     config.hidden_act, dtype)
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
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_EXPERT_SHARD = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"),
                 "down_proj": ("w2_weight", "w2"), "gate_up_proj": ("w13_weight", "w13")}
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
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        parts_seen: dict[str, set[Any]] = {}
        unexpected: list[str] = []
        num_layers = self.config.num_hidden_layers
        for name, weight in weights:
            layer = _LAYER.match(name)
            if "rotary_emb." in name or (layer and int(layer.group(1)) >= num_layers):
                continue  # HF buffers; multi-token-prediction layers past the decoder
            if not self.stage.owns_weight(name, self.tie_word_embeddings):
                continue  # another pipeline stage's
            name = tied_head_weight_name(name, self.stage, self.tie_word_embeddings)
            if name is None:
                continue
            param_name, args = self._route(name)
            param = params.get(param_name)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, weight, *args)
            if args:
                parts_seen.setdefault(param_name, set()).add(args)
            else:
                loaded.add(param_name)
        loaded.update(name for name, seen in parts_seen.items() if self._is_complete(name, seen))
        if unexpected:
            logger.warning("Ignored %d checkpoint tensors the model has no parameter for: %s",
                           len(unexpected), ", ".join(unexpected[:10]))
        return loaded

    def _route(self, name: str) -> tuple[str, tuple]:
        """Checkpoint name -> (our parameter, extra weight_loader args)."""
        m = _EXPERT.match(name)
        if m:
            param, shard = _EXPERT_SHARD[m.group(3)]
            return f"{m.group(1)}.{param}", (shard, int(m.group(2)))
        m = _STACKED_EXPERTS.match(name)
        if m:
            param, shard = _EXPERT_SHARD[m.group(2)]
            return f"{m.group(1)}.{param}", (shard, None)
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _STACKED:
                fused, shard_id = _STACKED[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), (shard_id,)
        return name, ()

    def _is_complete(self, param_name: str, seen: set[tuple]) -> bool:
        """Whether a fused parameter got every part: gate and up; or a stacked expert tensor,
        or each local expert's shards."""
        if param_name.endswith("gate_up_proj.weight"):
            return seen >= {(0,), (1,)}
        shards = ("w2",) if param_name.endswith("w2_weight") else ("w1", "w3")
        if ("w2" if shards == ("w2",) else "w13", None) in seen:
            return True
        moe = self.get_submodule(param_name.rsplit(".", 1)[0])
        experts = range(moe.expert_start, moe.expert_start + moe.num_local_experts)
        return seen >= {(s, e) for s in shards for e in experts}


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: V2's model with the sigmoid, bias-corrected noaux_tc router (and
    FP8 block-quantized checkpoints)."""

    is_v3 = True
