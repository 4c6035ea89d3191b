"""config.json fields of well-known public models, so `shardserve plan --model llama-3-70b`
answers "what does it take to serve this" without the checkpoint (no machine here reaches a
model hub). Only the fields the planner reads are kept; values are the published configs'."""

from __future__ import annotations

from typing import Any

_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _llama3(hidden: int, layers: int, heads: int, inter: int, max_pos: int = 8192,
            rope: dict[str, Any] | None = None, tie: bool = False) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
            "intermediate_size": inter, "vocab_size": 128256, "max_position_embeddings": max_pos,
            "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
            "rope_parameters": rope or {"rope_type": "default", "rope_theta": 500000.0}}


def _qwen3(hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
           tie: bool = False) -> dict[str, Any]:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": 128, "intermediate_size": inter,
            "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}


KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama3(4096, 32, 32, 14336),
    "llama-3.1-8b": _llama3(4096, 32, 32, 14336, 131072, _LLAMA31_ROPE),
    "llama-3-70b": _llama3(8192, 80, 64, 28672),
    "llama-3.1-70b": _llama3(8192, 80, 64, 28672, 131072, _LLAMA31_ROPE),
    "llama-3.1-405b": _llama3(16384, 126, 128, 53248, 131072, _LLAMA31_ROPE),
    "llama-3.2-1b": {**_llama3(2048, 16, 32, 8192, 131072, {**_LLAMA31_ROPE, "factor": 32.0},
                               tie=True), "head_dim": 64},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16",
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, tie=True),
    "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288),
    "qwen3-32b": _qwen3(5120, 64, 64, 8, 25600),
    "qwen3-30b-a3b": {**_qwen3(2048, 48, 32, 4, 6144), "architectures": ["Qwen3MoeForCausalLM"],
                      "model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
                      "moe_intermediate_size": 768, "decoder_sparse_step": 1,
                      "mlp_only_layers": []},
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                     "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "tie_word_embeddings": False,
                     "torch_dtype": "bfloat16", "rope_theta": 1000000.0},
    "deepseek-v2-lite": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                         "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6,
                         "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
                         "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                         "v_head_dim": 128, "vocab_size": 102400,
                         "max_position_embeddings": 163840, "tie_word_embeddings": False,
                         "torch_dtype": "bfloat16",
                         "rope_scaling": {"type": "yarn", "factor": 40,
                                          "original_max_position_embeddings": 4096}},
}
