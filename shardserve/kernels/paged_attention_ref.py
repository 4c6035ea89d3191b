"""Torch reference paged attention: runs on CPU and CUDA, the yardstick for the Triton kernels.

KV cache layout of one layer (one tensor each for K and V):

    [num_blocks, block_size, num_kv_heads, head_size]

Slot s lives at block s // block_size, offset s % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] into their slots. Slots < 0 are
    padding and are skipped."""
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence: [seq_len, num_kv_heads, head_size]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, query_start_loc: list[int],
                        seq_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention of packed queries [num_tokens, num_heads, head_size] over the paged
    cache; grouped-query attention when num_heads is a multiple of num_kv_heads."""
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[i], seq_len)
        v = gather_kv_ref(v_cache, block_tables[i], seq_len)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        q = query[start:end].transpose(0, 1)  # [H, q_len, D]
        # Query j sits at position seq_len - q_len + j and sees keys up to it.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out
