"""DeepSeek-V2/V3 shapes for `shardserve.testing.write_random_model`: the presets and the list
of weights transformers' DeepseekV2/V3ForCausalLM checkpoints hold (experts one tensor each,
as DeepSeek's own checkpoints and transformers' save_pretrained store them).

    python -m shardserve.testing --preset deepseek-v2-lite --out /tmp/v2lite   # ~15.7B, bf16
    python -m shardserve.testing --preset tiny-deepseek-v3 --out /tmp/tiny-v3
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

DEEPSEEK_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM",
                          "deepseek_v3": "DeepseekV3ForCausalLM"}

# DeepSeek-V2-Lite's config.json (15.7B parameters, 2.4B active per token).
DEEPSEEK_V2_LITE: dict[str, Any] = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, scoring_func="softmax", q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
    rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707})

_TINY: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False)
TINY_DEEPSEEK_V2: dict[str, Any] = dict(
    _TINY, q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TINY_DEEPSEEK_V3: dict[str, Any] = dict(
    _TINY, q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True,
    routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def deepseek_weight_specs(config: Any, architecture: str
                          ) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every checkpoint tensor, in transformers' order; init "normal"
    or "ones" (norm scales) as in shardserve.testing."""
    h, vocab = config.hidden_size, config.vocab_size
    heads = config.num_attention_heads
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    kv_lora, q_lora = config.kv_lora_rank, getattr(config, "q_lora_rank", None)
    experts = config.n_routed_experts
    moe_inter = config.moe_intermediate_size
    shared = moe_inter * (getattr(config, "n_shared_experts", 0) or 0)
    freq = getattr(config, "moe_layer_freq", 1) or 1
    yield "model.embed_tokens.weight", (vocab, h), "normal"
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        if q_lora:
            yield a + "q_a_proj.weight", (q_lora, h), "normal"
            yield a + "q_a_layernorm.weight", (q_lora,), "ones"
            yield a + "q_b_proj.weight", (heads * (nope + rope), q_lora), "normal"
        else:
            yield a + "q_proj.weight", (heads * (nope + rope), h), "normal"
        yield a + "kv_a_proj_with_mqa.weight", (kv_lora + rope, h), "normal"
        yield a + "kv_a_layernorm.weight", (kv_lora,), "ones"
        yield a + "kv_b_proj.weight", (heads * (nope + v), kv_lora), "normal"
        yield a + "o_proj.weight", (h, heads * v), "normal"
        if layer >= config.first_k_dense_replace and layer % freq == 0:
            yield p + "mlp.gate.weight", (experts, h), "normal"
            if architecture == "deepseek_v3":
                yield p + "mlp.gate.e_score_correction_bias", (experts,), "normal"
            for e in range(experts):
                yield from mlp_specs(f"{p}mlp.experts.{e}.", h, moe_inter)
            if shared:
                yield from mlp_specs(f"{p}mlp.shared_experts.", h, shared)
        else:
            yield from mlp_specs(f"{p}mlp.", h, config.intermediate_size)
        yield p + "input_layernorm.weight", (h,), "ones"
        yield p + "post_attention_layernorm.weight", (h,), "ones"
    yield "model.norm.weight", (h,), "ones"
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (vocab, h), "normal"


def mlp_specs(prefix: str, hidden: int, inter: int,
              bias: bool = False) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """A SwiGLU MLP's gate/up/down projections (and their biases) under `prefix`."""
    for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                        ("down_proj", (hidden, inter))):
        yield f"{prefix}{proj}.weight", shape, "normal"
        if bias:
            yield f"{prefix}{proj}.bias", shape[:1], "normal"
