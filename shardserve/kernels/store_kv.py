"""Triton kernel: write this step's new keys and values into the paged KV cache.

Reference: `paged_attention_ref.store_kv_ref` (same arguments, same result).

    key/value  [num_tokens, num_kv_heads, head_size]   any token/head strides, last dim dense
    k/v_cache  [num_blocks, block_size, num_kv_heads, head_size]
    slot       block_id * block_size + offset; slot < 0 is padding (CUDA-graph rows) and skipped

One program copies one token's K and V rows (all heads) in one [heads, head_size] tile; the
slot decides where they go. Addresses are int64: a cache of 100k blocks x 16 x 8 x 128 already
passes 2^31 elements. The rows are cast to the cache's element type (`to_cache`): an fp8 cache
(--kv-cache-dtype) saturates at the format's largest finite value, as `to_cache_dtype` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def to_cache(x, cache_ptr):
    """x in cache_ptr's element type; fp8 rounds from float32 (as torch's cast does) and
    saturates instead of overflowing to NaN."""
    ty = cache_ptr.dtype.element_ty
    if ty == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    elif ty == tl.float8e5:
        x = tl.clamp(x.to(tl.float32), -57344.0, 57344.0)
    return x.to(ty)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_co, stride_ch,  # cache strides: block, offset in block, head
    num_kv_heads, head_size, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token (CUDA-graph rows): nothing to write
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_size)
    block = slot // block_size
    offset = slot % block_size
    src_k = key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = block * stride_cb + offset * stride_co + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, to_cache(k, k_cache_ptr), mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_cache_ptr), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] into their cache slots."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head dim must be contiguous"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert slot_mapping.shape[0] >= num_tokens
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_size, k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_size),
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1,
    )
