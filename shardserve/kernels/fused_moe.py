"""Triton fused mixture of experts: a grouped GEMM over (token, expert) pairs sorted by expert.
Reference: `fused_moe_ref.fused_moe_ref` (and the loop-free `fused_moe_torch`).

    topk_ids [T, k] --moe_align_block_size--> sorted_pair_ids  [max_padded]
                                              expert_ids       [max_padded / BLOCK_M]
                                              num_post_padded  [1]  (device scalar)

Pair p = token * k + slot. The pairs are ordered by expert and each expert's run is padded to a
multiple of BLOCK_M with the sentinel P = T * k, so every BLOCK_M rows belong to one expert:

    sorted_pair_ids   | e0 e0 e0 P | e2 e2 e2 e2 | e2 P P P | e5 P P P | P ....... |
    expert_ids        |     0      |      2      |    2     |    5     | (unused)  |
                                                             num_post_padded ^

    _grouped_gemm_kernel   grid (max_padded / BLOCK_M, cdiv(N, BLOCK_N))
        program (m, n): C[pairs of block m, n-tile] = A[rows of those pairs] @ W[e]^T[:, n-tile]
        (x 'topk_weight' of each pair when MUL_WEIGHT), e = expert_ids[m]; blocks at or past
        num_post_padded return at once.

Two launches make the MoE: [P, 2I] = x[p // k] @ w13[e]^T, SiLU-and-mul, [P, H] = h[p] @ w2[e]^T
scaled by the routing weight, then a sum over the k slots of each token. Sorting and padding
are torch ops with no host sync (max_padded is a host bound from T, k and E), so the whole MoE
can be captured in a CUDA graph. Pairs whose topk id is -1 (an expert another EP rank holds)
are left out of the sort: their rows of the output stay zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.fused_moe_ref import silu_and_mul, sort_pairs_by_expert


# Ints that change from step to step are not specialized on (Triton would compile again
# when one turns 1 or a multiple of 16, in the middle of serving; executor/kernel_warmup.py).
@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    N, K, num_pairs, a_row_div,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    pmask = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // a_row_div)[:, None] * stride_am + offs_k[None, :] * stride_ak
    # W[e] is [N, K]; the tile is read as its transpose [BLOCK_K, BLOCK_N].
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        kmask = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=pmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + pair, mask=pmask, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted, padded pair list can need: every non-empty expert run (at most
    min(P, E) of them) pads by fewer than BLOCK_M rows."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# Up to this many (pair, expert) cells the ranks come from a one-hot cumsum (elementwise ops
# only; decode batches and the captured prompt steps, 512 tokens by default, stay far below
# it); larger batches sort instead (argsort and scatter_add: no host sync either, so a step
# captured above the limit, --max-cudagraph-capture-size in the thousands, still replays).
ONE_HOT_RANK_LIMIT = 1 << 22


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         one_hot_limit: int = ONE_HOT_RANK_LIMIT
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids [max_padded] int32, expert_ids [max_padded / block_m] int32,
    num_post_padded [1] int32); see the module doc. No host sync. Within an expert, pairs
    keep their order (token-major)."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    flat = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)  # -1: last bucket
    if num_pairs * (num_experts + 1) <= one_hot_limit:
        one_hot = flat[:, None] == torch.arange(num_experts + 1, device=device)[None, :]
        counts = one_hot.sum(0)
        rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1
        pair_ids = torch.arange(num_pairs, device=device)
    else:
        pair_ids, flat, counts = sort_pairs_by_expert(topk_ids, num_experts)
        rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[flat]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    # Start of each expert's padded run; pairs for no local expert go to a trash row.
    starts = torch.cat([padded_end - padded,
                        torch.full((1,), max_padded, dtype=padded.dtype, device=device)])
    dest = torch.where(flat < num_experts, starts[flat] + rank, max_padded)
    sorted_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, pair_ids.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    expert_ids = expert_ids.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids[:max_padded], expert_ids, padded_end[-1:].to(torch.int32)


def default_moe_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> dict[str, int]:
    if dtype == torch.float32:  # tests and the float32 path, not tuned
        return {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}
    if num_pairs <= 2 * num_experts:  # decode: few rows per expert, weight-bandwidth bound
        return {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
    return {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, sorted_ids: torch.Tensor,
                 expert_ids: torch.Tensor, num_post_padded: torch.Tensor, num_pairs: int,
                 a_row_div: int, cfg: dict[str, int],
                 topk_weights: torch.Tensor | None = None) -> None:
    """c[p] = a[p // a_row_div] @ w[expert of p]^T (x topk_weights[p]) for the sorted pairs."""
    n, k = w.shape[1], w.shape[2]
    precision = "tf32x3" if a.dtype == torch.float32 else "tf32"
    grid = (sorted_ids.shape[0] // cfg["block_m"], triton.cdiv(n, cfg["block_n"]))
    _grouped_gemm_kernel[grid](
        a, w, c, topk_weights if topk_weights is not None else c, sorted_ids, expert_ids,
        num_post_padded, n, k, num_pairs, a_row_div,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        MUL_WEIGHT=topk_weights is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], DOT_PRECISION=precision, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, k] -> [T, H] (x's dtype).
    topk_ids index this rank's experts; -1 marks an expert held elsewhere (contributes 0)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden = w13.shape[0], w2.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    cfg = config or default_moe_config(num_pairs, num_experts, x.dtype)
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg["block_m"], num_experts)
    weights = topk_weights.reshape(-1).float().contiguous()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, gate_up, sorted_ids, expert_ids, num_post, num_pairs, top_k, cfg)
    # Rows of pairs no local expert takes hold garbage here, but no later step reads them.
    h = silu_and_mul(gate_up)
    # float32 partial outputs: the k-way sum below adds in float32 too, as the reference does.
    out = torch.zeros(num_pairs, hidden, dtype=torch.float32, device=x.device)
    grouped_gemm(h, w2, out, sorted_ids, expert_ids, num_post, num_pairs, 1, cfg, weights)
    return out.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)
