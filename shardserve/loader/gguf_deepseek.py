"""deepseek2 GGUFs (DeepSeek-V2, V2-Lite, V2.5, V3, R1): the Hugging Face config fields and
tensor names that differ from the Llama family's (loader/gguf.py does the rest).

Multi-head latent attention, as convert_hf_to_gguf.py writes it:

    q_proj                -> attn_q                     (no q_lora_rank: V2-Lite)
    q_a_proj, q_b_proj    -> attn_q_a, attn_q_b; q_a_layernorm -> attn_q_a_norm
    kv_a_proj_with_mqa    -> attn_kv_a_mqa; kv_a_layernorm -> attn_kv_a_norm
    kv_b_proj [H*(n+v), r] -> attn_kv_b (older files), or split per head for llama.cpp's weight
                             absorption: attn_k_b [H, r, n] (transposed) and attn_v_b [H, v, r]

(n = qk_nope_head_dim, v = v_head_dim, r = kv_lora_rank.) Files of the split kind describe the
absorbed attention in key_length / value_length (r + rope dim, r) and the real head sizes in
key_length_mla / value_length_mla. RoPE needs no un-permuting: DeepSeek's checkpoints already
rotate interleaved pairs, which is llama.cpp's own layout.

V3 is told from V2 by its sigmoid gate (expert_gating_func) or its routing bias (exp_probs_b).
llama.cpp keeps YaRN's DeepSeek mscale as rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim
and assumes mscale == mscale_all_dim (true of every released DeepSeek config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import re

import torch
from gguf import ExpertGatingFuncType

from shardserve.errors import ModelLoadError
from shardserve.loader.gguf_file import GGUFFile, GGUFTensorInfo

LAYER_NAMES = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# V3's routing bias: a whole Hugging Face name, not a module + .weight/.bias.
BIAS_NAMES = {"exp_probs_b": "mlp.gate.e_score_correction_bias"}
SPLIT_KV_B = ("attn_k_b", "attn_v_b")
_SPLIT_KV_B_TENSOR = re.compile(r"blk\.(\d+)\.(attn_k_b|attn_v_b)\.weight")


def is_v3(gguf_file: GGUFFile) -> bool:
    gating = gguf_file.get("deepseek2.expert_gating_func")
    if gating is not None:
        return int(gating) == int(ExpertGatingFuncType.SIGMOID)
    return any(name.endswith(".exp_probs_b.bias") for name in gguf_file.tensors)


def deepseek_config(gguf_file: GGUFFile, key: Callable[..., Any], num_heads: int,
                    rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """DeepseekV2Config / DeepseekV3Config fields beyond the Llama family's."""
    rope_dim = int(key("rope.dimension_count", required=True))
    qk_head_dim = int(key("attention.key_length_mla") or key("attention.key_length", required=True))
    v_head_dim = int(key("attention.value_length_mla") or key("attention.value_length",
                                                            required=True))
    q_lora_rank = key("attention.q_lora_rank")
    n_group = int(key("expert_group_count", 1) or 1)
    v3 = is_v3(gguf_file)
    fields: dict[str, Any] = {
        "num_key_value_heads": num_heads,  # MLA: HF's field is the head count
        "qk_nope_head_dim": qk_head_dim - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": v_head_dim,
        "kv_lora_rank": int(key("attention.kv_lora_rank", required=True)),
        "q_lora_rank": int(q_lora_rank) if q_lora_rank else None,
        "first_k_dense_replace": int(key("leading_dense_block_count", 0)),
        "moe_layer_freq": 1,
        "n_routed_experts": int(key("expert_count", required=True)),
        "num_experts_per_tok": int(key("expert_used_count", required=True)),
        "moe_intermediate_size": int(key("expert_feed_forward_length", required=True)),
        "n_shared_experts": int(key("expert_shared_count", 0)),
        "routed_scaling_factor": float(key("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "n_group": n_group,
        "topk_group": int(key("expert_group_used_count", 1) or 1),
        "rope_parameters": _deepseek_rope(rope_parameters, key("rope.scaling.yarn_log_multiplier")),
    }
    if v3:
        fields["rope_interleave"] = True
    else:
        fields["topk_method"] = "group_limited_greedy" if n_group > 1 else "greedy"
    return fields


def _deepseek_rope(params: dict[str, Any], log_multiplier: float | None) -> dict[str, Any]:
    if params["rope_type"] != "yarn":
        return params
    params = dict(params)
    if log_multiplier:
        params["mscale"] = params["mscale_all_dim"] = float(log_multiplier) / 0.1
    else:
        # llama.cpp's deepseek2 graph cancels YaRN's own cos/sin scaling; so must we.
        params["attention_factor"] = 1.0
    return params


def merged_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [H, r, n] + attn_v_b [H, v, r] -> kv_b_proj [H*(n+v), r]."""
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] \
            or k_b.shape[1] != v_b.shape[2]:
        raise ModelLoadError(f"deepseek2 attn_k_b {tuple(k_b.shape)} and attn_v_b "
                             f"{tuple(v_b.shape)} do not split one kv_b_proj; re-export the file.")
    merged = torch.cat([k_b.transpose(1, 2), v_b], dim=1)
    return merged.reshape(-1, merged.shape[-1]).contiguous()


def split_kv_b(gguf_file: GGUFFile, gguf_name: str
               ) -> tuple[str, tuple[GGUFTensorInfo, GGUFTensorInfo]] | None:
    """For an attn_k_b or attn_v_b weight: (kv_b_proj's HF name, (k_b, v_b)); else None."""
    match = _SPLIT_KV_B_TENSOR.fullmatch(gguf_name)
    if match is None:
        return None
    layer = match.group(1)
    k_b, v_b = (gguf_file.tensors.get(f"blk.{layer}.{part}.weight") for part in SPLIT_KV_B)
    if k_b is None or v_b is None:
        raise ModelLoadError(f"{gguf_file.path} has only one of blk.{layer}.attn_k_b and "
                             "attn_v_b, the two halves of kv_b_proj; re-export the file.")
    return f"model.layers.{layer}.self_attn.kv_b_proj.weight", (k_b, v_b)
