"""Llama-family decoder, tensor-parallel: Llama (and Mistral), Qwen2 and Qwen3 in one
implementation.

They differ only in flags read from the config (`LlamaFamilyFlags`): Qwen2 has q/k/v biases,
Qwen3 normalises each query/key head (q_norm/k_norm) before RoPE and sets head_dim explicitly,
Llama may have attention/MLP biases. Weights use the HF names, except that q/k/v and gate/up
are fused (qkv_proj, gate_up_proj) so one GEMM does each; `load_weights` maps the names
(models/weight_loading.py). The Qwen MoE models (models/qwen_moe.py) are this decoder with a
mixture-of-experts MLP (`make_mlp`).

Tokens arrive packed: input_ids and positions are [T] over all scheduled requests, activations
are [T, hidden]; attention finds request boundaries in the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.errors import UnsupportedModelError
from shardserve.layers.activation import SiluAndMul
from shardserve.layers.attention import Attention
from shardserve.layers.layernorm import RMSNorm
from shardserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.layers.rotary import check_rope_config, get_rope, get_rope_config
from shardserve.layers.weight_utils import LoadedWeight
from shardserve.loader.fp8 import dequantize_fp8_weights, fp8_block_size
from shardserve.models.decoder_layer import PreNormDecoderLayer
from shardserve.models.pipeline import (IntermediateTensors, StageDecoderModel, stage_lm_head,
                                        StageLayout)
from shardserve.models.weight_loading import load_checkpoint_weights


@dataclass(frozen=True)
class LlamaFamilyFlags:
    """What sets Llama, Qwen2 and Qwen3 apart, as read from a Hugging Face config."""

    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: Any) -> "LlamaFamilyFlags":
        archs = set(getattr(config, "architectures", None) or [])
        model_type = getattr(config, "model_type", "")
        if "Qwen2ForCausalLM" in archs or model_type == "qwen2":
            # Qwen2 hard-codes biases on q/k/v only; its config has no attention_bias.
            return cls(qkv_bias=True, o_proj_bias=False, mlp_bias=False, qk_norm=False)
        if "Qwen2MoeForCausalLM" in archs or model_type == "qwen2_moe":
            # Qwen2-MoE's q/k/v biases follow its qkv_bias (older configs lack it: True).
            return cls(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_proj_bias=False,
                       mlp_bias=False, qk_norm=False)
        attention_bias = bool(getattr(config, "attention_bias", False))
        is_qwen3 = bool(archs & {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}) or model_type in (
            "qwen3", "qwen3_moe")
        return cls(qkv_bias=attention_bias, o_proj_bias=attention_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=is_qwen3)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    """SwiGLU, TP-sliced. reduce_results=False leaves the all-reduce to the caller (an MoE
    block reduces routed and shared experts together; a decoder layer's next norm fuses it,
    models/decoder_layer.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool,
                 dtype: torch.dtype | None, reduce_results: bool = True) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise UnsupportedModelError(f"MLP activation {hidden_act!r} is not supported "
                                        "(only 'silu').")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       bias=bias, params_dtype=dtype,
                                                       quantizable=True)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           reduce_results=reduce_results, params_dtype=dtype,
                                           quantizable=True)
        self.act_fn = SiluAndMul()

    @property
    def returns_partial_sum(self) -> bool:
        return not self.down_proj.reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """This rank's heads: qkv_proj (column parallel) -> [q/k norm] -> RoPE -> attention ->
    o_proj (row parallel). Its output is this rank's partial sum, all-reduced by the norm after
    it (models/decoder_layer.py), unless o_proj has a bias, which is added after the sum."""

    def __init__(self, config: Any, flags: LlamaFamilyFlags, layer_idx: int,
                 dtype: torch.dtype | None, max_model_len: int = 0) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        total_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          config.num_attention_heads, total_kv_heads,
                                          bias=flags.qkv_bias, params_dtype=dtype,
                                          quantizable=True)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # A bias is added once, after the all-reduce, so a biased o_proj reduces itself.
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size, bias=flags.o_proj_bias,
                                        reduce_results=flags.o_proj_bias,
                                        params_dtype=dtype, quantizable=True)
        base, rope_scaling = get_rope_config(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim,
                                   config.max_position_embeddings, base, rope_scaling,
                                   num_positions=max_model_len)
        self.qk_norm = flags.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                              self.num_kv_heads, layer_idx)

    @property
    def returns_partial_sum(self) -> bool:
        return not self.o_proj.reduce_results

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            num_tokens = q.shape[0]
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)
        # RoPE inside the attention layer: on CUDA one kernel rotates and writes the cache.
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb))


# (config, flags, layer index, dtype) -> the layer's MLP
MakeMLP = Callable[[Any, LlamaFamilyFlags, int, "torch.dtype | None"], nn.Module]


def dense_mlp(config: Any, flags: LlamaFamilyFlags, layer_idx: int,
              dtype: torch.dtype | None) -> nn.Module:
    # Unbiased: the partial sum goes to the next norm (a bias is added after the all-reduce).
    return LlamaMLP(config.hidden_size, config.intermediate_size,
                    getattr(config, "hidden_act", "silu"), flags.mlp_bias, dtype,
                    reduce_results=flags.mlp_bias)


class LlamaDecoderLayer(PreNormDecoderLayer):
    """Pre-norm block. The residual stream travels beside the hidden states so each RMSNorm
    can add it in (see RMSNorm.forward)."""

    def __init__(self, config: Any, flags: LlamaFamilyFlags, layer_idx: int,
                 dtype: torch.dtype | None, max_model_len: int = 0,
                 make_mlp: MakeMLP = dense_mlp) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, flags, layer_idx, dtype, max_model_len)
        self.mlp = make_mlp(config, flags, layer_idx, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class LlamaModel(StageDecoderModel):
    """Embedding, decoder layers, final norm. Under pipeline parallelism (`stage`) only this
    stage's layers [start_layer, end_layer) are built, the embedding only on the first stage
    and the final norm only on the last (models/pipeline.py)."""

    def __init__(self, config: Any, dtype: torch.dtype | None = None,
                 max_model_len: int = 0, stage: StageLayout | None = None,
                 make_mlp: MakeMLP = dense_mlp) -> None:
        flags = LlamaFamilyFlags.from_config(config)
        check_rope_config(config)
        _check_sliding_window(config, max_model_len)
        super().__init__(config, dtype, stage, lambda i: LlamaDecoderLayer(
            config, flags, i, dtype, max_model_len, make_mlp))


def _check_sliding_window(config: Any, max_model_len: int) -> None:
    """Refuse windowed attention we would serve as full attention.

    A window of w keeps each query's last w keys (transformers: q - w < k <= q), so up to
    max_model_len = w it is full causal attention, which we serve. Windows come from
    layer_types' sliding_attention layers (Qwen2/Qwen3 with use_sliding_window), from
    use_sliding_window alone on configs without layer_types (Qwen3-MoE: every layer), or from
    Mistral's sliding_window (v0.1; v0.2+ set none)."""
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModelError(f"Attention layer types {other} are not supported "
                                    f"(layer_types: {sorted(set(layer_types))}).")
    window = getattr(config, "sliding_window", None)
    if not window or (max_model_len and max_model_len <= window):
        return  # no window (transformers windows nothing either), or one covering every prompt
    is_mistral = ("MistralForCausalLM" in (getattr(config, "architectures", None) or [])
                  or getattr(config, "model_type", "") == "mistral")
    if "sliding_attention" in layer_types:
        source = "layer_types' sliding_attention layers"
    elif not layer_types and getattr(config, "use_sliding_window", False):
        source = "use_sliding_window"
    elif is_mistral:
        source = "Mistral's config"
    else:
        return
    raise UnsupportedModelError(
        f"Sliding-window attention (sliding_window={window}, from {source}) is not supported "
        f"past the window: set max_model_len (--max-model-len) to at most {window}, where it "
        f"equals full attention (asked for {max_model_len or 'the unset default'}).")


class LlamaForCausalLM(nn.Module):
    """LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM (and, with its `make_mlp`, the
    Qwen MoE models of models/qwen_moe.py).

    LlamaForCausalLM(hf_config, dtype, max_model_len): parameters are created uninitialised in
    `dtype` on the current default device (build it under `with torch.device(...)`), sharded
    for the TP group of this process; `load_weights` fills them. max_model_len (optional)
    makes the RoPE table cover positions past max_position_embeddings. stage (optional,
    models/pipeline.py StageLayout): build only one pipeline stage's parts.
    """

    # checkpoint name part -> (our fused parameter, shard id)
    stacked_params_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    make_mlp: MakeMLP = staticmethod(dense_mlp)

    def __init__(self, hf_config: Any, dtype: torch.dtype | None = None,
                 max_model_len: int = 0, stage: StageLayout | None = None) -> None:
        super().__init__()
        self.config = hf_config
        # Any quantization_config but FP8 blocks (Qwen3-*-FP8) is refused: its packed weights
        # would otherwise load as plain ones, or FP8 values without their scales.
        self.fp8_block_size = fp8_block_size(hf_config)
        self.tp_size = get_tp_group().world_size
        self.model = LlamaModel(hf_config, dtype, max_model_len, stage, self.make_mlp)
        self.stage = self.model.stage
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = stage_lm_head(hf_config, dtype, self.model, self.tie_word_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None
                ) -> torch.Tensor | IntermediateTensors:
        """input_ids, positions [T] -> final hidden states [T, hidden_size] (on a non-last
        pipeline stage: the IntermediateTensors for the next stage; a non-first stage takes
        the previous one's as `intermediate`)."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor,
                       gather_all: bool = True) -> torch.Tensor | None:
        """[T, hidden_size] -> [T, vocab_size] float32, on every TP rank (gather_all) or on
        TP rank 0 only (None elsewhere); see ParallelLMHead.compute_logits."""
        return self.lm_head.compute_logits(hidden_states, gather_all)

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        """Load HF-named checkpoint tensors (tensors or lazy slices); returns the names of the
        parameters that received data. Each parameter's weight_loader reads only this rank's
        slice."""
        if self.fp8_block_size is not None:
            weights = dequantize_fp8_weights(weights, self.fp8_block_size)
        return load_checkpoint_weights(self, weights, self.stacked_params_mapping)
