"""Torch reference paged attention: runs on CPU and CUDA, the yardstick for the Triton kernels.

KV cache layout of one layer (one tensor each for K and V):

    [num_blocks, block_size, num_kv_heads, head_size]

Slot s lives at block s // block_size, offset s % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's element type. One-byte (fp8) caches saturate at the format's largest
    finite value, as the Triton stores do, rather than turn large values into NaN."""
    if x.dtype == cache_dtype:
        return x
    if cache_dtype.itemsize == 1:
        limit = torch.finfo(cache_dtype).max
        x = x.float().clamp(-limit, limit)  # exact for float16/bfloat16 inputs
    return x.to(cache_dtype)


def _indexable(cache: torch.Tensor) -> torch.Tensor:
    """The cache as a type index_copy_/index_select take on every device (fp8 as bytes)."""
    return cache.view(torch.uint8) if cache.dtype.itemsize == 1 else cache


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] into their slots, in the cache's
    element type. Slots < 0 are padding and are skipped."""
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    for cache, new in ((k_cache, key), (v_cache, value)):
        _indexable(cache).view(num_blocks * block_size, *cache.shape[2:]).index_copy_(
            0, slot_mapping, _indexable(to_cache_dtype(new, cache.dtype)))


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence: [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = _indexable(cache).index_select(0, block_table[:num_blocks].long())
    return blocks.view(cache.dtype).reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: list[int],
                        seq_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention of packed queries [num_tokens, num_heads, head_size] over the paged
    cache; grouped-query attention when num_heads is a multiple of num_kv_heads. A cache in
    another element type (fp8) is widened to the query's type first."""
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        k = gather_kv_ref(k_cache, block_tables[i], seq_len).to(query.dtype)
        v = gather_kv_ref(v_cache, block_tables[i], seq_len).to(query.dtype)
        out[start:end] = causal_sdpa_like_hf(query[start:end], k, v, scale)
    return out


def causal_sdpa_like_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Causal attention of one sequence's last q_len positions, q [q_len, H, D], over its keys
    k/v [kv_len, Hk, D] -> [q_len, H, D]; query j sits at position kv_len - q_len + j.

    Called the way transformers calls SDPA, because the call picks the kernel and so the
    rounding: 4-D [1, H, len, D] tensors, grouped-query heads through enable_gqa, is_causal for
    a whole prompt and no mask for one decode token. The old call (3-D tensors, KV heads
    repeated, a mask always) sent bf16 on the CPU to SDPA's math path, a float32 computation
    rounded elsewhere than the flash kernel transformers gets: SmolLM2's bf16 prompt logits
    were 2.5e-2 off transformers' (now bit-identical), and 5 of 16 greedy continuations parted.
    """
    q_len, kv_len = q.shape[0], k.shape[0]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    mask = None
    if 1 < q_len < kv_len:  # a chunk after a cached prefix: only here is a mask needed
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
    o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale,
                                       is_causal=q_len > 1 and mask is None,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)
