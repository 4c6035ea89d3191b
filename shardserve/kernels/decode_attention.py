"""Triton kernels: decode attention (one query token per request) over the paged KV cache,
split over the key length for long contexts (flash-decoding). Reference:
`paged_attention_ref.paged_attention_ref` with every q_len == 1. In a step mixing decodes with
prefill chunks it takes the requests with exactly one query token and leaves the others to the
prefill kernel, whose query tiles would hold one valid token in BLOCK_Q for each of them.

Two kernels that only make sense together, so they share this file:

    _decode_kernel   grid (num_reqs, num_kv_heads, num_splits)
        program (req, kv_head, split) attends the GROUP query heads of kv_head (one
        [BLOCK_H, head_size] tile, BLOCK_H = max(16, GROUP) rows for the matrix units) to keys
        [split * partition, min((split + 1) * partition, seq_len)), BLOCK_N keys per step, so
        each K/V byte is read once per KV head, not once per query head. Each request sizes its
        own partitions from its own seq_len (on the device):

            partition = max(round_up(ceil(seq_len / num_splits), BLOCK_N), min_partition)

        so a short request uses few partitions and a long one all of them.
        num_splits == 1: normalizes and writes the output itself (no second launch).
        else: writes the partition's normalized output and its log-sum-exp (base 2):

            part_out  [num_reqs, num_heads, num_splits, head_size]  float32
            part_lse  [num_reqs, num_heads, num_splits]             float32

    _decode_reduce_kernel   grid (num_reqs, num_heads)
        combines the ceil(seq_len / partition) partitions that hold keys:
        out = sum_s 2^(lse_s - max lse) * out_s / sum_s 2^(lse_s - max lse)

The split count is picked on the host from num_reqs and num_kv_heads (about four programs per
SM), capped by max_seq_len / MIN_PARTITION (the host copy in AttentionMetadata, no sync) and by
MAX_SPLITS (the reduce holds all partitions of a head in one tile). Since partitions are sized
per request on the device, a CUDA graph captured with max_seq_len = max_model_len fixes only the
split count, and a replay spreads each request's actual keys over it. Requests with
seq_len == 0 (padding rows) get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.device_info import cuda_sms
from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait

LOG2E = 1.4426950408889634
MIN_PARTITION = 128  # keys; smaller partitions spend more on partial writes than they save
MAX_SPLITS = 64


@triton.jit
def query_as_fp16(q):
    """An fp8 cache is read as float16, not bfloat16: every fp8 value is exactly a float16,
    the hardware widens fp8 pairs to float16 in one instruction (bfloat16 takes several, which
    left the fp8 kernels slower than bfloat16 ones), and bfloat16 queries round to float16
    exactly within its range (clamped to it; values under 2^-14 lose low bits)."""
    return tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


# Ints that change from step to step are not specialized on (Triton would compile again
# when one turns 1 or a multiple of 16, in the middle of serving; executor/kernel_warmup.py).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    seq_lens_ptr, query_start_loc_ptr, scale_log2e, head_size, num_heads, num_splits,
    min_partition,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch, stride_bt,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8_AS_FP16: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_release_and_wait(USE_PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) != token + 1:
        return  # no query this step, or a prefill chunk (the prefill kernel's)
    seq_len = tl.load(seq_lens_ptr + req)
    if SPLIT:
        partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N,
                               min_partition)
        start = split * partition
        if start >= seq_len:
            return  # the reduce reads only partitions that hold keys
        end = tl.minimum(start + partition, seq_len)
    else:
        start = 0
        end = seq_len

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_size
    q_mask = (rows < GROUP)[:, None] & dmask[None, :]
    q = tl.load(q_ptr + token.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=q_mask, other=0.0)
    if FP8_AS_FP16:
        q = query_as_fp16(q)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        k_pos = tile_start + tl.arange(0, BLOCK_N)
        kmask = k_pos < end
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=kmask, other=0)
        kv_off = (block.to(tl.int64) * stride_cb + (k_pos % BLOCK_SIZE) * stride_co
                  + kv_head * stride_ch)
        ptrs = kv_off[:, None] + dims[None, :]
        ld_mask = kmask[:, None] & dmask[None, :]
        # An fp8 cache (--kv-cache-dtype) widens to the query's type (no-op otherwise).
        k = tl.load(k_cache_ptr + ptrs, mask=ld_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + ptrs, mask=ld_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        qk = tl.where(kmask[None, :], qk, float("-inf"))
        # Every tile holds at least one key (tile_start < end), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # seq_len == 0 leaves l_i == 0 and acc == 0: write zeros, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        part = (req * num_heads + head).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * head_size + dims[None, :], out, mask=q_mask)
        tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=rows < GROUP)
    else:
        tl.store(out_ptr + token.to(tl.int64) * stride_ot + head[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, query_start_loc_ptr,
    head_size, num_heads, num_splits, min_partition, stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_release_and_wait(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) != token + 1:
        return  # as in _decode_kernel
    seq_len = tl.load(seq_lens_ptr + req)
    partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N,
                           min_partition)
    num_valid = tl.cdiv(seq_len, partition)  # same partitions as _decode_kernel
    splits = tl.arange(0, BLOCK_S)
    smask = splits < num_valid
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_size
    part = (req * num_heads + head).to(tl.int64) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=smask, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), -1e30)  # finite even with no valid partition (seq_len 0)
    w = tl.where(smask, tl.math.exp2(lse - m), 0.0)
    o = tl.load(part_out_ptr + part[:, None] * head_size + dims[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dmask)


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      min_partition: int = MIN_PARTITION) -> int:
    """Enough programs for ~4 per SM, no more partitions than max_seq_len / min_partition."""
    num_sms = cuda_sms(device) if device.type == "cuda" else 132
    programs = max(num_reqs * num_kv_heads, 1)
    return max(1, min(triton.cdiv(4 * num_sms, programs),
                      triton.cdiv(max(max_seq_len, 1), min_partition), MAX_SPLITS))


def fp8_as_fp16(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Half-precision queries over an fp8 cache compute in float16 (query_as_fp16)."""
    return k_cache.element_size() == 1 and query.dtype != torch.float32


def default_decode_config(head_size: int, dtype: torch.dtype,
                          kv_element_size: int = 2) -> dict[str, int]:
    block_d = triton.next_power_of_2(head_size)
    if kv_element_size == 1 and dtype != torch.float32 and block_d <= 128:
        # fp8 cache: one warp a program, no cp.async pipeline (H200, Triton 3.6, 256 requests x
        # 1,500 keys x 8 KV heads: 250 us against 355 us at 128 keys / 4 warps / 3 stages).
        # The widened tiles cost registers, not bandwidth; with more warps the softmax's
        # row max and sum cross warps through shared memory every tile, and 4 warps left only
        # 2 programs an SM. bf16 caches read at 4.2 TB/s with any of these and stay at 64 / 4 / 2.
        return {"block_n": 64, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32 and block_d > 128:
        return {"block_n": 16, "num_warps": 8, "num_stages": 2}
    if dtype == torch.float32 or block_d > 128:
        return {"block_n": 32, "num_warps": 4, "num_stages": 2}
    return {"block_n": 64, "num_warps": 4, "num_stages": 2}


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, max_seq_len: int, scale: float,
                     out: torch.Tensor | None = None, *, num_splits: int | None = None,
                     split_rows: int | None = None,
                     min_partition: int = MIN_PARTITION, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None
                     ) -> torch.Tensor:
    """Attention of one query token per request (query [num_tokens, num_heads, head_size],
    request i's token at query_start_loc[i]) over the paged cache. Requests with no token, or
    with several (a prefill chunk in a mixed step: prefill_attention(skip_decodes=True) takes
    those), are skipped and their rows of out left as they are. max_seq_len bounds seq_lens
    (a host value; it only caps the split count).
    num_splits overrides the heuristic (benchmarks and tests; at most MAX_SPLITS); split_rows
    sizes the heuristic for that many requests instead of all of them (most may be empty)."""
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = k_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0
    assert query.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and block_tables.stride(-1) == 1
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    cfg = default_decode_config(head_size, query.dtype, k_cache.element_size())
    block_n = block_n or cfg["block_n"]
    assert min_partition % block_n == 0
    if num_splits is None:
        num_splits = choose_num_splits(split_rows or num_reqs, num_kv_heads, max_seq_len,
                                       query.device, min_partition)
    assert 1 <= num_splits <= MAX_SPLITS
    block_d = triton.next_power_of_2(head_size)
    split = num_splits > 1
    if split:
        part_out = torch.empty((num_reqs, num_heads, num_splits, head_size), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((num_reqs, num_heads, num_splits), dtype=torch.float32,
                               device=query.device)
    else:
        part_out = part_lse = out  # unused
    precision = "tf32x3" if query.dtype == torch.float32 else "tf32"
    pdl_kwargs = pdl_launch(query.device)
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        out, part_out, part_lse, query, k_cache, v_cache, block_tables, seq_lens,
        query_start_loc, scale * LOG2E, head_size, num_heads, num_splits, min_partition,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1], SPLIT=split, DOT_PRECISION=precision,
        FP8_AS_FP16=fp8_as_fp16(query, k_cache),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
        **pdl_kwargs,
    )
    if split:
        _decode_reduce_kernel[(num_reqs, num_heads)](
            out, part_out, part_lse, seq_lens, query_start_loc, head_size, num_heads,
            num_splits, min_partition, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, BLOCK_N=block_n,
            num_warps=4, **pdl_kwargs,
        )
    return out
