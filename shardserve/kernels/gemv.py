"""Triton kernel: y = x @ W^T (+ b) for a single row x, the batch-1 decode GEMV.

At one token a linear layer is a matrix-vector product bound by reading W once. For several of
a decoder's shapes cuBLAS picks a split-K GEMM plus a separate reduction kernel; on an H200
(Llama-3-8B shape, batch 1) its qkv and o_proj products read their weights at 3.1-3.3 TB/s
while the large gate/up product reaches 4.2 TB/s, and the 64 reduction launches a token cost
~0.1 ms more. Here each program owns BLOCK_N whole rows of W and walks K in BLOCK_K steps:

    program p: rows [p * BLOCK_N, (p + 1) * BLOCK_N)
        acc[BLOCK_N, BLOCK_K] += float32(W[rows, k:k+BLOCK_K]) * float32(x[k:k+BLOCK_K])
    y[rows] = round(sum(acc, axis=1) + b[rows])          one store, no second kernel

Accumulation is float32, as in cuBLAS; the bias is added in float32 before the one rounding, as
cuBLAS's epilogue does. The summation order differs from cuBLAS's, so half-precision outputs can
differ from F.linear in the last bit (the tests bound it like any bf16 GEMM).

Under programmatic dependent launch (kernels/pdl.py) each program loads its first PEEL tiles of
W (two by default) before it waits for the previous kernel: the weights start streaming while
the small kernels before the GEMV finish, instead of after them. (Prefetching a larger share
into L2 ahead of the wait was measured too, and was slower: BENCHMARKS.md, session 13.)

Reference: torch.nn.functional.linear. Which of the two runs is decided per shape by
`shardserve.layers.linear_op` (it times both on the GPU), with the launch configuration picked
from GEMV_CONFIGS at the same time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from shardserve.kernels.pdl import launch_options, pdl_wait_and_release, use_pdl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tried per shape (the fastest kept): few rows by long K strips keep many loads in flight per
# SM at any N, from a TP-8 shard (N ~ 1k) to a full LM head (N ~ 128k).
GEMV_CONFIGS = (
    GemvConfig(8, 512, 4, 3), GemvConfig(8, 1024, 4, 2), GemvConfig(4, 1024, 4, 3),
    GemvConfig(16, 256, 4, 3), GemvConfig(16, 512, 8, 2), GemvConfig(4, 512, 2, 4),
    GemvConfig(2, 1024, 2, 4),
)
DEFAULT_CONFIG = GEMV_CONFIGS[0]

# Tiles of W each program loads before it waits for the previous kernel under PDL
# (kernels/pdl.py); SHARDSERVE_GEMV_PEEL_TILES overrides (0: none).
PEEL_ENV = "SHARDSERVE_GEMV_PEEL_TILES"
DEFAULT_PEEL_TILES = 2
MAX_PEEL_TILES = 2


def peel_tiles(k: int, block_k: int) -> int:
    """W tiles a program loads ahead of the wait: whole tiles only (BLOCK_K divides K)."""
    value = os.environ.get(PEEL_ENV, "").strip()
    try:
        tiles = int(value) if value else DEFAULT_PEEL_TILES
    except ValueError:
        tiles = -1
    if not 0 <= tiles <= MAX_PEEL_TILES:
        raise ValueError(f"{PEEL_ENV}={value!r}: give 0 to {MAX_PEEL_TILES}.")
    if k % block_k:
        return 0
    return min(tiles, k // block_k)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, PEEL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Rows past N read row 0 instead of being masked (their sums are never stored), so the
    # weight loads need a mask only along K, and none when BLOCK_K divides K.
    rows_safe = tl.where(row_mask, rows, 0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_safe[:, None] * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Launched early (PDL), a program can have its first PEEL tiles of W in flight while the
    # previous kernel still runs: the weights are read-only (kernels/pdl.py). Streamed
    # weights are read once, so they go first out of the caches.
    if PEEL >= 1:
        w_first = tl.load(w_ptrs, eviction_policy="evict_first")
    if PEEL >= 2:
        w_second = tl.load(w_ptrs + BLOCK_K, eviction_policy="evict_first")
    pdl_wait_and_release(USE_PDL)
    if PEEL >= 1:
        acc += w_first.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
    if PEEL >= 2:
        acc += w_second.to(tl.float32) * tl.load(x_ptr + BLOCK_K + cols).to(tl.float32)[None, :]
    w_ptrs += PEEL * BLOCK_K
    for k in range(PEEL * BLOCK_K, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + cols)
        else:
            k_mask = (k + cols) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + cols, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_safe).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = DEFAULT_CONFIG, out: torch.Tensor | None = None,
         pdl: bool | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (rows contiguous), bias [N] or None ->
    [..., N] in x's dtype, like F.linear(x, weight, bias). pdl: launch with programmatic
    dependent launch (kernels/pdl.py); None: where the device has it."""
    n, k = weight.shape
    assert x.shape[-1] == k and x.numel() == k, "gemv takes a single row"
    assert weight.stride(1) == 1, "weight rows must be contiguous"
    x_row = x.reshape(k)
    if x_row.stride(0) != 1:
        x_row = x_row.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if pdl is None:
        pdl = use_pdl(x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x_row, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0, USE_PDL=pdl,
        PEEL=peel_tiles(k, config.block_k) if pdl else 0,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))
    return out
