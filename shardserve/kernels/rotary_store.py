"""Triton kernel: rotary position embedding of q and k in place and the rotated keys and the
values written into the paged KV cache, in one launch (the rotary kernel and the store_kv
kernel in one: per layer and step one launch instead of two, and k is not read back).

Reference: `shardserve.kernels.rotary.rotary_embedding_` then `shardserve.kernels.store_kv.
store_kv` (whose references are `RotaryEmbedding.forward` and `paged_attention_ref.
store_kv_ref`). The rotation is the rotary kernel's own code (`_cos_sin`, `_rotate_heads`):
same cos/sin reads, same float32 math, same rounding points, so q, k and the cache come out
bit-identical to the two kernels run one after the other.

    query      [num_tokens, num_heads, head_size]      any token/head strides, last dim dense
    key/value  [num_tokens, num_kv_heads, head_size]   likewise (views of a fused qkv are fine)
    k/v_cache  [num_blocks, block_size, num_kv_heads, head_size]
    slot       block_id * block_size + offset; slot < 0 is padding (CUDA-graph rows): q and k
               are still rotated, nothing is written to the cache
    cos_sin_cache [max_positions, rotary_dim] = [cos | sin], float32

One program per token: rotate its q heads, rotate its k heads (the rotated pairs stay in
registers and go to the cache from there), copy the k dims past rotary_dim and all of v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait
from shardserve.kernels.rotary import _cos_sin, _rotate_heads
from shardserve.kernels.store_kv import to_cache


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, slot_mapping_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,  # cache strides: block, offset in block, head
    stride_cs,
    num_q_heads, num_kv_heads, head_size, half, block_size,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, IS_NEOX: tl.constexpr, PARTIAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_release_and_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin, idx1, idx2, rmask = _cos_sin(cos_sin_ptr, positions_ptr, token, stride_cs, half,
                                           q_ptr, BLOCK_R, IS_NEOX)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin, idx1, idx2, rmask,
                  BLOCK_HQ)
    k1, k2 = _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, idx1,
                           idx2, rmask, BLOCK_HK)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # padding rows (slot -1) are rotated like the rotary kernel, never stored
        heads = tl.arange(0, BLOCK_HK)
        head_mask = heads < num_kv_heads
        dst = ((slot // block_size) * stride_cb + (slot % block_size) * stride_co
               + heads[:, None] * stride_ch)
        # Rotated k in its own dtype (as stored in place), then cast as store_kv casts.
        rot_mask = head_mask[:, None] & rmask[None, :]
        tl.store(k_cache_ptr + dst + idx1[None, :], to_cache(k1, k_cache_ptr),
                 mask=rot_mask)
        tl.store(k_cache_ptr + dst + idx2[None, :], to_cache(k2, k_cache_ptr),
                 mask=rot_mask)
        dims = tl.arange(0, BLOCK_D)
        tile_mask = head_mask[:, None] & (dims < head_size)[None, :]
        if PARTIAL:
            # Dims past rotary_dim pass through unrotated: the rotation never wrote them.
            pass_mask = tile_mask & (dims >= 2 * half)[None, :]
            k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :],
                        mask=pass_mask)
            tl.store(k_cache_ptr + dst + dims[None, :], to_cache(k, k_cache_ptr),
                     mask=pass_mask)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                    mask=tile_mask)
        tl.store(v_cache_ptr + dst + dims[None, :], to_cache(v, v_cache_ptr),
                 mask=tile_mask)


def rotary_store_kv_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor, rotary_dim: int,
                     is_neox_style: bool = True) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place (the first rotary_dim dims of each
    head) and write key and value [T, Hkv, D] into their cache slots (slot < 0: skipped)."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    assert query.shape[0] == num_tokens and query.shape[2] == head_size
    assert value.shape == key.shape and slot_mapping.shape[0] >= num_tokens
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert cos_sin_cache.stride(-1) == 1 and 0 < rotary_dim <= head_size and rotary_dim % 2 == 0
    half = rotary_dim // 2
    _rotary_store_kv_kernel[(num_tokens,)](
        query, key, value, k_cache, v_cache, positions, slot_mapping, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_sin_cache.stride(0),
        query.shape[1], num_kv_heads, head_size, half, k_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(query.shape[1]),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), BLOCK_R=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_size), IS_NEOX=is_neox_style,
        PARTIAL=rotary_dim < head_size, num_warps=4, enable_fp_fusion=False,
        **pdl_launch(query.device))
