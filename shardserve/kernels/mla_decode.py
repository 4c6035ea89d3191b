"""Triton kernel: absorbed multi-head latent attention for decode (one query per request) over
the paged latent cache, split over the key length (flash-decoding). Reference:
`mla_attention_ref.mla_absorbed_decode_ref`; the math is in that module's doc.

    cache  [num_blocks, block_size, L + R]   row = [c_kv (L) | k_pe (R)]
    q_lat  [T, H, L]  (= W_UK^T q_nope)      q_pe [T, H, R]      out (o_lat) [T, H, L]

    _mla_decode_kernel   grid (num_reqs, cdiv(H, BLOCK_H), num_splits)
        program (req, head block, split): BLOCK_H query heads of the request (all heads share
        the one latent "KV head", so each latent row is read once per head block, not once per
        head) against keys [split * partition, min((split + 1) * partition, seq_len)), with
        each request's partition sized from its own seq_len on the device:

            partition = max(round_up(ceil(seq_len / num_splits), BLOCK_N), MIN_PARTITION)

            scores = q_lat . c_kv + q_pe . k_pe       (two dots: L and R need no padding to
            acc   += softmax-weights . c_kv             a power of two together)

        num_splits == 1 writes the output; else each partition's normalised output and
        log-sum-exp (base 2), [num_reqs, H, num_splits, L] / [num_reqs, H, num_splits] float32,
    _mla_reduce_kernel   grid (num_reqs, H)
        combines them: out = sum_s 2^(lse_s - max) out_s / sum_s 2^(lse_s - max).

Decode rows: request i's query is row query_start_loc[i] (requests with no query return at
once). The split count comes from host values only (num_reqs, head blocks, max_seq_len) and
partitions are sized per request on the device, so a CUDA graph captured at max_seq_len =
max_model_len replays correctly, spreading each request's actual keys over the splits.
seq_len == 0 (padding rows of a graph) gives zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.device_info import cuda_sms

LOG2E = 1.4426950408889634
MIN_PARTITION = 128  # keys; smaller partitions spend more on partial writes than they save
MAX_SPLITS = 64      # the reduce holds every partition of a head in one tile


# Ints that change from step to step are not specialized on (Triton would compile again
# when one turns 1 or a multiple of 16, in the middle of serving; executor/kernel_warmup.py).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _mla_decode_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_lat_ptr, q_pe_ptr, cache_ptr, block_tables_ptr,
    seq_lens_ptr, query_start_loc_ptr, scale_log2e, num_heads, num_splits, min_partition,
    kv_lora_rank, rope_dim,
    stride_qlt, stride_qlh, stride_qpt, stride_qph, stride_ot, stride_oh,
    stride_cb, stride_co, stride_bt,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) == token:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N,
                           min_partition)
    start = split * partition
    if SPLIT:
        if start >= seq_len:
            return  # the reduce reads only partitions that hold keys
    end = tl.minimum(start + partition, seq_len)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    lat = tl.arange(0, BLOCK_L)
    lmask = lat < kv_lora_rank
    rope = tl.arange(0, BLOCK_R)
    rmask = rope < rope_dim
    tok = token.to(tl.int64)
    q_lat = tl.load(q_lat_ptr + tok * stride_qlt + heads[:, None] * stride_qlh + lat[None, :],
                    mask=hmask[:, None] & lmask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + tok * stride_qpt + heads[:, None] * stride_qph + rope[None, :],
                   mask=hmask[:, None] & rmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        k_pos = tile_start + tl.arange(0, BLOCK_N)
        kmask = k_pos < end
        block = tl.load(block_table_ptr + k_pos // BLOCK_SIZE, mask=kmask, other=0)
        row = block.to(tl.int64) * stride_cb + (k_pos % BLOCK_SIZE) * stride_co
        c_kv = tl.load(cache_ptr + row[:, None] + lat[None, :],
                       mask=kmask[:, None] & lmask[None, :], other=0.0)
        k_pe = tl.load(cache_ptr + row[:, None] + kv_lora_rank + rope[None, :],
                       mask=kmask[:, None] & rmask[None, :], other=0.0)
        qk = tl.dot(q_lat, tl.trans(c_kv), input_precision=DOT_PRECISION)
        qk = tl.dot(q_pe, tl.trans(k_pe), qk, input_precision=DOT_PRECISION) * scale_log2e
        qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv,
                                            input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    omask = hmask[:, None] & lmask[None, :]
    if SPLIT:
        part = (req * num_heads + heads).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * kv_lora_rank + lat[None, :], out, mask=omask)
        tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=hmask)
    else:
        tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + lat[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit(do_not_specialize=["num_splits"])
def _mla_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, query_start_loc_ptr, kv_lora_rank,
    num_heads, num_splits, min_partition, stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) == token:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N,
                           min_partition)
    splits = tl.arange(0, BLOCK_S)
    smask = splits < tl.cdiv(seq_len, partition)  # the partitions _mla_decode_kernel wrote
    lat = tl.arange(0, BLOCK_L)
    lmask = lat < kv_lora_rank
    part = (req * num_heads + head).to(tl.int64) * num_splits + splits
    lse = tl.load(part_lse_ptr + part, mask=smask, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), -1e30)  # finite even with no partition (seq_len 0)
    w = tl.where(smask, tl.math.exp2(lse - m), 0.0)
    o = tl.load(part_out_ptr + part[:, None] * kv_lora_rank + lat[None, :],
                mask=smask[:, None] & lmask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + lat,
             out.to(out_ptr.dtype.element_ty), mask=lmask)


def choose_num_splits(num_reqs: int, head_blocks: int, max_seq_len: int,
                      device: torch.device) -> int:
    """About four programs per SM, no more partitions than max_seq_len / MIN_PARTITION."""
    num_sms = cuda_sms(device) if device.type == "cuda" else 132
    programs = max(num_reqs * head_blocks, 1)
    return max(1, min(triton.cdiv(4 * num_sms, programs),
                      triton.cdiv(max(max_seq_len, 1), MIN_PARTITION), MAX_SPLITS))


def default_mla_decode_config(kv_lora_rank: int, dtype: torch.dtype) -> dict[str, int]:
    if dtype == torch.float32:
        return {"block_h": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    # acc [16, 512] float32 plus a [32, 512] latent tile: 8 warps keep it in registers.
    return {"block_h": 16, "block_n": 32, "num_warps": 8, "num_stages": 2}


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
               max_seq_len: int, scale: float, out: torch.Tensor | None = None, *,
               num_splits: int | None = None, min_partition: int = MIN_PARTITION,
               block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """o_lat [T, H, L] of one query per request (request i's at row query_start_loc[i]).
    max_seq_len bounds seq_lens (a host value; it only caps the split count). num_splits
    overrides the heuristic and min_partition the smallest partition (tests, benchmarks)."""
    num_tokens, num_heads, kv_lora_rank = q_lat.shape
    rope_dim = q_pe.shape[-1]
    num_reqs = seq_lens.shape[0]
    assert cache.shape[-1] == kv_lora_rank + rope_dim and cache.stride(-1) == 1
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and block_tables.stride(-1) == 1
    if out is None:
        out = torch.empty(q_lat.shape, dtype=q_lat.dtype, device=q_lat.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    cfg = default_mla_decode_config(kv_lora_rank, q_lat.dtype)
    block_h = cfg["block_h"]
    block_n = block_n or cfg["block_n"]
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, head_blocks, max_seq_len, q_lat.device)
    assert 1 <= num_splits <= MAX_SPLITS and min_partition % block_n == 0
    split = num_splits > 1
    if split:
        part_out = torch.empty((num_reqs, num_heads, num_splits, kv_lora_rank),
                               dtype=torch.float32, device=q_lat.device)
        part_lse = torch.empty((num_reqs, num_heads, num_splits), dtype=torch.float32,
                               device=q_lat.device)
    else:
        part_out = part_lse = out  # unused
    precision = "tf32x3" if q_lat.dtype == torch.float32 else "tf32"
    block_l = max(16, triton.next_power_of_2(kv_lora_rank))
    _mla_decode_kernel[(num_reqs, head_blocks, num_splits)](
        out, part_out, part_lse, q_lat, q_pe, cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_heads, num_splits, min_partition, kv_lora_rank, rope_dim,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        out.stride(0), out.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_L=block_l,
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)), BLOCK_SIZE=cache.shape[1],
        SPLIT=split, DOT_PRECISION=precision,
        num_warps=num_warps or cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _mla_reduce_kernel[(num_reqs, num_heads)](
            out, part_out, part_lse, seq_lens, query_start_loc, kv_lora_rank, num_heads,
            num_splits, min_partition, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_L=block_l, BLOCK_N=block_n,
            num_warps=4,
        )
    return out
