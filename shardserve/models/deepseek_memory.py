"""Memory of DeepSeek-V2/V3 as models/deepseek.py lays it out: KV-cache bytes per token and
weight bytes per rank, from the Hugging Face config alone (no torch, no weights), for the
planner (`deepseek_memory`) and the model's start-up log.

KV cache (multi-head latent attention): per token and layer, one row of
kv_lora_rank + qk_rope_head_dim values, the same on every TP rank (the latent is shared by all
heads, so TP does not split it). Standard multi-head attention with the same heads would cache
num_heads x (qk_nope + qk_rope + v) values; for DeepSeek-V2-Lite that is 5120 against 576.

Weights per rank, in the model dtype except the router (float32, as transformers keeps it):

    replicated    q_a_proj, kv_a_proj_with_mqa, their norms, layer norms, router (+ V3 bias)
    split by TP   q_proj | q_b_proj, kv_b_proj, o_proj (by heads), dense and shared-expert MLPs
                  (intermediate), embedding and lm_head (vocab, padded to 64 x tp rows)
    routed experts  E x 3 x H x I / tp on every rank, TP-sliced or EP-placed alike (EP needs E
                    divisible by the ranks, TP needs I divisible)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_VOCAB_PADDING = 64  # VocabParallelEmbedding pads the table to a multiple of this per rank


@dataclass(frozen=True)
class DeepseekMemory:
    """What one rank holds for a DeepSeek model (bytes) and the model's parameter counts."""

    kv_bytes_per_token: int        # MLA latent cache, all layers, per rank (= per model)
    mha_kv_bytes_per_token: int    # what standard MHA with the same heads would need
    weight_bytes_per_rank: int
    total_params: int              # the checkpoint's (vocab unpadded)
    active_params_per_token: int   # embedding row excluded, lm_head included


def is_deepseek_config(config: Any) -> bool:
    archs = set(_get(config, "architectures", None) or [])
    return (_get(config, "model_type", "") in DEEPSEEK_MODEL_TYPES
            or bool(archs & set(DEEPSEEK_ARCHITECTURES)))


def mla_kv_values_per_token_layer(config: Any) -> int:
    return int(_get(config, "kv_lora_rank")) + int(_get(config, "qk_rope_head_dim"))


def mha_kv_values_per_token_layer(config: Any) -> int:
    """K and V of standard attention with the same heads: H x (Dn + R) + H x Dv."""
    heads = int(_get(config, "num_attention_heads"))
    qk = int(_get(config, "qk_nope_head_dim")) + int(_get(config, "qk_rope_head_dim"))
    return heads * (qk + int(_get(config, "v_head_dim")))


def kv_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """The MLA cache of one token over all layers (every TP rank holds all of it)."""
    layers = int(_get(config, "num_hidden_layers"))
    return layers * mla_kv_values_per_token_layer(config) * dtype_bytes


def is_moe_layer(config: Any, layer: int) -> bool:
    """DeepSeek's rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
    if not int(_get(config, "n_routed_experts", 0) or 0):
        return False
    freq = int(_get(config, "moe_layer_freq", 1) or 1)
    return layer >= int(_get(config, "first_k_dense_replace", 0) or 0) and layer % freq == 0


def deepseek_memory(config: Any, tp_size: int = 1, dtype_bytes: int = 2,
                    enable_expert_parallel: bool = False) -> DeepseekMemory:
    """Per-token KV bytes and per-rank weight bytes of a DeepSeek-V2/V3 config (a
    transformers config or its config.json dict) served with `tp_size` ranks (the EP group is
    the TP group under enable_expert_parallel; the bytes per rank are the same either way when
    the experts divide evenly, else those of the first ranks, which hold one expert more)."""
    num_routed = int(_get(config, "n_routed_experts", 0) or 0)
    if enable_expert_parallel and 0 < num_routed < tp_size:
        raise ValueError(f"{num_routed} experts cannot be spread over {tp_size} "
                         "expert-parallel ranks.")
    h = int(_get(config, "hidden_size"))
    vocab = int(_get(config, "vocab_size"))
    layers = int(_get(config, "num_hidden_layers"))
    heads = int(_get(config, "num_attention_heads"))
    nope, rope = int(_get(config, "qk_nope_head_dim")), int(_get(config, "qk_rope_head_dim"))
    v, kv_lora = int(_get(config, "v_head_dim")), int(_get(config, "kv_lora_rank"))
    q_lora = _get(config, "q_lora_rank", None)
    experts = int(_get(config, "n_routed_experts", 0) or 0)
    top_k = int(_get(config, "num_experts_per_tok", 0) or 0)
    moe_inter = int(_get(config, "moe_intermediate_size", 0) or 0)
    shared_inter = moe_inter * int(_get(config, "n_shared_experts", 0) or 0)
    dense_inter = int(_get(config, "intermediate_size"))
    v3 = _get(config, "model_type", "") == "deepseek_v3" or "DeepseekV3ForCausalLM" in (
        _get(config, "architectures", None) or [])
    tied = bool(_get(config, "tie_word_embeddings", False))

    # (replicated, split-by-TP) parameter counts of one attention block.
    q_split = heads * (nope + rope) * (int(q_lora) if q_lora else h)
    attn_rep = h * (kv_lora + rope) + kv_lora + ((h * int(q_lora) + int(q_lora)) if q_lora else 0)
    attn_split = q_split + kv_lora * heads * (nope + v) + heads * v * h
    router = experts * h + (experts if v3 else 0)  # float32
    rep = split = router_total = whole_experts = 0  # whole_experts: per rank, under EP
    total = active = 0
    for layer in range(layers):
        rep += attn_rep + 2 * h
        split += attn_split
        total += attn_rep + attn_split + 2 * h
        active += attn_rep + attn_split + 2 * h
        if is_moe_layer(config, layer):
            if enable_expert_parallel:
                whole_experts += 3 * h * -(-experts // tp_size) * moe_inter
                split += 3 * h * shared_inter
            else:
                split += 3 * h * (experts * moe_inter + shared_inter)
            router_total += router
            total += 3 * h * (experts * moe_inter + shared_inter) + router
            active += 3 * h * (top_k * moe_inter + shared_inter) + router
        else:
            split += 3 * h * dense_inter
            total += 3 * h * dense_inter
            active += 3 * h * dense_inter
    padded_vocab = -(-vocab // (_VOCAB_PADDING * tp_size)) * _VOCAB_PADDING * tp_size
    vocab_tables = 1 if tied else 2
    total += vocab_tables * vocab * h + h
    active += vocab * h + h
    weight_bytes = ((rep + h + whole_experts) * dtype_bytes + split // tp_size * dtype_bytes
                    + vocab_tables * padded_vocab // tp_size * h * dtype_bytes + router_total * 4)
    return DeepseekMemory(
        kv_bytes_per_token=kv_bytes_per_token(config, dtype_bytes),
        mha_kv_bytes_per_token=layers * mha_kv_values_per_token_layer(config) * dtype_bytes,
        weight_bytes_per_rank=int(weight_bytes), total_params=int(total),
        active_params_per_token=int(active))


def _get(config: Any, name: str, default: Any = ...) -> Any:
    if isinstance(config, dict):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is ...:
        raise KeyError(f"DeepSeek config has no {name!r}.")
    return value
