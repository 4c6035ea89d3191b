"""Triton kernel: rotary position embedding of q and k in place, all heads of one token per
program, cos/sin looked up by position in the layer's table (one launch instead of torch's
index_select, chunk, four multiplies, two adds and cat per tensor).

Reference: `shardserve.layers.rotary.RotaryEmbedding.forward` (neox and GPT-J styles, partial
rotary_dim: dims past rotary_dim are left as they are), which computes q * cos + rotate_half(q)
* sin in the activation dtype as transformers does: each product is rounded, then their sum.
The kernel rounds at the same two points, so half-precision results are bit-identical to
transformers'. (Rounding once at the end is closer to the exact rotation, but it put many
rotated q and k elements an ulp away from transformers': emulated in the CPU path, that alone
took bf16 SmolLM2 greedy continuations agreeing with transformers from 16 of 16 to 9 of 16.)

    cos_sin_cache [max_positions, rotary_dim] = [cos | sin], float32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(ptr, token, stride_t, stride_h, num_heads, cos, sin, idx1, idx2, rmask,
                  BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < num_heads)[:, None] & rmask[None, :]
    base = ptr + token * stride_t + heads[:, None] * stride_h
    x1 = tl.load(base + idx1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + idx2[None, :], mask=mask, other=0.0).to(tl.float32)
    # Each product rounded to the activation dtype (a no-op for float32), then the sum.
    # Products of two half-precision values are exact in float32, so each rounding here is
    # the one torch makes. The launches pass enable_fp_fusion=False: on the GPU the compiler
    # may narrow the rounded products to half-precision multiplies and contract one with the
    # add into a fused multiply-add, rounding once where torch rounds twice (an ulp off in
    # many elements on an H200; the interpreter never fuses).
    dtype = ptr.dtype.element_ty
    x1_cos = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    x2_sin = (x2 * sin[None, :]).to(dtype).to(tl.float32)
    x2_cos = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    x1_sin = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    o1 = (x1_cos - x2_sin).to(dtype)
    o2 = (x2_cos + x1_sin).to(dtype)
    tl.store(base + idx1[None, :], o1, mask=mask)
    tl.store(base + idx2[None, :], o2, mask=mask)
    return o1, o2  # as stored (kernels/rotary_store.py also writes them to the KV cache)


@triton.jit
def _cos_sin(cos_sin_ptr, positions_ptr, token, stride_cs, half, like_ptr,
             BLOCK_R: tl.constexpr, IS_NEOX: tl.constexpr):
    """This token's cos and sin [BLOCK_R] and the pair of dims (idx1, idx2) each rotates."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    rmask = i < half
    # Like the reference: the float32 table is cast to the activations' dtype first.
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i, mask=rmask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + i, mask=rmask, other=0.0)
    cos = cos.to(like_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(like_ptr.dtype.element_ty).to(tl.float32)
    if IS_NEOX:
        idx1 = i
        idx2 = i + half
    else:
        idx1 = 2 * i
        idx2 = 2 * i + 1
    return cos, sin, idx1, idx2, rmask


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   num_q_heads, num_k_heads, half,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
                   IS_NEOX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin, idx1, idx2, rmask = _cos_sin(cos_sin_ptr, positions_ptr, token, stride_cs, half,
                                           q_ptr, BLOCK_R, IS_NEOX)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin, idx1, idx2, rmask,
                  BLOCK_HQ)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_k_heads, cos, sin, idx1, idx2, rmask,
                  BLOCK_HK)


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      cos_sin_cache: torch.Tensor, head_size: int, rotary_dim: int,
                      is_neox_style: bool = True) -> None:
    """Rotate query [T, Hq * head_size] and key [T, Hk * head_size] in place (views of a
    fused qkv tensor are fine: only their token stride and head layout matter)."""
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return
    q = query.view(num_tokens, -1, head_size)
    k = key.view(num_tokens, -1, head_size)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), q.shape[1], k.shape[1], half,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_R=triton.next_power_of_2(half), IS_NEOX=is_neox_style, num_warps=4,
        enable_fp_fusion=False)
