"""Tiny random DeepSeek-V2/V3 checkpoints written by transformers (float32), for our model to
match. Every weight is re-drawn - norms, the router and V3's e_score_correction_bias included -
so nothing agrees by accident (HF initialises norms to 1 and the bias to 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 500
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, kv_lora_rank=32,
               max_position_embeddings=128, rms_norm_eps=1e-5, first_k_dense_replace=1,
               n_routed_experts=8, attn_implementation="eager")

# name -> (config class, overrides). Between them: q_lora_rank None and set, greedy and
# group-limited routing, V3's noaux_tc with bias and renormalisation, one and two shared
# experts, YaRN with equal and unequal mscale / mscale_all_dim, interleaved and rotate-half RoPE.
TINY_DEEPSEEK: dict[str, tuple[str, dict[str, Any]]] = {
    "v2_lite": ("DeepseekV2Config", dict(
        q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3, topk_method="greedy",
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "v2_group": ("DeepseekV2Config", dict(
        q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=3,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        norm_topk_prob=False, rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 0.8})),
    "v3": ("DeepseekV3Config", dict(
        q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
        rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "v3_neox": ("DeepseekV3Config", dict(
        q_lora_rank=None, n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}

# Seven routed experts: expert parallelism over two ranks holds 4 + 3 of them (vLLM's split).
TINY_DEEPSEEK["v2_lite_7experts"] = ("DeepseekV2Config",
                                     {**TINY_DEEPSEEK["v2_lite"][1], "n_routed_experts": 7})


def tiny_deepseek_config(name: str) -> Any:
    import transformers

    cls_name, overrides = TINY_DEEPSEEK[name]
    return getattr(transformers, cls_name)(**{**_COMMON, **overrides})


def save_tiny_deepseek(name: str, folder: Path, seed: int = 0, with_tokenizer: bool = False) -> Any:
    """Write a random float32 checkpoint of TINY_DEEPSEEK[name]; returns the HF model (eval).
    with_tokenizer: copy SmolLM2's tokenizer in too, as the engine needs one."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_deepseek_config(name),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif pname.endswith("gate.weight"):
                param.normal_(0.0, 0.5)  # a decisive router: no near-ties between experts
            else:
                param.normal_(0.0, 0.15)
        for bname, buf in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    if with_tokenizer:
        copy_tokenizer(folder)
    return model


def copy_tokenizer(folder: Path) -> None:
    from shardserve.testing import _copy_tokenizer, _default_gguf, cached_gguf_tokenizer_dir

    _copy_tokenizer(cached_gguf_tokenizer_dir(_default_gguf()), folder)


# ---- the paged latent cache, step by step --------------------------------------------------

BLOCK_SIZE, NUM_BLOCKS = 4, 12
# Out of order, so a kernel that ignores the block table reads the wrong (NaN) rows.
_TABLES = [[2, 0, 7], [5, 9, 1]]


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (12,), generator=gen), torch.randint(0, VOCAB, (8,), generator=gen)


def _metadata(query_lens: list[int], seq_lens: list[int], device: str) -> Any:
    from shardserve.forward_context import AttentionMetadata

    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    slots = [_TABLES[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for i, (q, s) in enumerate(zip(query_lens, seq_lens)) for p in range(s - q, s)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(_TABLES, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=list(seq_lens))


def paged_steps(model: torch.nn.Module, backend: Any, device: str = "cpu") -> list[torch.Tensor]:
    """Requests A (12 tokens) and B (8) through a fresh NaN-filled cache in three steps:
    1. A's first chunk (5) + B's first 7 tokens (prefills);
    2. A's second chunk (6) over its cached prefix + B's 8th token (mixed: one request
       decompressed over the cache, one absorbed);
    3. A's 12th token + B's 8th again at position 7 (decode-only: absorbed, batched).
    Returns the logits of every scheduled token, per request and step (six [n, V] tensors,
    on the CPU); the model, cache and inputs live on `device`."""
    from shardserve.forward_context import set_forward_context
    from shardserve.layers.attention import AttentionLayerBase

    for layer in model.modules():
        if isinstance(layer, AttentionLayerBase):
            caches = [torch.full(s, float("nan"), device=device)
                      for s in layer.kv_cache_shapes(NUM_BLOCKS, BLOCK_SIZE)]
            layer.bind_kv_cache(*caches, backend)
    a, b = _tokens()
    steps = [([5, 7], [5, 7], [a[:5], b[:7]], [range(5), range(7)]),
             ([6, 1], [11, 8], [a[5:11], b[7:8]], [range(5, 11), range(7, 8)]),
             ([1, 1], [12, 8], [a[11:12], b[7:8]], [range(11, 12), range(7, 8)])]
    out = []
    for query_lens, seq_lens, ids, positions in steps:
        with torch.no_grad(), set_forward_context(_metadata(query_lens, seq_lens, device)):
            hidden = model(torch.cat(ids).to(device),
                           torch.cat([torch.tensor(list(p)) for p in positions]).to(device))
            logits = model.compute_logits(hidden).cpu()
        out += [logits[:query_lens[0]], logits[query_lens[0]:]]
    return out


def paged_references(hf: Any) -> list[torch.Tensor]:
    """transformers' logits for the tokens paged_steps schedules, in the same order."""
    from tests.models.tiny_checkpoints import hf_logits

    a, b = _tokens()
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    # Step 3 re-runs B's last position (its cache row is simply rewritten).
    return [ref_a[:5], ref_b[:7], ref_a[5:11], ref_b[7:8], ref_a[11:12], ref_b[7:8]]
