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

Reference: torch.nn.functional.linear. Which of the two runs is decided per shape by
`shardserve.layers.linear_op` (it times both on the GPU), with the launch configuration picked
from GEMV_CONFIGS at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


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


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Rows past N read row 0 instead of being masked (their sums are never stored), so the
    # weight loads need a mask only along K, and none when BLOCK_K divides K.
    rows_safe = tl.where(row_mask, rows, 0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_safe[:, None] * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptr + k + cols)
        else:
            k_mask = (k + cols) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptr + k + cols, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows_safe).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = DEFAULT_CONFIG, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (rows contiguous), bias [N] or None ->
    [..., N] in x's dtype, like F.linear(x, weight, bias)."""
    n, k = weight.shape
    assert x.shape[-1] == k and x.numel() == k, "gemv takes a single row"
    assert weight.stride(1) == 1, "weight rows must be contiguous"
    x_row = x.reshape(k)
    if x_row.stride(0) != 1:
        x_row = x_row.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x_row, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
