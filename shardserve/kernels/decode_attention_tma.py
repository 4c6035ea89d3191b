"""Decode attention over an fp8 KV cache with TMA loads (Hopper and later): the same contract,
grid, partitions and partial outputs as `decode_attention._decode_kernel`, whose reduce kernel
combines them.

Why a second kernel: the pointer-gather kernel reads an fp8 cache at about two thirds of the
copy bandwidth (BENCHMARKS.md, session 8: 3.2 TB/s). Its widened tiles cost enough registers
that one warp a program is fastest, and without a cp.async pipeline every tile's load latency is
exposed. Here each tile of keys comes in as one tensor-memory-accelerator copy of a page slice:
the copies are asynchronous, go straight to shared memory without registers or per-key address
arithmetic, and Triton's pipeliner keeps NUM_STAGES of them in flight ahead of the math.

A TMA copy reads a rectangle, so a slice is TMA_SLICE consecutive slots of ONE page (the block
size is a multiple of it) of one KV head: the cache [num_blocks, block_size, num_kv_heads,
head_size] is described as the matrix [num_blocks * block_size, num_kv_heads * head_size] and a
slice is the box at (page * block_size + slot, kv_head * head_size). A step of the key loop
takes 1, 2 or 4 slices (block_n 16, 32 or 64 keys). Slots past the request's length inside its
last page are masked in the scores and zeroed in V (stale bytes there may be any fp8 pattern).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardserve.kernels.decode_attention import query_as_fp16

TMA_SLICE = 16  # keys a TMA copy reads: one page's slots, so the block size is a multiple
TMA_TILES = (16, 32, 64)  # keys a step: 1, 2 or 4 slices


@triton.jit
def _slice_row(bt, slice_start, end, BLOCK_SIZE: tl.constexpr):
    """The cache-matrix row of a slice's first key. A slice wholly past the end (the last step
    of a partition) reads page 0, whose keys are all masked: its table entry may not exist."""
    page = tl.load(bt + slice_start // BLOCK_SIZE, mask=slice_start < end, other=0)
    return page * BLOCK_SIZE + slice_start % BLOCK_SIZE


@triton.jit
def _slice_scores(q, k_desc, bt, slice_start, end, col, scale_log2e, SUB: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    k = k_desc.load([_slice_row(bt, slice_start, end, BLOCK_SIZE), col]).to(tl.float16)
    qk = tl.dot(q, tl.trans(k)) * scale_log2e
    return tl.where((slice_start + tl.arange(0, SUB) < end)[None, :], qk, float("-inf"))


@triton.jit
def _slice_pv(p, acc, v_desc, bt, slice_start, end, col, SUB: tl.constexpr,
              BLOCK_SIZE: tl.constexpr):
    v = v_desc.load([_slice_row(bt, slice_start, end, BLOCK_SIZE), col]).to(tl.float16)
    # Slots past the end hold stale bytes, possibly fp8 NaN: zero weight times NaN is NaN.
    v = tl.where((slice_start + tl.arange(0, SUB) < end)[:, None], v, 0.0)
    return tl.dot(p.to(tl.float16), v, acc)


# Ints that change from step to step are not specialized on (decode_attention.py says why).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel_tma(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_desc, v_desc, block_tables_ptr,
    seq_lens_ptr, query_start_loc_ptr, scale_log2e, num_heads, num_splits, min_partition,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) != token + 1:
        return  # no query this step, or a prefill chunk (the prefill kernel's)
    seq_len = tl.load(seq_lens_ptr + req)
    if SPLIT:
        partition = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), SUB * NSUB) * SUB * NSUB,
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
    dims = tl.arange(0, HEAD)
    q_mask = (rows < GROUP)[:, None]
    q = tl.load(q_ptr + token.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=q_mask, other=0.0)
    q = query_as_fp16(q)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD], tl.float32)
    bt = block_tables_ptr + req.to(tl.int64) * stride_bt
    col = kv_head * HEAD
    # A step takes NSUB page slices of SUB keys (one TMA copy each for K and for V) and updates
    # the running softmax once: the rescale of acc and the bookkeeping are paid once a step.
    # Written out per slice because Triton has no lists of tiles.
    for tile_start in tl.range(start, end, SUB * NSUB, num_stages=NUM_STAGES):
        s0 = _slice_scores(q, k_desc, bt, tile_start, end, col, scale_log2e, SUB, BLOCK_SIZE)
        m_tile = tl.max(s0, 1)
        if NSUB >= 2:
            s1 = _slice_scores(q, k_desc, bt, tile_start + SUB, end, col, scale_log2e, SUB,
                               BLOCK_SIZE)
            m_tile = tl.maximum(m_tile, tl.max(s1, 1))
        if NSUB >= 4:
            s2 = _slice_scores(q, k_desc, bt, tile_start + 2 * SUB, end, col, scale_log2e, SUB,
                               BLOCK_SIZE)
            s3 = _slice_scores(q, k_desc, bt, tile_start + 3 * SUB, end, col, scale_log2e, SUB,
                               BLOCK_SIZE)
            m_tile = tl.maximum(m_tile, tl.maximum(tl.max(s2, 1), tl.max(s3, 1)))
        # The step's first slice holds at least one key (tile_start < end): m_new is finite.
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        p = tl.math.exp2(s0 - m_new[:, None])
        l_new = tl.sum(p, 1)
        acc = _slice_pv(p, acc, v_desc, bt, tile_start, end, col, SUB, BLOCK_SIZE)
        if NSUB >= 2:
            p = tl.math.exp2(s1 - m_new[:, None])
            l_new += tl.sum(p, 1)
            acc = _slice_pv(p, acc, v_desc, bt, tile_start + SUB, end, col, SUB, BLOCK_SIZE)
        if NSUB >= 4:
            p = tl.math.exp2(s2 - m_new[:, None])
            l_new += tl.sum(p, 1)
            acc = _slice_pv(p, acc, v_desc, bt, tile_start + 2 * SUB, end, col, SUB,
                            BLOCK_SIZE)
            p = tl.math.exp2(s3 - m_new[:, None])
            l_new += tl.sum(p, 1)
            acc = _slice_pv(p, acc, v_desc, bt, tile_start + 3 * SUB, end, col, SUB,
                            BLOCK_SIZE)
        l_i = l_i * alpha + l_new
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        part = (req * num_heads + head).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD + dims[None, :], out, mask=q_mask)
        tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=rows < GROUP)
    else:
        tl.store(out_ptr + token.to(tl.int64) * stride_ot + head[:, None] * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_decode_supported(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The TMA kernel takes half-precision queries over a contiguous fp8 cache whose block size
    holds whole tiles and whose head size is a power of two. The engine picks it on Hopper or
    later; the tests also run it through Triton's interpreter on the CPU."""
    _, block_size, _, head_size = k_cache.shape
    return (k_cache.element_size() == 1 and query.dtype in (torch.float16, torch.bfloat16)
            and k_cache.is_contiguous()
            and block_size % TMA_SLICE == 0 and head_size in (64, 128, 256))


def use_tma_decode(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The default: the TMA kernel wherever it applies on a GPU that has TMA."""
    return (query.device.type == "cuda" and tma_decode_supported(query, k_cache)
            and _has_tma(query.device.index or 0))


def default_tma_config() -> dict[str, int]:
    return {"block_n": 4 * TMA_SLICE, "num_warps": 1, "num_stages": 3}


def _descriptor(cache: torch.Tensor):
    from triton.tools.tensor_descriptor import TensorDescriptor
    num_blocks, block_size, num_kv_heads, head_size = cache.shape
    matrix = cache.view(num_blocks * block_size, num_kv_heads * head_size)
    return TensorDescriptor.from_tensor(matrix, [TMA_SLICE, head_size])


def launch_decode_tma(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                      out, part_out, part_lse, num_splits, min_partition, *, block_n: int,
                      num_warps: int, num_stages: int) -> None:
    num_reqs = seq_lens.shape[0]
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    _decode_kernel_tma[(num_reqs, num_kv_heads, num_splits)](
        out, part_out, part_lse, query, _descriptor(k_cache),
        _descriptor(v_cache), block_tables, seq_lens, query_start_loc, scale,
        num_heads, num_splits, min_partition,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), SUB=TMA_SLICE,
        NSUB=block_n // TMA_SLICE, HEAD=head_size, BLOCK_SIZE=k_cache.shape[1], SPLIT=num_splits > 1,
        NUM_STAGES=num_stages, num_warps=num_warps, num_stages=num_stages,
    )
