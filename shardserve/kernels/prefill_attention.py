"""Triton kernel: causal attention of packed variable-length queries over the paged KV cache.

Covers new prefills, chunked prefills over a cached prefix, and decodes mixed into the same
batch. Reference: `paged_attention_ref.paged_attention_ref`.

Request i owns query rows [query_start_loc[i], query_start_loc[i+1]) and the first seq_lens[i]
keys of its block table; query j of its q_len sits at position seq_len - q_len + j and sees
keys 0..that position (the cached prefix is simply the keys before the first query).

Work split (flash-attention 2 style, one program per (query tile, KV head)):

    program (q_tile, kv_head):
        rows of the tile = BLOCK_Q tokens x GROUP query heads of that KV head
        row r -> token q_tile_start + r // GROUP, query head kv_head * GROUP + r % GROUP

            keys  0 ........................ first_q_pos ..... last_q_pos
                  [ full tiles: no mask     ][ diagonal tiles: causal mask ]

Packing the GROUP query heads that share a KV head into the rows of one tile loads each K/V
tile once for the whole group (grouped-query attention costs no extra bytes) and fills the
matrix units even when BLOCK_Q is small. GROUP need not be a power of two: BLOCK_Q =
BLOCK_M // GROUP and the leftover rows are masked.

The launch grid needs no host sync: the tiles of request i are numbered from
query_start_loc[i] // BLOCK_Q + i, which leaves room for ceil(q_len_i / BLOCK_Q) tiles, so
num_tokens // BLOCK_Q + num_reqs programs per KV head cover every batch; each program finds its
request by binary search over query_start_loc and idle ones return at once.

Softmax is online in base 2 (scale * log2(e) folded into the scores), accumulated in float32.
Float32 inputs use "tf32x3" products (three TF32 matrix products per dot, about float32
accuracy on the matrix units; plain "ieee" falls back to FMAs and spills registers at head 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.decode_attention import fp8_as_fp16, query_as_fp16

LOG2E = 1.4426950408889634


@triton.jit
def find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q: tl.constexpr):
    """Largest request i with query_start_loc[i] // BLOCK_Q + i <= tile (the first tile id of i)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table_ptr, tile_start,
                 seq_len, q_pos, kv_head, dims, dmask,
                 stride_cb, stride_co, stride_ch, scale_log2e,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    k_pos = tile_start + tl.arange(0, BLOCK_N)
    if MASK:
        kmask = k_pos < seq_len
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=kmask, other=0)
    else:
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE)
    kv_off = (block.to(tl.int64) * stride_cb + (k_pos % BLOCK_SIZE) * stride_co
              + kv_head * stride_ch)
    ptrs = kv_off[:, None] + dims[None, :]
    if MASK:
        ld_mask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=ld_mask, other=0.0)
    else:
        k = tl.load(k_cache_ptr + ptrs, mask=dmask[None, :], other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=dmask[None, :], other=0.0)
    # An fp8 cache (--kv-cache-dtype) widens to the query's type (no-op otherwise), float16
    # for half-precision queries (query_as_fp16).
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    if MASK:
        visible = (k_pos[None, :] <= q_pos[:, None]) & kmask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Ints that change from step to step are not specialized on (Triton would compile again
# when one turns 1 or a multiple of 16, in the middle of serving; executor/kernel_warmup.py).
@triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
def _prefill_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, scale_log2e, num_reqs, head_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8_AS_FP16: tl.constexpr, SKIP_DECODES: tl.constexpr,
):
    # Highest tile ids first: the last tiles of a request see the most keys (causal), and
    # starting them first shortens the tail of the launch.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    req = find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + req)
    if q_tile * BLOCK_Q >= q_len:
        return
    if SKIP_DECODES and q_len == 1:
        return  # the decode kernel's (one valid row in BLOCK_Q would waste the tile)
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows // GROUP < BLOCK_Q) & (q_tok < q_len)
    q_pos = context_len + q_tok
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_size
    tok = (q_start + q_tok).to(tl.int64)
    q_mask = row_valid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=q_mask, other=0.0)
    if FP8_AS_FP16:
        q = query_as_fp16(q)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt

    # Keys 0..first_q_pos are visible to every row of the tile (rows past q_len only see more),
    # so whole tiles below it need no mask; the first tile always has a visible key per row,
    # which keeps m_i finite from then on.
    first_q_pos = context_len + q_tile * BLOCK_Q
    last_q_pos = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    num_full = (first_q_pos + 1) // BLOCK_N
    num_tiles = tl.cdiv(last_q_pos + 1, BLOCK_N)
    for t in range(0, num_full):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr,
                                     block_table_ptr, t * BLOCK_N, seq_len, q_pos, kv_head,
                                     dims, dmask, stride_cb, stride_co, stride_ch, scale_log2e,
                                     BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION)
    for t in range(num_full, num_tiles):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr,
                                     block_table_ptr, t * BLOCK_N, seq_len, q_pos, kv_head,
                                     dims, dmask, stride_cb, stride_co, stride_ch, scale_log2e,
                                     BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def default_prefill_config(head_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes per head size and dtype (H100/H200-sized shared memory and registers)."""
    block_d = triton.next_power_of_2(head_size)
    if dtype == torch.float32:  # tests and the float32 engine path, not tuned for speed
        return {"block_m": 64 if block_d <= 64 else 32, "block_n": 32 if block_d <= 128 else 16,
                "num_warps": 4 if block_d <= 64 else 8, "num_stages": 1}
    if block_d <= 128:
        return {"block_m": 128, "block_n": 64, "num_warps": 8 if block_d == 128 else 4,
                "num_stages": 2}
    return {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 2}


def prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float,
                      out: torch.Tensor | None = None, *, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, skip_decodes: bool = False
                      ) -> torch.Tensor:
    """Causal paged attention of packed queries [num_tokens, num_heads, head_size]; returns
    (or fills) out of the same shape. Tile sizes default per head size and dtype.
    skip_decodes: leave requests with one query token (their rows of out) to
    decode_attention, which attends them at a fraction of the cost."""
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    num_reqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0
    assert query.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    cfg = default_prefill_config(head_size, query.dtype)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    block_q = block_m // group
    num_tiles = num_tokens // block_q + num_reqs
    precision = "tf32x3" if query.dtype == torch.float32 else "tf32"
    _prefill_attention_kernel[(num_tiles, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_reqs, head_size,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_size), BLOCK_SIZE=block_size,
        DOT_PRECISION=precision, FP8_AS_FP16=fp8_as_fp16(query, k_cache),
        SKIP_DECODES=skip_decodes,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out
